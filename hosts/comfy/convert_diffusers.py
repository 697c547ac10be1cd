"""``python -m cxr_counterfactual convert-diffusers FOLDER OUT.safetensors``: a diffusers-format SD1.x pipeline
folder (RoentGen's layout: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
``model_index.json``) as one ComfyUI checkpoint that ``CheckpointLoaderSimple`` loads as SD1.5, with the
folder's own (fine-tuned) text encoder.

The key maps are ComfyUI's own: ``comfy.model_detection.unet_config_from_diffusers_unet`` reads the UNet's
layout and ``comfy.utils.unet_to_diffusers`` names every UNet tensor; ``comfy.diffusers_convert`` converts the
VAE; the text encoder (transformers' ``CLIPTextModel``) keeps its names under ``cond_stage_model.transformer.``,
the single-file SD1 layout. Tensors are renamed, never recomputed (cast to ``--dtype``, fp16 by default).

Only ``.safetensors`` weights are read (a ``.bin`` file is a pickle: re-save it with
``save_pretrained(..., safe_serialization=True)``). The tokenizer must be CLIP's: ComfyUI's SD1 loader always
tokenizes with its own copy, so a folder with a changed vocabulary is refused rather than silently mis-read.
ComfyUI treats every SD1.x checkpoint as epsilon-prediction; a v-prediction folder converts, with a warning to
add ComfyUI's ``ModelSamplingDiscrete`` (v_prediction) node.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import CXRInputError

logger = logging.getLogger("cxr_counterfactual")

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
TEXT_FILES = ("model.safetensors", "model.fp16.safetensors")
DTYPES = ("fp16", "fp32", "keep")
METADATA_KEY = "cxr_counterfactual.converted"
_FIX_SAFE = "Re-save the pipeline with save_pretrained(folder, safe_serialization=True) and convert that folder."


@dataclass(frozen=True)
class Conversion:
    """What was written: tensors per part, the detected prediction type, the output path."""

    path: Path
    unet_tensors: int
    vae_tensors: int
    text_tensors: int
    prediction_type: str


def _weights(folder: Path, component: str, names: Sequence[str]) -> dict:
    """A component's tensors from its ``.safetensors`` file (or shards listed by its ``.index.json``)."""
    from safetensors.torch import load_file

    part = folder / component
    for name in names:
        if (part / name).is_file():
            return load_file(str(part / name))
        index = part / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict = {}
            for shard in shards:
                if Path(shard).name != shard:
                    raise CXRInputError(f"{index.name} names a shard outside its folder ({shard}).",
                                        input_name="folder", fix=_FIX_SAFE)
                state.update(load_file(str(part / shard)))
            return state
    if any(part.glob("*.bin")) or any(part.glob("*.ckpt")):
        raise CXRInputError(f"'{component}/' holds only pickle weights (.bin/.ckpt), which this command does not read.",
                            input_name="folder", fix=_FIX_SAFE)
    raise CXRInputError(f"'{component}/' has no {' or '.join(names)}.", input_name="folder",
                        fix="Point to the pipeline folder itself (the one holding model_index.json).")


def check_folder(folder: Path) -> dict:
    """The folder's ``model_index.json``, after checking it is an SD1.x-style pipeline with every component."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CXRInputError(f"'{folder}' has no model_index.json: not a diffusers pipeline folder.",
                            input_name="folder",
                            fix="Point to the folder holding model_index.json, unet/, vae/, text_encoder/, tokenizer/.")
    index = json.loads(index_path.read_text())
    if "text_encoder_2" in index or "transformer" in index:
        raise CXRInputError(f"'{folder.name}' is a {index.get('_class_name', 'pipeline')} with components an SD1.x "
                            "checkpoint cannot hold.", input_name="folder",
                            fix="Convert SD1.x pipelines only (e.g. RoentGen); load others with ComfyUI's own loaders.")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise CXRInputError(f"'{folder.name}' lacks {', '.join(missing)}/.", input_name="folder",
                            fix="Use a complete pipeline folder (save_pretrained writes every component).")
    return index


def _tokenizer_tables(folder: Path) -> tuple[dict, list[str], dict]:
    """A CLIP tokenizer's vocabulary, merges and added tokens, from vocab.json + merges.txt (+ added_tokens.json)
    or from a tokenizers-library tokenizer.json (what recent transformers save)."""
    def merges_of(lines) -> list[str]:  # "a b" strings or [a, b] pairs; merges.txt starts with a #version line
        out = [m.strip() if isinstance(m, str) else " ".join(m) for m in lines]
        return [m for m in out if m and not m.startswith("#version")]

    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        added = folder / "added_tokens.json"
        return (json.loads((folder / "vocab.json").read_text(encoding="utf-8")),
                merges_of((folder / "merges.txt").read_text(encoding="utf-8").split("\n")),
                json.loads(added.read_text(encoding="utf-8")) if added.is_file() else {})
    if (folder / "tokenizer.json").is_file():
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = data.get("model", {})
        return (model.get("vocab", {}), merges_of(model.get("merges", [])),
                {t["content"]: t["id"] for t in data.get("added_tokens", [])})
    raise CXRInputError(f"'{folder.name}/' has neither vocab.json + merges.txt nor tokenizer.json.",
                        input_name="folder", fix="Use a complete pipeline folder (save_pretrained writes it).")


def check_tokenizer(folder: Path, comfy_tokenizer: Path) -> None:
    """The folder's tokenizer must be CLIP's vocabulary and merges, which ComfyUI's SD1 loader uses (its special
    tokens may be listed as added tokens, with their CLIP ids; any other added token is a change)."""
    vocab, merges, added = _tokenizer_tables(folder / "tokenizer")
    clip_vocab, clip_merges, _ = _tokenizer_tables(comfy_tokenizer)
    new_tokens = [t for t, i in added.items() if clip_vocab.get(t) != i]
    if vocab != clip_vocab or merges != clip_merges or new_tokens:
        raise CXRInputError("the folder's tokenizer is not CLIP's (changed vocabulary, merges or added tokens); "
                            "ComfyUI always tokenizes SD1.x prompts with CLIP's, so prompts would be mis-read.",
                            input_name="folder", fix="Use the diffusers pipeline directly (pip install "
                            "'cxr-counterfactual[diffusers]', see docs/diffusers.md).")


def prediction_type(folder: Path) -> str:
    config = folder / "scheduler" / "scheduler_config.json"
    return str(json.loads(config.read_text()).get("prediction_type", "epsilon")) if config.is_file() else "epsilon"


def text_encoder_state(state: dict) -> dict:
    """transformers' CLIPTextModel tensors under ``text_model.`` (transformers 4 saved that prefix, 5 leaves it out);
    anything else (a projection, a logit scale) is not part of an SD1 text encoder and is dropped."""
    parts = ("embeddings.", "encoder.", "final_layer_norm.")
    out = {k: v for k, v in state.items() if k.startswith("text_model.")}
    out.update({f"text_model.{k}": v for k, v in state.items() if k.startswith(parts)})
    return out


def _cast(state: dict, dtype: str) -> dict:
    import torch

    target = {"fp16": torch.float16, "fp32": torch.float32}.get(dtype)
    if target is None:
        return state
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def convert(folder: Path, out: Path, *, dtype: str = "fp16", overwrite: bool = False) -> Conversion:
    """Convert the pipeline in ``folder`` into the single-file checkpoint ``out`` (ComfyUI must be importable).

    Raises:
        CXRInputError: not an SD1.x pipeline folder, pickle-only weights, a non-CLIP tokenizer, an unknown UNet
            layout, an existing ``out`` (without ``overwrite``), or an unknown ``dtype``.
    """
    import comfy.diffusers_convert
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.utils
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    if dtype not in DTYPES:
        raise CXRInputError(f"dtype '{dtype}' is not one of {DTYPES}.", input_name="dtype", fix="Use fp16 (default).")
    if out.suffix != ".safetensors":
        raise CXRInputError(f"'{out.name}' does not end in .safetensors.", input_name="out",
                            fix="Name the output e.g. roentgen.safetensors.")
    if out.exists() and not overwrite:
        raise CXRInputError(f"'{out}' exists; it is never overwritten silently.", input_name="out",
                            fix="Pick a new name, or pass --overwrite.")
    index = check_folder(folder)
    check_tokenizer(folder, Path(comfy.sd1_clip.__file__).with_name("sd1_tokenizer"))
    unet = _weights(folder, "unet", UNET_FILES)
    config = comfy.model_detection.unet_config_from_diffusers_unet(unet)
    if config is None or config.get("context_dim") != 768:
        raise CXRInputError("the UNet is not an SD1.x layout ComfyUI knows (768-wide cross-attention).",
                            input_name="folder", fix="Convert SD1.x pipelines only (e.g. RoentGen).")
    key_map = comfy.utils.unet_to_diffusers(config)
    unknown = sorted(k for k in unet if k not in key_map)
    if unknown:
        raise CXRInputError(f"{len(unknown)} UNet tensors have no ComfyUI name (e.g. {unknown[0]}).",
                            input_name="folder", fix="Convert SD1.x pipelines only (e.g. RoentGen).")
    state = {f"model.diffusion_model.{key_map[k]}": v for k, v in unet.items()}
    vae = comfy.diffusers_convert.convert_vae_state_dict(_weights(folder, "vae", UNET_FILES))
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    text = text_encoder_state(_weights(folder, "text_encoder", TEXT_FILES))
    if text.get("text_model.embeddings.token_embedding.weight") is None or \
            text["text_model.embeddings.token_embedding.weight"].shape[-1] != 768:
        raise CXRInputError("the text encoder is not a 768-wide CLIP text model (SD1.x's).", input_name="folder",
                            fix="Convert SD1.x pipelines only (e.g. RoentGen).")
    state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    kind = prediction_type(folder)
    if kind != "epsilon":
        logger.warning("%s predicts '%s': ComfyUI loads SD1.x checkpoints as epsilon-prediction; add a "
                       "ModelSamplingDiscrete node set to %s after the loader.", folder.name, kind, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        source = f"{index.get('_class_name', 'pipeline')} (diffusers {index.get('_diffusers_version', '?')}); " \
                 f"prediction_type {kind}"
        save_file(_cast(state, dtype), tmp, metadata={METADATA_KEY: source})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote %s: %d UNet, %d VAE, %d text-encoder tensors", out, len(unet), len(vae), len(text))
    return Conversion(out, len(unet), len(vae), len(text), kind)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxr_counterfactual convert-diffusers",
                                description="Convert a diffusers SD1.x pipeline folder (e.g. RoentGen) into one "
                                "ComfyUI .safetensors checkpoint with its fine-tuned text encoder.")
    p.add_argument("folder", type=Path, help="the pipeline folder (holding model_index.json)")
    p.add_argument("out", type=Path,
                   help="the checkpoint to write, e.g. ComfyUI/models/checkpoints/roentgen.safetensors")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="tensor type written (default fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--comfyui", type=Path, help="ComfyUI folder (default: COMFYUI_PATH, or ~/comfy/ComfyUI)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .standalone import prepare_comfy_import

    try:
        prepare_comfy_import(args.comfyui)
        done = convert(args.folder, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CXRInputError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(f"{done.path}\n")
    return 0
