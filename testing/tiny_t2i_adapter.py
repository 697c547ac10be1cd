"""A tiny random-weight T2I-Adapter and the smallest SD1.5-detected checkpoint it fits, for tests.

Where a T2I-Adapter acts (``comfy.t2i_adapter.adapter.Adapter`` and ``openaimodel.apply_control``): the adapter
turns the hint into four feature maps of ``[c, 2c, 4c, 4c]`` channels (``c`` = its ``conv_in`` width) at latent
÷ 1, 2, 4 and 8, and ``apply_control`` adds the ``k``-th entry of its list to the output of input block ``k``; for
the SD1.5 form the features sit at input blocks 2, 5, 8 and 11, the last res block of each level of a UNet with two
res blocks per level. ``comfy.supported_models.SD15`` matches only ``model_channels=320``, so an adapter for a
model ComfyUI calls SD1.5 has ``c = 320`` and needs 320 · [1, 2, 4, 4] channels at those blocks: the repo's tiny
SD1.5 UNet (320 at every level, one res block per level) does not fit it.

:data:`T2I_UNET_CONFIG` is SD1.5's own level structure (``channel_mult [1, 2, 4, 4]``, two res blocks per level,
which the feature placement fixes) made smaller where the adapter does not care: one transformer per attention
level (in the first res block of levels 0–2, as the stages need cross-attention at latent ÷ 1, 2, 4) instead of
two, and a middle block of res blocks only. 654 M parameters (SD1.5: 860 M), float16; the 1280-channel res blocks
the adapter's deep features need are most of it (the standard layout with fewer res blocks on some levels does
not fit; moving blocks between levels, e.g. [2, 3, 2, 1], saves under 10 %). Measured on 2 busy cores: build 96 s
wall (24 s CPU), file 1.44 GB (UNet 1.31 GB, CLIP-L float8 0.12 GB), peak RSS 4.4 GB; loading it and a 3-step
euler run at 64 px with cfg take about 2 min and 20 s.

The adapter is the full ``Adapter`` form (``conv_in`` + ``body.*``, no ``in_conv`` at ``body.0``) in the key layout
``comfy.controlnet.load_t2i_adapter`` detects, RGB hint (``conv_in`` takes 3 · 8² = 192 channels, which is not
an SDXL adapter's 256 or 768), 1 × 1 second convolutions and average-pool downsampling as the SD1.5 v2 adapters
have (``ksize=1``, ``use_conv=False``); 77 M parameters, float16 (155 MB), built in 4 s. Both files are drawn
with the init rules of :mod:`..demo.tiny_checkpoint` from one seed: the same seed gives byte-identical files.
ComfyUI must be importable (``hosts.comfy.standalone.prepare_comfy_import``) before the build functions run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..demo.tiny_checkpoint import SD15_FULL_UNET_CONFIG, _init_module_, build_tiny_sd15_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

#: Bump when a recipe changes, so cached files built by an older recipe are not reused.
RECIPE_VERSION = 1

#: Width of the adapter's ``conv_in``: SD1.5's ``model_channels``, the only one ComfyUI detects as SD1.5.
ADAPTER_CHANNELS = 320

#: The adapter's hint: RGB, pixel-unshuffled by 8 (``Adapter.unshuffle_amount`` of the SD1.5 form).
HINT_CHANNELS = 3

#: The SD1.5-detected UNet the adapter fits (see the module docstring): full SD1.5's levels and res blocks with half
#: its transformers and none in the middle block. ``transformer_depth`` lists one entry per input res block and
#: ``transformer_depth_output`` one per output block, as ``model_detection`` reads them back.
T2I_UNET_CONFIG: dict[str, object] = {
    **SD15_FULL_UNET_CONFIG,
    "transformer_depth": [1, 0, 1, 0, 1, 0, 0, 0],
    "transformer_depth_output": [1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0],
    "transformer_depth_middle": -1,
}

CHECKPOINT_NAME = f"tiny-sd15-t2i-unet-v{RECIPE_VERSION}.safetensors"
ADAPTER_NAME = f"tiny-t2i-adapter-sd15-v{RECIPE_VERSION}.safetensors"


def build_tiny_t2i_adapter(path: Path, seed: int = 0) -> Path:
    """Write the random-weight SD1.5 T2I-Adapter to ``path`` (safetensors, float16). Needs ComfyUI importable."""
    import comfy.t2i_adapter.adapter
    import torch

    start = time.perf_counter()
    c = ADAPTER_CHANNELS
    adapter = comfy.t2i_adapter.adapter.Adapter(channels=[c, 2 * c, 4 * c, 4 * c], nums_rb=2,
                                                cin=HINT_CHANNELS * 8 * 8, ksize=1, sk=True, use_conv=False, xl=False)
    _init_module_(adapter, torch.Generator(device="cpu").manual_seed(seed))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in adapter.state_dict().items()}
    save_checkpoint(state, Path(path), f"tiny-t2i-adapter-sd15 v{RECIPE_VERSION} seed {seed}")
    logger.info("built tiny T2I-Adapter %s (%d tensors, %.1f MB) in %.1f s", path, len(state),
                Path(path).stat().st_size / 1e6, time.perf_counter() - start)
    return Path(path)


def ensure_tiny_t2i(cache_dir: Path) -> tuple[Path, Path]:
    """``(checkpoint, adapter)`` in ``cache_dir``, each built (seed 0) only when it is not there yet.

    The checkpoint is :func:`~..demo.tiny_checkpoint.build_tiny_sd15_checkpoint` with :data:`T2I_UNET_CONFIG`
    (same text encoder, VAE and init rules as the repo's tiny SD1.5 checkpoint).
    """
    checkpoint, adapter = Path(cache_dir) / CHECKPOINT_NAME, Path(cache_dir) / ADAPTER_NAME
    if not checkpoint.is_file():
        build_tiny_sd15_checkpoint(checkpoint, seed=0, unet_config=T2I_UNET_CONFIG)
    if not adapter.is_file():
        build_tiny_t2i_adapter(adapter, seed=0)
    return checkpoint, adapter

