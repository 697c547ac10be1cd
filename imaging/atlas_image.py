"""Image preparation for the shape-atlas fit (:mod:`.atlas`): a CheXmask-style square frame, grey-level ranks,
and blurred pyramid levels with their row-wise integrals, sampled at outline points."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F


def square_frame(image: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[H, W]`` to a centred square (as CheXmask did) and resize to ``size``: image and valid area."""
    h, w = image.shape
    side = max(h, w)
    y0, x0 = (side - h) // 2, (side - w) // 2
    stack = torch.zeros(2, side, side)
    stack[0, y0 : y0 + h, x0 : x0 + w] = image
    stack[1, y0 : y0 + h, x0 : x0 + w] = 1.0
    small = F.interpolate(stack[None], size=(size, size), mode="area")[0]
    return small[0], small[1]


def equalise(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Grey-level ranks (0–1) over the valid area, padding 0: exposure and window no longer matter."""
    inside = valid > 0.5
    ref = image[inside].sort().values
    ranks = torch.searchsorted(ref, image.reshape(-1).contiguous()).reshape(image.shape).float() / max(ref.numel(), 1)
    return ranks * inside


def pyramid_level(base: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[2, S, S]``: the blurred image and its row-wise integral ``∫₀ˣ I dx`` (region means via Green)."""
    size = base.shape[-1]
    sigma_px = sigma * size
    k = 2 * int(3 * sigma_px + 0.5) + 1
    img = kornia.filters.gaussian_blur2d(base[None, None], (k, k), (sigma_px, sigma_px), border_type="replicate")[0, 0]
    # Cumulative sum up to the pixel centre (half of the own pixel), in frame units.
    integral = (torch.cumsum(img, dim=1) - img / 2) / size
    return torch.stack([img, integral])


def sample_points(level: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``[C, N]`` of ``[C, S, S]`` at frame points ``[N, 2]`` (x, y in [0, 1])."""
    grid = (pts * 2 - 1).reshape(1, 1, -1, 2)
    out = F.grid_sample(level[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(level.shape[0], -1)
