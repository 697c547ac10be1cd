"""Showing and saving edit metrics: the difference heat map, the UI table, JSON and CSV text."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import kornia
import numpy as np
import torch
from PIL import Image, ImageDraw

from .metrics import DEFINITIONS, MetricsReport
from .overlay import sized_font

BRIGHTER = torch.tensor((0.95, 0.25, 0.15))  # edit denser (brighter) than the source
DARKER = torch.tensor((0.15, 0.45, 1.00))  # edit more lucent (darker)
OUTLINE = torch.tensor((1.00, 0.80, 0.10))  # the edit region's border (the preview's "edit" colour)
GENERATOR = "cxr_counterfactual"
PER_PATHOLOGY = re.compile(r"classifier_(?!target_)\w+_(source|edit)")


def difference_heat_map(source: torch.Tensor, edited: torch.Tensor, edit: torch.Tensor,
                        scale: float = 0.0) -> torch.Tensor:
    """The signed change over the dimmed source: ``[H, W, 3]`` in [0, 1].

    Args:
        source, edited: ``[1, 1, H, W]`` grey images.
        edit: ``[H, W]`` bool edit region, outlined in yellow.
        scale: |Δ| shown at full colour; 0 = the largest |Δ| of this pair (written on the map).
    """
    delta = (edited - source)[0, 0]
    top = float(delta.abs().max())
    scale = scale if scale > 0 else top
    base = (0.6 * source[0, 0])[..., None].expand(-1, -1, 3)
    if scale > 0:
        alpha = (delta.abs() / scale).clamp(0, 1)[..., None]
        colour = torch.where(delta[..., None] >= 0, BRIGHTER, DARKER)
        base = base * (1 - alpha) + colour * alpha
    h, w = delta.shape
    width = max(1, round(min(h, w) / 256))
    # Morphological gradient (dilation − erosion) of the region: a contour about 2·width pixels wide.
    kernel = torch.ones(2 * width + 1, 2 * width + 1)
    border = kornia.morphology.gradient(edit.float()[None, None], kernel)[0, 0][..., None]
    out = base * (1 - border) + OUTLINE * border
    return _legend(out.clamp(0, 1), f"edit - source, full colour at |d| = {scale:.3g}")


def _legend(image: torch.Tensor, text: str) -> torch.Tensor:
    h, w = image.shape[:2]
    pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    size = max(9, min(h, w) // 32)
    font = sized_font(size)
    pad = max(2, size // 3)
    right = max(pad + size * 12, int(draw.textbbox((pad, 0), text, font=font)[2]))
    draw.rectangle([0, 0, right + pad, 3 * pad + 2 * size], fill=(0, 0, 0))  # readable over bright bone
    swatches = ((BRIGHTER, "brighter"), (DARKER, "darker"))
    x = pad
    for colour, label in swatches:
        draw.rectangle([x, pad, x + size, pad + size], fill=tuple(int(255 * v) for v in colour.tolist()))
        draw.text((x + size + pad, pad), label, fill=(240, 240, 240), font=font)
        x += size * 6
    draw.text((pad, 2 * pad + size), text, fill=(240, 240, 240), font=font)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def format_table(report: MetricsReport) -> str:
    """The metrics as aligned text (one column per image pair), for the node's UI."""
    rows = report.rows()
    # The 36 per-pathology probabilities would bury the rest: the table keeps the target's (JSON/CSV hold all).
    keys = [k for k in rows[0] if k != "image" and not PER_PATHOLOGY.fullmatch(k)]
    label_width = max(len(k) for k in keys) + 2
    lines = ["metric".ljust(label_width) + "".join(f"image {i}".rjust(12) for i in range(len(rows)))]
    for key in keys:
        lines.append(key.ljust(label_width) + "".join(_fmt(r.get(key)).rjust(12) for r in rows))
    if report.attention_threshold is not None:
        lines.append(f"(attention binarised at {report.attention_threshold:g} x its maximum)")
    if report.classifier is not None:
        c = report.classifier
        lines.append(f"classifier target = {c.target} ({c.weights}, "
                     f"{'operating-point calibrated' if c.calibrated else 'uncalibrated sigmoid'} probabilities; "
                     "off-target = largest |change| over the other 17; all 18 in the JSON/CSV)")
    lines.append("keep = pixels outside the edit region; PSNR in dB, capped at 100; MAD = mean |edit - source|")
    return "\n".join(lines)


def to_json(report: MetricsReport) -> str:
    """The report as JSON: rows, attention settings, and the exact definition of every metric."""
    body: dict[str, object] = {
        "generator": GENERATOR,
        "synthetic": "metrics of a synthetic counterfactual edit, not of a real radiograph",
        "images": report.rows(),
        "attention_threshold": report.attention_threshold,
        "definitions": DEFINITIONS,
    }
    if report.classifier is not None:
        body["classifier"] = report.classifier.as_dict()
    return json.dumps(body, indent=2, allow_nan=False)


def to_csv(report: MetricsReport) -> str:
    """One row per image pair; columns are the union of every row's metrics (empty = not measured)."""
    rows = report.rows()
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()
