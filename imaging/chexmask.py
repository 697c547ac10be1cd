"""CheXmask annotations: find one radiograph's row in a (multi-gigabyte) CSV and decode its organ masks.

CheXmask (Gaggion et al., PhysioNet doi:10.13026/dx54-8351; code: github.com/ngaggion/CheXmask-Database,
GPL-3.0) has one CSV per source dataset. Facts verified on real rows: masks are RLE ``start length`` pairs
with 1-based starts over the ``Height×Width`` mask flattened row by row; ``Landmarks`` holds 120 contour
points (right lung 0–43, left lung 44–93, heart 94–119) as a flat list, JSON or a numpy repr (which spans
several lines inside one quoted field); ``Right``/``Left`` are the patient's sides. ``Height``/``Width`` may
be float strings or empty (then the 1024×1024 preprocessed grid applies).

A CSV is never read whole: :class:`CheXmaskIndex` streams it once, keeps id → byte offset in memory
(cached by path, mtime and size; nothing is written to disk) and later seeks to one record.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..attention.organs import OrganMasks
from ..errors import CXRInputError
from .mask_files import polygons_to_masks

log = logging.getLogger(__name__)

ID_COLUMNS = ("dicom_id", "Path", "Image Index", "ImageID", "image_id")
_DATASET_OF = {"dicom_id": "MIMIC-CXR-JPG", "Path": "CheXpert", "Image Index": "ChestX-Ray8", "image_id": "VinDr-CXR"}
ORGAN_COLUMNS = {"right_lung": "Right Lung", "left_lung": "Left Lung", "heart": "Heart"}
LANDMARK_SLICES = {"right_lung": slice(0, 44), "left_lung": slice(44, 94), "heart": slice(94, 120)}
N_LANDMARKS = 120
DICE_MEAN, DICE_MAX = "Dice RCA (Mean)", "Dice RCA (Max)"
PREPROCESSED_SIZE = 1024
DEFAULT_MIN_DICE = 0.7  # the CheXmask authors' advice: rows below it are usually discarded
# DataPreparation/mimic.py and padchest.py crop black borders before padding; the other datasets do not.
BORDER_CROPPED = ("MIMIC-CXR-JPG", "PadChest")
BORDER_CROP_MODES = ("auto", "undo", "ignore")
INDEX_CACHE_SIZE = 4
# A line or record longer than this is no CheXmask row (one is ~20 KB; a native-size one < 1 MB): an unclosed
# quote or a binary file would otherwise pull the rest of a gigabyte file into memory.
MAX_RECORD_BYTES = 64 << 20

_DIGITS = re.compile(r"[0-9]+")
_RLE_TEXT = re.compile(r"[0-9\s]*")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_RLE_FIX = "Re-export the CSV from the CheXmask files, or clear this cell to fall back to the landmarks."


def decode_rle(rle: str, height: int, width: int) -> np.ndarray:
    """A CheXmask RLE as a ``[height, width]`` bool mask.

    Args:
        rle: ``start length`` pairs, space-separated; starts 1-based over the mask flattened row by row.
        height, width: the mask's size (the row's Height and Width).

    Raises:
        CXRInputError: odd count, a non-number, a start below 1, a length below 1 or a run past the end.
    """
    tokens = rle.split()
    if not _RLE_TEXT.fullmatch(rle):  # one C-speed check; the token loop only finds the culprit
        bad = next((t for t in tokens if not _DIGITS.fullmatch(t)), rle)
        raise CXRInputError(f"the mask RLE holds '{bad[:24]}', not a whole number.", fix=_RLE_FIX)
    if len(tokens) % 2:
        raise CXRInputError(f"the mask RLE has an odd number of values ({len(tokens)}).", fix=_RLE_FIX)
    total = height * width
    past_end = CXRInputError(f"a run of the mask RLE ends past the {height}×{width} mask.", fix=_RLE_FIX)
    if tokens and max(map(len, tokens)) > 15:  # past any mask, and int64 would overflow
        raise past_end
    runs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    starts, lengths = runs[:, 0] - 1, runs[:, 1]
    if (starts < 0).any() or (lengths < 1).any():
        raise CXRInputError("the mask RLE has a start of 0 or a run of length 0 (starts are 1-based).", fix=_RLE_FIX)
    ends = starts + lengths
    if (ends > total).any():
        raise past_end
    # +1 at each run start, -1 after its end: the running sum is > 0 inside a run (overlaps tolerated).
    edges = np.bincount(starts, minlength=total + 1) - np.bincount(ends, minlength=total + 1)
    return (np.cumsum(edges[:total]) > 0).reshape(height, width)


def encode_rle(mask: np.ndarray) -> str:
    """The CheXmask RLE of a mask (nonzero = inside), as ``get_RLE_from_mask`` in DataPostprocessing/utils.py."""
    pixels = np.concatenate([[0], (np.asarray(mask).reshape(-1) != 0).astype(np.int8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(int(r)) for r in runs)


def parse_landmarks(text: str) -> np.ndarray:
    """The 120 ``(x, y)`` contour points of a row: flat ``x,y,...``, JSON or a numpy repr (any spacing).

    Raises:
        CXRInputError: a summarised numpy repr (``...``) or not exactly 240 numbers.
    """
    cleaned = re.sub(r"dtype\s*=\s*\w+", "", text)
    if "..." in cleaned:
        raise CXRInputError("the landmarks are a shortened numpy print ('...').", fix="Re-export the full list.")
    values = _NUMBER.findall(cleaned)
    if len(values) != 2 * N_LANDMARKS:
        raise CXRInputError(f"the landmarks hold {len(values)} numbers; CheXmask has {N_LANDMARKS} (x, y) points.",
                            fix="Use the Landmarks column of a CheXmask CSV.")
    return np.array(values, dtype=np.float64).reshape(N_LANDMARKS, 2)


def content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """Black border widths ``(left, top, right, bottom)`` as ``remove_padding`` in DataPreparation/mimic.py.

    That script keeps the bounding box of the pixels brighter than 1 (8-bit grey) before padding.
    """
    inside = np.asarray(grey) > 1
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    h, w = inside.shape
    return (int(cols[0]), int(rows[0]), int(w - 1 - cols[-1]), int(h - 1 - rows[-1]))


@dataclass(frozen=True)
class Preprocessing:
    """How CheXmask's DataPreparation scripts put a ``height×width`` radiograph on the 1024×1024 grid.

    Followed from ngaggion/CheXmask-Database: ``DataPreparation/{chexpert,vindr-cxr,mimic,padchest}.py``
    (optional ``remove_padding`` crop, then ``pad_to_square_centered``: side = max(h, w), pad_left =
    (side - w) // 2, pad_top = (side - h) // 2, the odd pixel going right/bottom; then
    ``cv2.resize(square, (1024, 1024))``), inverted as ``DataPostprocessing/ReversePreprocessing/back_*.py``
    do: ``p / 1024 * side - pad + crop``, rounded, contours re-filled at native size.

    Attributes:
        height: radiograph rows.
        width: radiograph columns.
        crop: black border removed first ``(left, top, right, bottom)``; zeros for most datasets.
        size: side of the preprocessed grid.
    """

    height: int
    width: int
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    size: int = PREPROCESSED_SIZE

    @property
    def side(self) -> int:
        """Side of the padded square, before the resize to ``size``."""
        return max(self.height - self.crop[1] - self.crop[3], self.width - self.crop[0] - self.crop[2])

    @property
    def offset(self) -> tuple[int, int]:
        """Native ``(x, y)`` of the square's top-left corner: crop minus centring pad."""
        left, top, right, bottom = self.crop
        pad_left = (self.side - (self.width - left - right)) // 2
        pad_top = (self.side - (self.height - top - bottom)) // 2
        return left - pad_left, top - pad_top

    def points_to_native(self, points: np.ndarray) -> np.ndarray:
        """``[N, 2]`` grid ``(x, y)`` → native pixel coordinates (rounded, as the back_*.py scripts)."""
        dx, dy = self.offset
        native = np.asarray(points, dtype=np.float64) / self.size * self.side + np.array([dx, dy])
        return np.round(native)

    def mask_to_native(self, mask: np.ndarray) -> np.ndarray:
        """A grid mask at native size (nearest pixel, same mapping as the points); cropped border = 0."""
        dx, dy = self.offset
        left, top, right, bottom = self.crop
        out = np.zeros((self.height, self.width), dtype=bool)
        ys, xs = np.arange(top, self.height - bottom), np.arange(left, self.width - right)
        src_y = np.clip(np.rint((ys - dy) * self.size / self.side).astype(np.int64), 0, self.size - 1)
        src_x = np.clip(np.rint((xs - dx) * self.size / self.side).astype(np.int64), 0, self.size - 1)
        out[np.ix_(ys, xs)] = np.asarray(mask, dtype=bool)[np.ix_(src_y, src_x)]
        return out


@dataclass(frozen=True)
class CheXmaskRow:
    """One CSV record by column name."""

    image_id: str
    id_column: str
    fields: dict[str, str]

    def value(self, column: str) -> str:
        return (self.fields.get(column) or "").strip()

    def score(self, column: str = DICE_MEAN) -> float | None:
        """A Dice RCA score, or None when the column is absent, empty or not a number (``nan`` included)."""
        text = self.value(column)
        return float(text) if _NUMBER.fullmatch(text) else None

    @property
    def grid(self) -> tuple[int, int]:
        """``(Height, Width)`` of the masks; empty cells mean the 1024×1024 preprocessed grid."""
        h, w = self.value("Height"), self.value("Width")
        if not h and not w:
            return (PREPROCESSED_SIZE, PREPROCESSED_SIZE)
        size = tuple(float(v) if _NUMBER.fullmatch(v) else 0.0 for v in (h, w))
        if any(v < 1 or v != int(v) for v in size):
            raise CXRInputError(
                f"row '{self.image_id}' has Height '{h}' and Width '{w}': not whole pixel counts.",
                fix="Give both as numbers (1024 or 1024.0), or leave both empty for the 1024×1024 grid.",
            )
        return int(size[0]), int(size[1])


def check_quality(row: CheXmaskRow, min_dice: float) -> None:
    """Refuse a row whose ``Dice RCA (Mean)`` is below ``min_dice`` (or missing, unless ``min_dice`` is 0)."""
    if min_dice <= 0:
        return
    score = row.score(DICE_MEAN)
    if score is None:
        raise CXRInputError(
            f"row '{row.image_id}' has no '{DICE_MEAN}' score, so its quality is unknown.",
            input_name="min_dice", fix="Set min_dice to 0 to accept rows without a score.",
        )
    if score < min_dice:
        raise CXRInputError(
            f"row '{row.image_id}' has {DICE_MEAN} {score:.3f}, below min_dice {min_dice:.2f}: the estimated "
            "segmentation quality is low (CheXmask's authors discard rows below 0.7).",
            input_name="min_dice",
            fix=f"Lower min_dice to {np.floor(score * 100) / 100:.2f} to accept it anyway (check it on an "
            "overlay), or take the masks from another source.",
        )


@dataclass(frozen=True)
class LoadedMasks:
    """Organ masks decoded from a row, with where each came from (``RLE`` or ``landmarks``)."""

    masks: OrganMasks
    sources: dict[str, str]
    grid: tuple[int, int]
    mapping: str = ""


def _fill(polygons: dict[str, np.ndarray], height: int, width: int) -> dict[str, np.ndarray]:
    masks = polygons_to_masks({k: v.tolist() for k, v in polygons.items()}, height, width)
    return {k: v.numpy() > 0.5 for k, v in masks.as_dict().items()}


def row_masks(row: CheXmaskRow, native: Preprocessing | None = None) -> LoadedMasks:
    """Decode a row's organs; with ``native``, map grid rows onto the radiograph by undoing the preprocessing.

    Each organ comes from its RLE, or from its landmark contour when the mask cell is empty. Mapped to native
    size, the organs are re-filled from the transformed landmarks (as CheXmask's back_*.py scripts made the
    OriginalResolution files); without usable landmarks the decoded mask is resampled instead.

    Args:
        row: the CSV row.
        native: the radiograph's size (and border crop) when its masks must match it; None keeps the grid.
    """
    grid, landmarks, landmark_error = row.grid, None, None
    try:
        landmarks = parse_landmarks(row.value("Landmarks")) if row.value("Landmarks") else None
    except CXRInputError as err:
        landmark_error = err
    on_grid: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for organ, column in ORGAN_COLUMNS.items():
        rle = row.value(column)
        if rle:
            on_grid[organ], sources[organ] = decode_rle(rle, *grid), "RLE"
        elif landmarks is not None:
            on_grid.update(_fill({organ: landmarks[LANDMARK_SLICES[organ]]}, *grid))
            sources[organ] = "landmarks"
        else:
            raise landmark_error or CXRInputError(
                f"row '{row.image_id}' has neither a '{column}' mask nor landmarks.",
                fix="Use a row with masks, or another source of organ masks.",
            )
    mapping = ""
    if native is not None and (native.height, native.width) != grid:
        if landmarks is not None:
            on_grid = _fill({o: native.points_to_native(landmarks[s]) for o, s in LANDMARK_SLICES.items()},
                            native.height, native.width)
            mapping = "from the landmarks"
        else:
            on_grid = {o: native.mask_to_native(m) for o, m in on_grid.items()}
            mapping = "by resampling the masks (no usable landmarks)"
        grid = (native.height, native.width)
    empty = [organ for organ, mask in on_grid.items() if not mask.any()]
    if empty:
        raise CXRInputError(
            f"the {', '.join(empty)} of row '{row.image_id}' is empty on the {grid[0]}×{grid[1]} grid.",
            input_name="image" if mapping else "image_id", fix="Check that the row belongs to this radiograph.",
        )
    # Built directly: the masks are already 0/1 on one grid (from_dict's checks cost ~0.1 s a row).
    data = torch.from_numpy(np.stack(list(on_grid.values())).astype(np.float32))
    return LoadedMasks(OrganMasks(tuple(on_grid), data), sources, grid, mapping)


def plan_native(
    row: CheXmaskRow, grey: np.ndarray, dataset: str = "", border_crop: str = "auto"
) -> Preprocessing | None:
    """How the row's grid maps onto the radiograph ``grey`` (``[H, W]``, 0–255); None when it is the same grid.

    A 1024×1024 row is the preprocessed grid, mapped back; a row of another size must match the radiograph.
    ``border_crop``: ``undo`` re-finds the black border MIMIC-CXR and PadChest had cropped, ``ignore``
    skips that, ``auto`` does it for those two datasets.

    Raises:
        CXRInputError: a row at original resolution whose size is not the radiograph's.
    """
    height, width = grey.shape[-2:]
    if row.grid == (height, width):
        return None
    if row.grid != (PREPROCESSED_SIZE, PREPROCESSED_SIZE):
        gh, gw = row.grid
        turned = " (the same size turned by 90°: is the radiograph rotated?)" if (gw, gh) == (height, width) else ""
        raise CXRInputError(
            f"row '{row.image_id}' holds masks of {gh}×{gw} (Height×Width) but the radiograph is "
            f"{height}×{width}{turned}.",
            input_name="image",
            fix="Connect the radiograph this row was made for at its original size (not resized or cropped), "
            "or leave 'image' unconnected to get the masks on the row's own grid.",
        )
    undo = border_crop == "undo" or (border_crop == "auto" and dataset in BORDER_CROPPED)
    return Preprocessing(height, width, content_box(grey) if undo else (0, 0, 0, 0))
