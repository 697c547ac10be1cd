"""Organ masks from torchxrayvision's chest anatomy PSPNet (ChestX-Det, 14 structures), weights from a file.

``torchxrayvision.baseline_models.chestx_det.PSPNet()`` downloads its weights when constructed, so this
module builds the same network from its building block (the ptsemseg ``pspnet`` class torchxrayvision
ships) and loads a weight file the user placed, with ``torch.load(weights_only=True)`` or safetensors.
Nothing here downloads anything.

Pre-processing follows torchxrayvision: grey values in [0, 1] (its [-1024, 1024] range mapped back), the
grey channel repeated to RGB, ImageNet normalisation, 512×512 input; the outputs are per-structure logits
(multi-label: a sigmoid each). A non-square radiograph is padded to a centred square first, so anatomy is
not stretched; the probabilities are cropped back and resized to the radiograph's own size.

ChestX-Det's "Left"/"Right" are the patient's sides (its demo's "Left Lung" mask lies on the image's
right of a PA view, beside the "L" marker), the same convention as :class:`OrganMasks`.

torchxrayvision is optional (``pip install "cxr-counterfactual[seg]"``); it is imported only when a model
is built.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.organs import OrganMasks, normalise_name
from ..errors import CXRInputError
from .weight_files import load_matching, read_tensors, require_torchxrayvision

LOG = logging.getLogger(__name__)

# torchxrayvision's PSPNet.targets, in output-channel order.
PSPNET_TARGETS = (
    "Left Clavicle", "Right Clavicle", "Left Scapula", "Right Scapula", "Left Lung", "Right Lung",
    "Left Hilus Pulmonis", "Right Hilus Pulmonis", "Heart", "Aorta", "Facies Diaphragmatica",
    "Mediastinum", "Weasand", "Spine",
)
# Our organ names: the targets normalised ("Left Lung" → "left_lung"); sides are the patient's in both.
ORGAN_NAMES = tuple(normalise_name(t) for t in PSPNET_TARGETS)
# The structures without which the masks are useless for this pack: an image where the model finds none
# of them is not a frontal chest radiograph (or the threshold is far too high).
REQUIRED = ("right_lung", "left_lung", "heart")
OFFICIAL_WEIGHTS = "pspnet_chestxray_best_model_4.pth"
OFFICIAL_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{OFFICIAL_WEIGHTS}"
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_pspnet(
    n_classes: int = len(PSPNET_TARGETS), block_config: tuple[int, ...] = (3, 4, 23, 3)
) -> torch.nn.Module:
    """The ChestX-Det PSPNet architecture (ResNet-101 encoder by default), with untrained weights.

    Args:
        n_classes: output channels (14 for ChestX-Det).
        block_config: bottleneck blocks per residual stage.
    """
    require_torchxrayvision("the PSPNet segmentation")
    # The ptsemseg module only defines layers; torchxrayvision's PSPNet wrapper is what downloads.
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    return pspnet(n_classes=n_classes, block_config=list(block_config))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (``weights_only``: no code runs) or ``.safetensors`` file.

    Accepts the plain state dict torchxrayvision publishes, ChestX-Det's ``{"model_state": ...}`` and
    DataParallel's ``module.`` prefixes.

    Raises:
        CXRInputError: the file cannot be read as weights.
    """
    return read_tensors(path, fix=f"Put torchxrayvision's {OFFICIAL_WEIGHTS} (or the same weights as .safetensors) "
                        "there.")


def _block_config(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Blocks per residual stage, counted from the keys (``res_block4.layers.22...`` → 23)."""
    counts = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"res_block([2-5])\.layers\.(\d+)\.", key)
        if m:
            stage = int(m.group(1)) - 2
            counts[stage] = max(counts[stage], int(m.group(2)) + 1)
    return tuple(counts)


def load_pspnet(path: Path) -> torch.nn.Module:
    """The PSPNet with the weights of ``path``, in eval mode on the CPU.

    Raises:
        CXRInputError: torchxrayvision missing, unreadable file, or weights of another network.
    """
    require_torchxrayvision("the PSPNet segmentation")
    state = read_state_dict(path)
    head = state.get("classification.weight")
    if head is None or head.shape[0] != len(PSPNET_TARGETS) or 0 in _block_config(state):
        found = "no PSPNet head" if head is None else f"{head.shape[0]} output classes"
        raise CXRInputError(
            f"'{path.name}' is not the 14-structure ChestX-Det PSPNet ({found}).",
            fix=f"Use torchxrayvision's {OFFICIAL_WEIGHTS} ({OFFICIAL_URL}).",
        )
    model = build_pspnet(len(PSPNET_TARGETS), _block_config(state))
    return load_matching(model, state, path, "the ChestX-Det PSPNet", fix=f"Use torchxrayvision's {OFFICIAL_WEIGHTS}.")


def _to_grey(image: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` or ``[H, W, C]`` in [0, 1] → ``[H, W]`` float grey."""
    if image.ndim == 3:
        image = image[..., :3].float().mean(-1)
    if image.ndim != 2:
        raise CXRInputError(f"expected one image [H, W(, C)], got shape {tuple(image.shape)}.", fix="Use batch 1.")
    return image.float()


def segment_probabilities(
    model: torch.nn.Module, image: torch.Tensor, input_size: int = INPUT_SIZE, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-structure probabilities ``[14, H, W]`` at the radiograph's own size (order of ``ORGAN_NAMES``).

    Args:
        model: a loaded PSPNet (see :func:`load_pspnet`); moved to ``device``.
        image: ``[H, W]`` or ``[H, W, C]`` radiograph in [0, 1] (bright = dense).
        input_size: the network's input side (512 for the published weights).
        device: where the network runs.
    """
    grey = _to_grey(image).cpu()
    h, w = grey.shape
    side = max(h, w)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square = F.pad(grey, (x0, side - w - x0, y0, side - h - y0), value=0.0)  # black, like collimation
    x = F.interpolate(square[None, None], size=(input_size, input_size), mode="bilinear", antialias=True)
    x = (x.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    model = model.to(device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ptsemseg calls the deprecated F.upsample
        logits = model(x.to(device)).float().cpu()
    # Sample the network's grid at the centre of every native pixel: crop and resize in one step, with no
    # side×side intermediate (a 3000-pixel radiograph would need 14 × 9 M floats for it).
    gx = (torch.arange(w) + x0 + 0.5) / side * 2 - 1
    gy = (torch.arange(h) + y0 + 0.5) / side * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    return torch.sigmoid(F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)[0])


def probabilities_to_masks(probs: torch.Tensor, threshold: float) -> OrganMasks:
    """Threshold ``[14, H, W]`` probabilities into organ masks; structures not found are left out.

    Raises:
        CXRInputError: a lung or the heart was not found (not a frontal chest radiograph, or the
            threshold is too high).
    """
    masks = {name: (p >= threshold).float() for name, p in zip(ORGAN_NAMES, probs, strict=True)}
    missing = [n for n in REQUIRED if float(masks[n].max()) == 0]
    if missing:
        raise CXRInputError(
            f"the segmentation found no {', '.join(missing)} at threshold {threshold:.2f}.",
            input_name="image",
            fix="Use a frontal (PA/AP) chest radiograph with dark lungs, or lower the threshold.",
        )
    absent = [n for n, m in masks.items() if float(m.max()) == 0]
    if absent:
        LOG.warning("PSPNet found no %s at threshold %.2f: left out of the organ masks", ", ".join(absent), threshold)
    return OrganMasks.from_dict({n: m for n, m in masks.items() if n not in absent})


def segment_organs(
    model: torch.nn.Module,
    image: torch.Tensor,
    threshold: float = 0.5,
    input_size: int = INPUT_SIZE,
    device: torch.device | str = "cpu",
) -> OrganMasks:
    """Organ masks of one radiograph at its own size (see :func:`segment_probabilities`)."""
    return probabilities_to_masks(segment_probabilities(model, image, input_size, device), threshold)
