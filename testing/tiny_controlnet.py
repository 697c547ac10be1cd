"""A small random-weight ControlNet for the tiny SD1.5 checkpoint, in the key layout ComfyUI's ControlNetLoader detects.

ComfyUI's ``comfy.controlnet.load_controlnet_state_dict`` takes a file whose keys start with
``control_model.zero_convs.0.0.weight`` as an original (lllyasviel) ControlNet, reads its UNet config back from the
``control_model.*`` keys (``model_detection.model_config_from_unet``: here SD1.5's signature, as in the tiny checkpoint)
and its hint channels from ``input_hint_block.0.weight``, and builds ``comfy.cldm.cldm.ControlNet``. This recipe builds
that very module from the tiny checkpoint's :data:`~..demo.tiny_checkpoint.UNET_CONFIG` with three hint channels (an
RGB image, as ``ControlNetApplyAdvanced`` passes it) and draws every weight with the checkpoint's init rules.

The zero convolutions (``zero_convs.*``, ``middle_block_out``) are zero in an untrained ControlNet, which would make the
ControlNet a no-op and every test with it blind; trained ControlNets are non-zero there, so they are drawn with
:data:`ZERO_CONV_STD` (a residual of roughly a tenth of the UNet's activations). Seeded: same seed, byte-identical
file. Float16, ≈ 40 % of the tiny checkpoint's UNet (the encoder and middle block, plus the hint encoder).
"""

from __future__ import annotations

from pathlib import Path

from ..demo.tiny_checkpoint import UNET_CONFIG, _init_module_, _prefixed, save_checkpoint

#: Bump when the recipe changes, so cached files built by an older recipe are not reused.
RECIPE_VERSION = 1

#: File name used by :func:`ensure_tiny_controlnet` inside its cache folder.
CONTROLNET_NAME = f"tiny-sd15-controlnet-v{RECIPE_VERSION}.safetensors"

#: Std of the 1×1 zero convolutions' weights: over 320 channels a residual ≈ 0.005·√320 ≈ 0.09 of the activations.
ZERO_CONV_STD = 0.005

HINT_CHANNELS = 3
_PREFIX = "control_model."


def build_tiny_controlnet(path: Path, seed: int = 0) -> Path:
    """Write the tiny ControlNet to ``path`` (safetensors, float16, atomically) and return ``path``.

    ComfyUI must be importable (see :func:`~..hosts.comfy.standalone.prepare_comfy_import`).

    Args:
        path: The ``.safetensors`` file to write; its folder is created if needed.
        seed: Seed of the one generator that draws every weight (registration order, then the zero convs).
    """
    import comfy.ops
    import torch
    from comfy.cldm.cldm import ControlNet

    generator = torch.Generator(device="cpu").manual_seed(seed)
    net = ControlNet(**UNET_CONFIG, hint_channels=HINT_CHANNELS, dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    _init_module_(net, generator)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")) and name.endswith(".weight"):
                param.normal_(0.0, ZERO_CONV_STD, generator=generator)
    state = _prefixed(net.state_dict(), _PREFIX, torch.float16)
    return save_checkpoint(state, Path(path), f"tiny-sd15-controlnet v{RECIPE_VERSION} seed {seed}")


def ensure_tiny_controlnet(cache_dir: Path) -> Path:
    """The tiny ControlNet in ``cache_dir``, built (seed 0) only when it is not there yet."""
    path = Path(cache_dir) / CONTROLNET_NAME
    return path if path.is_file() else build_tiny_controlnet(path, seed=0)
