"""A tiny random-weight checkpoint that ComfyUI's ``CheckpointLoaderSimple`` detects as SD1.5.

No registry ships diffusion weights, so the tests build their own model with ComfyUI's own modules:

- UNet: ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` with the SD1.5 signature that
  ``comfy.supported_models.SD15`` matches (``model_channels=320``, ``context_dim=768``, conv ``proj_in``,
  no ``label_emb``) and SD1.5's four levels at one width (``channel_mult=[1, 1, 1, 1]``) with
  transformers at the first three and in the middle block, as SD1.5 has them, but one res block per level
  and one transformer block per attention layer (≈ 74 M parameters, stored as float16). So every grid a
  real SD1.5 has (latent ÷ 1, 2, 4 and 8) exists here, with cross-attention where SD1.5 has it.
- Text encoder: the full-size CLIP-L of ``comfy.clip_model.CLIPTextModel`` (12 layers; a truncated one
  loads but leaves layers uninitialised, which yields NaN), stored as float8_e4m3fn to halve the file.
- VAE: ``comfy.taesd.taesd.TAESD`` under ``first_stage_model.taesd_*``, which makes ``comfy.sd.VAE`` load
  TAESD (2.4 M parameters) instead of the full KL autoencoder.

ComfyUI's ops skip weight initialisation (``torch.empty``), so every weight is drawn here from one seeded
generator: the same seed gives a byte-identical file.

Importing this module does not import ``comfy``; the build functions do, so ComfyUI must be importable
(and ``comfy.cli_args.args.cpu`` set where wanted) before they are called. :func:`prepare_comfy_import`
does both; the CLI calls it::

    python -m cxr_counterfactual.demo.tiny_checkpoint OUT.safetensors [--seed N]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..hosts.comfy.standalone import prepare_comfy_import

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Bump when the recipe changes, so cached files built by an older recipe are not reused.
RECIPE_VERSION = 2

#: The one safetensors metadata entry: ``"tiny-sd15 v<RECIPE_VERSION> seed <seed>"``.
METADATA_KEY = "cxr_counterfactual.tiny_checkpoint"

#: File name used by :func:`ensure_tiny_checkpoint` inside its cache folder.
CHECKPOINT_NAME = f"tiny-sd15-v{RECIPE_VERSION}.safetensors"

#: The UNet as ``comfy.model_detection.detect_unet_config`` will read it back (plus SD15's
#: ``unet_extra_config``: 8 heads). SD1.5's level structure (four levels, three downsamples; attention at
#: levels 0–2 and in the middle block, none at level 3), so settings that name a grid (grid factors 1, 2, 4,
#: 8) behave as on a real SD1.5; one width (320) and one res block per level keep it small.
UNET_CONFIG: dict[str, object] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1, 1],
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_heads": 8,
    "num_head_channels": -1,
    "adm_in_channels": None,
    "use_checkpoint": False,
}

#: The first recipe's two-level UNet (``channel_mult=[1, 2]``: cross-attention at latent ÷ 1 and ÷ 2 only, the
#: middle block at ÷ 2), also detected as SD1.5: a checkpoint that lacks grids a real SD1.5 has, for tests of
#: the refusals of grid factors a model cannot serve.
TWO_LEVEL_UNET_CONFIG: dict[str, object] = {
    **UNET_CONFIG,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
}

# Standard deviations of the random init. Transformer-style 0.02 for linear layers and token
# embeddings (as CLIP and GPT-2 do); convolutions get 1/sqrt(fan_in) so TAESD's deep conv stack neither
# vanishes nor explodes. Norm weights are ones and every bias is zero.
_LINEAR_STD = 0.02
_POSITION_STD = 0.01

# Free-standing parameters whose constructor already gives them real values (TAESD's latent scale/shift).
_CONSTRUCTOR_INITIALISED = frozenset({"vae_scale", "vae_shift"})

_UNET_PREFIX = "model.diffusion_model."
_CLIP_PREFIX = "cond_stage_model.transformer."
_VAE_PREFIX = "first_stage_model."


def _init_module_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter of ``module`` from ``generator``, in registration order (deterministic)."""
    import torch

    done: set[int] = set()
    for sub_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in done:
                continue
            done.add(id(param))
            _init_param_(sub_name, sub, name, param, generator)
    # torch.empty memory may hold NaN/inf; a last check that nothing slipped through.
    for name, param in module.named_parameters():
        if not torch.isfinite(param).all():
            raise RuntimeError(f"tiny checkpoint: parameter {name} is not finite after init")


def _init_param_(
    sub_name: str, sub: torch.nn.Module, name: str, param: torch.nn.Parameter, generator: torch.Generator
) -> None:
    """Initialise parameter ``name`` of layer ``sub_name`` according to the kind of layer it is."""
    import torch

    with torch.no_grad():
        if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            param.fill_(1.0 if name == "weight" else 0.0)
        elif name == "bias":
            param.zero_()
        elif isinstance(sub, torch.nn.Embedding):
            std = _POSITION_STD if sub_name.endswith("position_embedding") else _LINEAR_STD
            param.normal_(0.0, std, generator=generator)
        elif isinstance(sub, torch.nn.Linear):
            param.normal_(0.0, _LINEAR_STD, generator=generator)
        elif isinstance(sub, torch.nn.modules.conv._ConvNd):
            fan_in = param.shape[1] * param[0, 0].numel()
            param.normal_(0.0, fan_in**-0.5, generator=generator)
        elif name not in _CONSTRUCTOR_INITIALISED:
            # A layer type this recipe does not know would keep torch.empty garbage: refuse to build.
            raise RuntimeError(f"tiny checkpoint: no init rule for {type(sub).__name__}.{name}")


def _prefixed(state: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` with every key prefixed and every floating tensor cast to ``dtype`` (contiguous)."""
    out = {}
    for key, tensor in state.items():
        value = tensor.detach()
        if value.is_floating_point():
            value = value.to(dtype)
        out[prefix + key] = value.contiguous()
    return out


#: A full-size SD1.5 UNet (≈ 860 M parameters), for benchmarks on realistic layer shapes.
SD15_FULL_UNET_CONFIG: dict[str, object] = {
    **UNET_CONFIG,
    "image_size": 64,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}


def random_unet_model(config: dict[str, object] = SD15_FULL_UNET_CONFIG, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of an SD1.x-shaped UNet with seeded random weights, detected by
    ComfyUI's own loader from the state dict (needs :func:`prepare_comfy_import` first)."""
    import comfy.ops
    import comfy.sd
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _init_module_(unet, torch.Generator().manual_seed(seed))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    del unet
    model = comfy.sd.load_diffusion_model_state_dict(state)
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the random UNet's layout")
    return model


def _unet_state(generator: torch.Generator, config: dict[str, object] = UNET_CONFIG) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.``, float16 (half the file, plenty for tests)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _init_module_(unet, generator)
    return _prefixed(unet.state_dict(), _UNET_PREFIX, torch.float16)


def _clip_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The full CLIP-L text model under ``cond_stage_model.transformer.text_model.``, float8_e4m3fn."""
    import json

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import torch

    config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    clip = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    _init_module_(clip, generator)
    state = clip.state_dict()
    # SD1.5 checkpoints carry no text projection: SD15.process_clip_state_dict would move a
    # "transformer.text_projection" key under "text_model." where nothing loads it.
    state.pop("text_projection.weight", None)
    return _prefixed(state, _CLIP_PREFIX, torch.float8_e4m3fn)


def _vae_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """TAESD's weights under ``first_stage_model.`` (its ``taesd_decoder.1.weight`` key selects TAESD)."""
    import comfy.taesd.taesd
    import torch

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_module_(taesd, generator)
    return _prefixed(taesd.state_dict(), _VAE_PREFIX, torch.float32)


def save_checkpoint(state: dict[str, torch.Tensor], path: Path, description: str) -> Path:
    """Write ``state`` to ``path`` (safetensors) with the one metadata entry ``{METADATA_KEY: description}``.

    The file is written under a temporary name in the same folder and moved into place with
    :func:`os.replace`, so a reader never sees a half-written file and concurrent builders do not clash.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes several in hash order, which would make same-seed files differ
    # byte-wise. Not "config": ComfyUI reads that key as a model config.
    metadata = {METADATA_KEY: description}
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp_name, metadata=metadata)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the file is no secret
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def build_tiny_sd15_checkpoint(path: Path, seed: int = 0, unet_config: dict[str, object] | None = None) -> Path:
    """Build the tiny SD1.5-shaped checkpoint and write it to ``path`` (safetensors).

    The file is written under a temporary name in the same folder and moved into place with
    :func:`os.replace`, so a reader never sees a half-written file and concurrent builders do not clash.
    ComfyUI must be importable (see :func:`prepare_comfy_import`).

    Args:
        path: Where to write the ``.safetensors`` file; its folder is created if needed.
        seed: Seed of the generator that draws every weight.
        unet_config: Another SD1.5-detected UNet layout (e.g. :data:`TWO_LEVEL_UNET_CONFIG`); default
            :data:`UNET_CONFIG`. The metadata names a non-default layout by its ``channel_mult``.

    Returns:
        ``path``.
    """
    import torch

    path = Path(path)
    start = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    state.update(_unet_state(generator, UNET_CONFIG if unet_config is None else unet_config))
    state.update(_clip_state(generator))
    state.update(_vae_state(generator))
    layout = "" if unet_config is None else f" channel_mult {unet_config['channel_mult']}"
    save_checkpoint(state, path, f"tiny-sd15 v{RECIPE_VERSION} seed {seed}{layout}")
    logger.info(
        "built tiny SD1.5 checkpoint %s (%d tensors, %.1f MB) in %.1f s",
        path,
        len(state),
        path.stat().st_size / 1e6,
        time.perf_counter() - start,
    )
    return path


def ensure_tiny_checkpoint(cache_dir: Path) -> Path:
    """The tiny checkpoint in ``cache_dir``, built (seed 0) only when it is not there yet.

    The file name carries :data:`RECIPE_VERSION`, so a file from an older recipe is never reused.
    """
    path = Path(cache_dir) / CHECKPOINT_NAME
    if path.is_file():
        logger.debug("reusing tiny checkpoint %s", path)
        return path
    return build_tiny_sd15_checkpoint(path, seed=0)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the checkpoint at the given path and print that path."""
    parser = argparse.ArgumentParser(
        prog="python -m cxr_counterfactual.demo.tiny_checkpoint",
        description="Build a tiny random-weight SD1.5-shaped checkpoint for tests (needs ComfyUI).",
    )
    parser.add_argument("out", type=Path, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prepare_comfy_import()
    path = build_tiny_sd15_checkpoint(args.out, seed=args.seed)
    print(path)  # the CLI's one output, for scripts: the path written
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
