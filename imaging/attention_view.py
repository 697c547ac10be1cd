"""Pictures of captured attention: heat maps over the radiograph, labelled grids, a share-per-step plot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .overlay import sized_font

PLOT_COLOURS = [(230, 80, 60), (60, 160, 230), (80, 200, 90), (240, 180, 40), (180, 90, 220)]


def heat_colours(x: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` values in [0, 1] → ``[H, W, 3]`` (a dark-blue → red → yellow ramp, readable on grey)."""
    r = (1.5 * x).clamp(0, 1)
    g = (1.5 * x - 0.5).clamp(0, 1)
    b = (0.6 - 1.2 * x).clamp(0, 1) * (x > 0.02)
    return torch.stack([r, g, b], dim=-1)


def overlay_heat(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """``[H, W, 3]`` radiograph with a map (any grid of the same aspect) normalised to its max, overlaid."""
    h, w = image.shape[:2]
    m = F.interpolate(heat[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    m = (m / m.max().clamp_min(1e-12)).clamp(0, 1)
    a = (alpha * m)[..., None]
    return (image[..., :3].float() * (1 - a) + heat_colours(m) * a).clamp(0, 1)


def labelled_grid(panels: Sequence[Sequence[torch.Tensor]], row_labels: Sequence[str],
                  col_labels: Sequence[str]) -> torch.Tensor:
    """Rows × columns of equal-size ``[H, W, 3]`` panels with a label strip on top of each column/row."""
    h, w = panels[0][0].shape[:2]
    size = max(10, w // 14)
    top, left = size + 8, max(60, size * 6)
    canvas = Image.new("RGB", (left + w * len(col_labels), top + h * len(row_labels)), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + 4, 2), label, fill=(240, 240, 240), font=sized_font(size))
    for r, row in enumerate(panels):
        draw.text((4, top + r * h + 4), row_labels[r], fill=(240, 240, 240), font=sized_font(size))
        for c, panel in enumerate(row):
            img = Image.fromarray((panel.numpy() * 255).round().astype(np.uint8))
            canvas.paste(img, (left + c * w, top + r * h))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def share_plot(series: dict[str, list[float]], width: int = 640, height: int = 360) -> torch.Tensor:
    """A line plot of the in-target attention share per captured step (0–1), one line per run."""
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    x0, r, t, b = 56, width - 16, 28, height - 40
    draw.rectangle([x0, t, r, b], outline=(60, 60, 60))
    font = sized_font(13)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = b - v * (b - t)
        draw.line([x0 - 4, y, x0, y], fill=(60, 60, 60))
        draw.text((8, y - 7), f"{v:.2f}", fill=(40, 40, 40), font=font)
    draw.text((x0, height - 22), "captured step (early to late)", fill=(40, 40, 40), font=font)
    draw.text((x0, 6), "pathology attention share inside the target", fill=(40, 40, 40), font=font)
    longest = max((len(v) for v in series.values()), default=1)
    for i, (name, values) in enumerate(series.items()):
        colour = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        pts = [(x0 + (j + 0.5) * (r - x0) / longest, b - float(v) * (b - t)) for j, v in enumerate(values)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((r - 150, t + 6 + 16 * i), name, fill=colour, font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
