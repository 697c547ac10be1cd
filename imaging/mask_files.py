"""Organ masks from files: one image per organ, a label/colour map, or polygons (JSON)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from ..attention.organs import OrganMasks, normalise_name
from ..errors import CXRInputError


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise CXRInputError(f"file '{path.name}' does not exist.", fix="Upload it or pick an existing file.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise CXRInputError(
            f"'{path.name}' is not a readable image ({type(err).__name__}).",
            fix="Use a PNG/JPEG/TIFF mask (white = inside the organ).",
        ) from None
    return img


def read_mask_image(path: Path, threshold: float = 0.5) -> torch.Tensor:
    """One organ's mask from an image file: ``[H, W]`` float {0, 1}, white (≥ threshold) = inside.

    An image with a non-trivial alpha channel and flat colour is read by its alpha (a mask painted in an
    editor on a transparent layer); otherwise by its grey value. 16-bit files are scaled by their depth.
    """
    img = _open(path)
    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha, grey = rgba[..., 3], rgba[..., :3].mean(-1)
        values = alpha if alpha.min() < 1.0 and np.ptp(grey) == 0 else grey * alpha
    elif img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.asarray(img, dtype=np.float32)
        values = arr / (65535.0 if arr.max() > 255 else 255.0)
    else:
        values = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((values >= threshold).astype(np.float32))


_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


def parse_label_spec(spec: str) -> dict[str, int | tuple[int, int, int]]:
    """``"right_lung=1, left_lung=2, heart=#0000ff"`` → ``{name: grey value or RGB}``."""
    out: dict[str, int | tuple[int, int, int]] = {}
    for part in re.split(r"[,;\n]+", spec):
        if not part.strip():
            continue
        if "=" not in part and ":" not in part:
            raise CXRInputError(
                f"'{part.strip()}' is not 'organ=value'.",
                fix="Write e.g. right_lung=1, left_lung=2, heart=3 (or heart=#ff0000 for a colour map).",
            )
        name, value = re.split(r"[=:]", part, maxsplit=1)
        value = value.strip()
        hexm = _HEX.match(value)
        if hexm and (value.startswith("#") or not value.isdigit()):
            h = hexm.group(1)
            out[normalise_name(name)] = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
        elif value.isdigit():
            out[normalise_name(name)] = int(value)
        else:
            raise CXRInputError(f"'{value}' is neither a label number nor a #rrggbb colour.", fix="Fix the mapping.")
    if not out:
        raise CXRInputError("the label mapping is empty.", fix="Write e.g. right_lung=1, left_lung=2, heart=3.")
    return out


def read_label_map(path: Path, spec: str) -> OrganMasks:
    """Organs from one label map (grey values) or colour map (``#rrggbb``), per ``spec``."""
    mapping = parse_label_spec(spec)
    try:
        img = _open(path)
    except CXRInputError as err:  # the file is at fault, not the mapping
        raise CXRInputError(err.problem, input_name="label_map",
                            fix="Use a lossless label or colour map image (PNG).") from None
    rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    grey = np.asarray(img.convert("I"), dtype=np.int64) if img.mode not in ("RGB", "RGBA", "P") else None
    masks: dict[str, torch.Tensor] = {}
    for name, value in mapping.items():
        if isinstance(value, tuple):
            hit = np.all(rgb == np.array(value, dtype=np.int32), axis=-1)
        elif grey is not None:
            hit = grey == value
        elif img.mode == "P":
            hit = np.asarray(img, dtype=np.int64) == value  # palette index
        else:
            hit = np.all(rgb == value, axis=-1)  # a grey label written as RGB
        if not hit.any():
            raise CXRInputError(
                f"no pixel of '{path.name}' has the value {value} given for '{name}'.",
                fix="Check the mapping against the label map's values/colours.",
            )
        masks[name] = torch.from_numpy(hit.astype(np.float32))
    return OrganMasks.from_dict(masks)


def polygons_to_masks(polygons: dict[str, list[list[float]]], height: int, width: int) -> OrganMasks:
    """Rasterise ``{organ: [[x, y], ...]}`` (pixel coordinates) to masks on ``height×width``."""
    masks: dict[str, torch.Tensor] = {}
    for name, points in polygons.items():
        if len(points) < 3:
            raise CXRInputError(f"the outline of '{name}' has fewer than 3 points.", fix="Give a closed polygon.")
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=255)
        masks[name] = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return OrganMasks.from_dict(masks)


def read_polygon_json(path: Path) -> OrganMasks:
    """Masks from a JSON file ``{"width": W, "height": H, "organs": {name: [[x, y], ...]}}``."""
    try:
        spec = json.loads(Path(path).read_text())
        return polygons_to_masks(spec["organs"], int(spec["height"]), int(spec["width"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CXRInputError(
            f"'{Path(path).name}' is not an organ-outline JSON ({type(err).__name__}: {err}).",
            fix='Use {"width": W, "height": H, "organs": {"left_lung": [[x, y], ...]}}.',
        ) from None
