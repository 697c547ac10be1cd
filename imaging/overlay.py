"""Draw organ masks over a radiograph: each organ in its own colour, with an outline and a legend."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..attention.organs import OrganMasks

# Fixed colours for the known organs (stable across previews); others cycle through the palette.
ORGAN_COLOURS: dict[str, tuple[float, float, float]] = {
    "right_lung": (0.95, 0.30, 0.25),
    "left_lung": (0.25, 0.80, 0.35),
    "heart": (0.25, 0.50, 1.00),
    "edit": (1.00, 0.75, 0.10),
    "keep": (0.55, 0.55, 0.60),
}
_PALETTE = [(0.85, 0.35, 0.85), (0.10, 0.80, 0.85), (0.95, 0.60, 0.20), (0.60, 0.45, 0.95), (0.80, 0.85, 0.20)]


def organ_colour(name: str, index: int) -> tuple[float, float, float]:
    return ORGAN_COLOURS.get(name, _PALETTE[index % len(_PALETTE)])


def _outline(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels inside the mask within ``width`` of its border (a thin contour, [H, W])."""
    inside = (mask >= 0.5).float()[None, None]
    k = 2 * width + 1
    eroded = -F.max_pool2d(-inside, k, stride=1, padding=width)
    return (inside - eroded)[0, 0].clamp(0, 1)


def overlay_organs(image: torch.Tensor, masks: OrganMasks, opacity: float = 0.35, legend: bool = True) -> torch.Tensor:
    """``[H, W, 3]`` radiograph (values in [0, 1]) with every organ tinted and outlined.

    The masks are resampled to the image's grid (same aspect ratio required, see
    :meth:`OrganMasks.resampled`).
    """
    h, w = int(image.shape[0]), int(image.shape[1])
    grid = masks.resampled(h, w, mode="bilinear" if (h > masks.height) else "area")
    out = image[..., :3].float().cpu().clone()
    line = max(1, round(min(h, w) / 256))
    for i, name in enumerate(grid.names):
        m = grid.data[i]
        colour = torch.tensor(organ_colour(name, i))
        a = (opacity * m)[..., None]
        out = out * (1 - a) + colour * a
        edge = _outline(m, line)[..., None]
        out = out * (1 - edge) + colour * edge
    if legend:
        out = _draw_legend(out, grid.names)
    return out.clamp(0, 1)


def sized_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (no font file needed); the fixed small one on Pillow < 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _draw_legend(image: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    h, w = image.shape[:2]
    pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    size = max(10, min(h, w) // 40)
    font = sized_font(size)
    pad = size // 2
    for i, name in enumerate(names):
        y = pad + i * (size + pad)
        c = tuple(int(255 * v) for v in organ_colour(name, i))
        draw.rectangle([pad, y, pad + size, y + size], fill=c)
        draw.text((2 * pad + size, y), name, fill=c, font=font)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
