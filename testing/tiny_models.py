"""Tiny random-weight SD2.x (v-prediction), SDXL-family and SD3.5-family checkpoints that ComfyUI's own loader
detects.

The SD1.5 recipe lives in :mod:`.tiny_checkpoint` (its file unchanged); these reuse its init rules and writer:

- ``sd2``: detected as ``SD20`` with ``ModelType.V_PREDICTION``. UNet of SD2's signature (``context_dim=1024``,
  linear ``proj_in``, 64-channel heads) with four levels of two res blocks at 320 channels and attention on
  the first three levels (114 M parameters, float16): the layout reaches ``output_blocks.11.1``, where
  ``SD20.model_type`` reads the v-prediction marker (a LayerNorm bias with std > 0.09; trained v-models have
  it, zero-initialised ones do not, so the recipe draws that one bias with std :data:`V_MARKER_STD`). Text
  encoder: the full OpenCLIP-H (24 layers, width 1024, 354 M parameters) in the OpenCLIP key layout of real
  SD2 checkpoints (``cond_stage_model.model.transformer.resblocks.*``), float8_e4m3fn.
- ``sdxl``: detected as ``Segmind_Vega`` (an ``SDXL`` subclass: ``model_base.SDXL``, with the 2816-wide
  ``label_emb`` for the pooled text and size embedding). ComfyUI matches SDXL-family UNets by
  ``transformer_depth`` ``[0, 0, 1, 1, 2, 2]``, never by ``channel_mult``, so all three levels stay at 320
  channels (107 M parameters, float16; as in Vega, the middle block has no attention). Text encoders: the full CLIP-L
  (``conditioner.embedders.0.transformer.text_model.*``) and the full OpenCLIP-bigG (32 layers, width 1280,
  695 M parameters, ``conditioner.embedders.1.model.*``), both float8_e4m3fn.
- ``sd35``: detected as ``SD3`` (``model_base.SD3``, flow model). ComfyUI recognises an MMDiT by
  ``joint_blocks.0.context_block.attn.qkv.weight`` and derives the width from the depth (hidden = 64 × depth,
  heads = depth), so the DiT is two joint blocks at width 128 (2 heads of 64) with SD3.5 Medium's MMDiT-X
  features: RMS qk-norm (``ln_q``/``ln_k`` weights) and an image-only second attention in block 0 (SD3.5 Medium
  has it in blocks 0-12 of 24); 16 latent channels, patch 2, ``pos_embed_max_size`` 16 (latents up to 32×32),
  the 4096-wide context embedder and 2048-wide pooled input of SD3 (2.0 M parameters, float16). Text encoders:
  the full CLIP-L and OpenCLIP-bigG under ``text_encoders.clip_{l,g}.transformer.*`` (HF names, as SD3.5 files
  store them), float8_e4m3fn; no T5 (ComfyUI then builds the context from CLIP alone, zero-padded to 4096).
  VAE: TAESD with 16 latent channels (TAESD3's shape) under ``first_stage_model.taesd_*``.
- All: TAESD as the VAE (``first_stage_model.taesd_*``), as in the SD1.5 recipe.

The text encoders are drawn module by module on a ``meta``-device skeleton and cast to float8 as they go,
so the build never holds a float32 copy of CLIP-G (2.8 GB); the checkpoint key layout is produced by
ComfyUI's own save path (``process_clip_state_dict_for_saving`` of the detected model class), which its
load path inverts. Same seed, byte-identical file. Measured on one core: ``sd2`` 8 s, 0.59 GB file, peak RSS
1.7 GB; ``sdxl`` 13 s, 1.04 GB file, peak RSS 2.1 GB (most of it the serialised file); ``sd35`` 15-30 s on a busy 2-core
machine, 0.83 GB file. CLI::

    python -m cxr_counterfactual.testing.tiny_models {sd2,sdxl,sd35} OUT.safetensors [--seed N]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..demo.tiny_checkpoint import (
    _CONSTRUCTOR_INITIALISED,
    _UNET_PREFIX,
    _init_module_,
    _init_param_,
    _prefixed,
    _vae_state,
    save_checkpoint,
)
from ..hosts.comfy.standalone import prepare_comfy_import

if TYPE_CHECKING:
    import comfy.supported_models_base
    import torch

logger = logging.getLogger(__name__)

#: Bump when a recipe changes, so cached files built by an older recipe are not reused.
RECIPE_VERSION = 1

#: ``SD20.model_type`` calls a model v-prediction when this UNet key's std exceeds 0.09.
V_MARKER_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_MARKER_STD = 0.2

_COMMON_UNET: dict[str, object] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_linear_in_transformer": True,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_heads": -1,
    "num_head_channels": 64,
    "use_checkpoint": False,
}

#: SD2.x as ``detect_unet_config`` reads it back (SD20 adds 64-channel heads and float32 attention).
SD2_UNET_CONFIG: dict[str, object] = {
    **_COMMON_UNET,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # per output block, listed from level 0
    "transformer_depth_middle": 1,
    "context_dim": 1024,
    "adm_in_channels": None,
}

#: Segmind Vega's layout at SD-base width: ``transformer_depth`` is what ComfyUI matches.
SDXL_UNET_CONFIG: dict[str, object] = {
    **_COMMON_UNET,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "transformer_depth_middle": -1,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
}


def _unet_state(config: dict[str, object], generator: torch.Generator,
                marker: str | None = None) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.``, float16; ``marker`` (a parameter name) is drawn
    with std :data:`V_MARKER_STD` instead of its init rule's value."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _init_module_(unet, generator)
    if marker is not None:
        with torch.no_grad():
            dict(unet.named_parameters())[marker].normal_(0.0, V_MARKER_STD, generator=generator)
    state = _prefixed(unet.state_dict(), _UNET_PREFIX, torch.float16)
    del unet
    return state


def _streamed_state(module: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype,
                    prefix: str) -> dict[str, torch.Tensor]:
    """Draw every parameter of a ``meta``-device ``module`` (init rules of :mod:`.tiny_checkpoint`, in
    registration order) one layer at a time, keep it cast to ``dtype`` under ``prefix``, free the float32 copy."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for sub_name, sub in module.named_modules():
        if not any(True for _ in sub.parameters(recurse=False)):
            continue
        sub.to_empty(device="cpu", recurse=False)
        for name, param in sub.named_parameters(recurse=False):
            if name in _CONSTRUCTOR_INITIALISED:  # its constructor's value is gone on the meta device
                raise RuntimeError(f"tiny checkpoint: {sub_name}.{name} cannot be streamed; use _init_module_")
            _init_param_(sub_name, sub, name, param, generator)
            if not torch.isfinite(param).all():
                raise RuntimeError(f"tiny checkpoint: parameter {sub_name}.{name} is not finite after init")
            out[f"{prefix}{sub_name}.{name}"] = param.detach().to(dtype).contiguous()
        sub.to_empty(device="meta", recurse=False)  # release this layer's float32 weights
    return out


def _text_encoder(config_path: Path, generator: torch.Generator, prefix: str) -> dict[str, torch.Tensor]:
    """A full-size ComfyUI ``CLIPTextModel`` (``config_path``'s JSON) as float8_e4m3fn, HF key layout."""
    import comfy.clip_model
    import comfy.ops
    import torch

    config = json.loads(config_path.read_text(encoding="utf-8"))
    skeleton = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return _streamed_state(skeleton, generator, torch.float8_e4m3fn, prefix)


def _sd2_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip

    state = _unet_state(SD2_UNET_CONFIG, generator, marker=V_MARKER_KEY)
    config = Path(comfy.text_encoders.sd2_clip.__file__).with_name("sd2_clip_config.json")
    clip = _text_encoder(config, generator, "clip_h.transformer.")
    # SD20's save path: cond_stage_model.model.* in OpenCLIP names (fused in_proj, text_projection [in, out]).
    state.update(comfy.supported_models.SD20(SD2_UNET_CONFIG).process_clip_state_dict_for_saving(clip))
    del clip
    state.update(_vae_state(generator))
    return state


def _clip_l_g(generator: torch.Generator, model: comfy.supported_models_base.BASE) -> dict[str, torch.Tensor]:
    """The full CLIP-L, then the full OpenCLIP-bigG (drawn in that order from ``generator``), under the keys ``model``
    (a ComfyUI model class, configured) saves them with: its ``process_clip_state_dict_for_saving``."""
    import comfy.sd1_clip

    folder = Path(comfy.sd1_clip.__file__).parent
    clips = _text_encoder(folder / "sd1_clip_config.json", generator, "clip_l.transformer.")
    clips.update(_text_encoder(folder / "clip_config_bigg.json", generator, "clip_g.transformer."))
    return model.process_clip_state_dict_for_saving(clips)


def _sdxl_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    import comfy.supported_models

    state = _unet_state(SDXL_UNET_CONFIG, generator)
    # SDXL's save path: CLIP-L under conditioner.embedders.0 (HF names, no projection), bigG under
    # conditioner.embedders.1.model in OpenCLIP names.
    state.update(_clip_l_g(generator, comfy.supported_models.Segmind_Vega(SDXL_UNET_CONFIG)))
    state.update(_vae_state(generator))
    return state


#: SD3.5 Medium's MMDiT-X at two blocks, as ``detect_unet_config`` reads it back (``depth`` fixes the width:
#: 64 × depth). ``pos_embed_max_size`` is kept small: the stored position table is ``max_size² × hidden``.
SD35_MMDIT_CONFIG: dict[str, object] = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 256,
    "pos_embed_max_size": 16,
    "pos_embed_scaling_factor": None,
    "qk_norm": "rms",
    "x_block_self_attn_layers": [0],
}


def _mmdit_state(config: dict[str, object], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The MMDiT's weights under ``model.diffusion_model.``, float16.

    Two things the shared init rules do not cover: MMDiT's own ``RMSNorm`` (the qk-norm scales, ones as
    trained norms start) and the ``pos_embed`` buffer, which ComfyUI allocates with ``torch.empty`` and real
    checkpoints store as SD3's fixed 2-D sin-cos table; it is filled with that table here.
    """
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules import mmdit

    model = mmdit.OpenAISignatureMMDITWrapper(**config, dtype=torch.float32, device="cpu",
                                              operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for sub in model.modules():
            if isinstance(sub, mmdit.RMSNorm) and sub.weight is not None:
                sub.weight.fill_(1.0)
        side = int(config["pos_embed_max_size"])  # type: ignore[call-overload]
        model.pos_embed.copy_(mmdit.get_2d_sincos_pos_embed_torch(model.hidden_size, side, side)[None])
    done = {id(sub.weight) for sub in model.modules() if isinstance(sub, mmdit.RMSNorm) and sub.weight is not None}
    for sub_name, sub in model.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) not in done:
                _init_param_(sub_name, sub, name, param, generator)
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise RuntimeError(f"tiny checkpoint: {name} is not finite after init")
    state = _prefixed(model.state_dict(), _UNET_PREFIX, torch.float16)
    del model
    return state


def _taesd_state(generator: torch.Generator, latent_channels: int) -> dict[str, torch.Tensor]:
    """TAESD for ``latent_channels`` under ``first_stage_model.``: ComfyUI reads the channel count from
    ``taesd_decoder.1.weight``, so 16 gives TAESD3's shape."""
    import comfy.taesd.taesd
    import torch

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _init_module_(taesd, generator)
    return _prefixed(taesd.state_dict(), "first_stage_model.", torch.float32)


def _sd35_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    import comfy.supported_models

    state = _mmdit_state(SD35_MMDIT_CONFIG, generator)
    # SD3's save path: both encoders under text_encoders.* in HF names (no T5: ComfyUI then runs CLIP only).
    state.update(_clip_l_g(generator, comfy.supported_models.SD3(SD35_MMDIT_CONFIG)))
    state.update(_taesd_state(generator, 16))
    return state


#: Recipe name → (what ComfyUI detects, state builder).
RECIPES: dict[str, tuple[str, Callable[[torch.Generator], dict[str, torch.Tensor]]]] = {
    "sd2": ("SD2.x v-prediction", _sd2_state),
    "sdxl": ("SDXL family (Segmind Vega)", _sdxl_state),
    "sd35": ("SD3.5 family (MMDiT-X)", _sd35_state),
}


def checkpoint_name(recipe: str) -> str:
    """File name of a recipe's checkpoint, e.g. ``tiny-sd2-v1.safetensors`` (carries :data:`RECIPE_VERSION`)."""
    _check(recipe)
    return f"tiny-{recipe}-v{RECIPE_VERSION}.safetensors"


def _check(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown tiny-model recipe {recipe!r} (known: {', '.join(RECIPES)})")


def build_tiny_model_checkpoint(recipe: str, path: Path, seed: int = 0) -> Path:
    """Build the ``recipe`` checkpoint (``"sd2"``, ``"sdxl"`` or ``"sd35"``) and write it to ``path`` (safetensors).

    Written atomically (temporary name, then :func:`os.replace`). ComfyUI must be importable (see
    :func:`~.tiny_checkpoint.prepare_comfy_import`).

    Args:
        recipe: A key of :data:`RECIPES`.
        path: Where to write the file; its folder is created if needed.
        seed: Seed of the one generator that draws every weight (UNet, text encoders, VAE, in that order).

    Returns:
        ``path``.
    """
    import torch

    _check(recipe)
    start = time.perf_counter()
    state = RECIPES[recipe][1](torch.Generator(device="cpu").manual_seed(seed))
    count = len(state)
    save_checkpoint(state, Path(path), f"tiny-{recipe} v{RECIPE_VERSION} seed {seed}")
    del state
    logger.info("built tiny %s checkpoint %s (%d tensors, %.1f MB) in %.1f s", RECIPES[recipe][0], path, count,
                Path(path).stat().st_size / 1e6, time.perf_counter() - start)
    return Path(path)


def ensure_tiny_model_checkpoint(recipe: str, cache_dir: Path) -> Path:
    """The ``recipe`` checkpoint in ``cache_dir``, built (seed 0) only when it is not there yet."""
    path = Path(cache_dir) / checkpoint_name(recipe)
    if path.is_file():
        logger.debug("reusing tiny checkpoint %s", path)
        return path
    return build_tiny_model_checkpoint(recipe, path, seed=0)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build one recipe's checkpoint at the given path and print that path."""
    parser = argparse.ArgumentParser(
        prog="python -m cxr_counterfactual.testing.tiny_models",
        description="Build a tiny random-weight SD2.x (v-prediction), SDXL- or SD3.5-family checkpoint for tests.",
    )
    parser.add_argument("recipe", choices=sorted(RECIPES), help="which model family")
    parser.add_argument("out", type=Path, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prepare_comfy_import()
    path = build_tiny_model_checkpoint(args.recipe, args.out, seed=args.seed)
    print(path)  # the CLI's one output, for scripts: the path written
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
