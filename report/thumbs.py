"""Small inline images for the report: source / edit / |difference| thumbnails as data URIs.

Images are read with the pack's radiograph reader (PNG, JPEG or DICOM), shrunk to :data:`THUMB_PX` on the long
side (area averaging) and encoded as JPEG: a few kB each, so 200 rows stay a file of a few MB.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..imaging.radiograph import read_radiograph

THUMB_PX = 128
JPEG_QUALITY = 80


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _grey(path: Path) -> np.ndarray:
    return read_radiograph(path).pixels.numpy()


def _shrink(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32)


def _jpeg(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8), mode="L").save(
        buffer, "JPEG", quality=JPEG_QUALITY)
    return data_uri(buffer.getvalue(), "image/jpeg")


@dataclass(frozen=True)
class Thumbs:
    """Data URIs of one row (source and difference None when the source was not found) and a note."""

    edit: str
    source: str | None
    difference: str | None
    note: str


def thumbnails(edit: Path, source: Path | None) -> Thumbs:
    """Thumbnails of ``edit`` and ``source``; the difference is |edit − source| on the edit's thumbnail grid,
    stretched so its largest value is white (the note gives that value, in [0, 1] grey units)."""
    edited = _grey(edit)
    h, w = edited.shape
    scale = THUMB_PX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small_edit = _shrink(edited, size)
    if source is None:
        return Thumbs(_jpeg(small_edit), None, None, "source image not found")
    original = _grey(source)
    note = "" if original.shape == edited.shape else (
        f"source {original.shape[1]}×{original.shape[0]} vs edit {w}×{h}: resampled to one grid")
    small_source = _shrink(original, size)
    difference = np.abs(small_edit - small_source)
    top = float(difference.max())
    note = "; ".join(x for x in (note, f"|difference| white at {top:.3g}") if x)
    return Thumbs(_jpeg(small_edit), _jpeg(small_source), _jpeg(difference / top if top > 0 else difference), note)
