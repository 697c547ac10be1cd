"""The input files of the bad-input matrix (tests/test_bad_inputs.py), all named ``bi_*``, written into the
server's input folder from real data (the CheXmask example, pydicom-data's RG1 DICOM, real CheXmask rows),
corrupt ones by truncating or flipping bytes of a copy.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from api_graph import MASK_KEYS
from PIL import Image

# (width, height) of the resized copies: 1×1, 8×8, 7×21, 21×7 and 3×9 latents, and a small image for full-size
# masks.
SIZES = ((8, 8), (64, 64), (168, 56), (56, 168), (72, 24), (112, 128))
CSV_ROWS = "VinDr-CXR.csv"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _flipped(data: bytes, start: int, length: int) -> bytes:
    """``data`` with ``length`` bytes from ``start`` inverted (a damaged copy)."""
    raw = bytearray(data)
    for i in range(start, min(start + length, len(raw))):
        raw[i] ^= 0xFF
    return bytes(raw)


def _csv_with(rows_file: Path, change: Callable[[list[list[str]]], None]) -> bytes:
    with open(rows_file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    change(rows)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def first_row_id(rows_file: Path) -> str:
    with open(rows_file, newline="", encoding="utf-8") as f:
        return next(iter(csv.DictReader(f)))["image_id"]


def write_input_files(put: Callable[[str, bytes], object], example: Path, rows_dir: Path, dicom: str | Path) -> None:
    """Write every ``bi_*`` file the cases read, through ``put(name, bytes)`` (the server's input folder)."""
    put("bi_cxr.jpg", (example / "utils_example1.jpg").read_bytes())
    radiograph = Image.open(example / "utils_example1.jpg").convert("L")
    masks = {k: Image.open(example / f"{k}_mask.png").convert("L") for k in MASK_KEYS.values()}
    for key, mask in masks.items():
        put(f"bi_{key}.png", (example / f"{key}_mask.png").read_bytes())
        for w, h in SIZES:
            small = np.asarray(mask.resize((w, h), Image.BILINEAR)) >= 128
            put(f"bi_{key}_{w}x{h}.png", _png(small.astype(np.uint8) * 255))
    for w, h in SIZES:
        put(f"bi_cxr_{w}x{h}.png", _png(np.asarray(radiograph.resize((w, h), Image.BILINEAR))))
    put("bi_black.png", _png(np.zeros((899, 786), np.uint8)))
    ll = (example / "LL_mask.png").read_bytes()
    put("bi_truncated.png", ll[: len(ll) // 2])
    put("bi_flipped.png", _flipped(ll, len(ll) // 3, 64))
    put("bi_text.png", b"organ mask? no: plain text\n")
    labels = np.zeros((899, 786), np.uint8)
    for value, key in ((1, "RL"), (2, "LL"), (3, "H")):
        labels[np.asarray(masks[key]) >= 128] = value
    label_png = _png(labels)
    put("bi_labels.png", label_png)
    put("bi_labels_truncated.png", label_png[: len(label_png) // 2])

    rg1 = Path(dicom).read_bytes()
    put("bi_rg1.dcm", rg1)
    put("bi_truncated.dcm", rg1[: len(rg1) // 2])
    put("bi_header_flipped.dcm", _flipped(rg1, 132, 400))  # the bytes right after the 'DICM' magic
    put("bi_garbage.dcm", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("bi_empty.dcm", b"")

    _radiograph_files(put, example)

    rows_file = rows_dir / CSV_ROWS
    text = rows_file.read_bytes()
    put("bi_rows.csv", text)
    put("bi_garbage.csv", np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    put("bi_header_only.csv", text.split(b"\n", 1)[0] + b"\n")
    first_line_end = text.index(b"\n")
    put("bi_truncated.csv", text[: first_line_end + 2000])  # the first row, cut inside its RLE columns

    def bad_rle(rows: list[list[str]]) -> None:
        rows[1][rows[0].index("Left Lung")] = "17 4 x9 12"

    def nan_dice(rows: list[list[str]]) -> None:
        rows[1][rows[0].index("Dice RCA (Mean)")] = "nan"

    put("bi_bad_rle.csv", _csv_with(rows_file, bad_rle))
    put("bi_nan_dice.csv", _csv_with(rows_file, nan_dice))


def _radiograph_files(put: Callable[[str, bytes], object], example: Path) -> None:
    """The radiograph loader's files: a 16-bit PNG, a real non-chest radiograph, a two-frame and a colour DICOM, and
    PNG/JPEG files it must refuse (1 pixel, truncated, transparent, a decompression bomb)."""
    from dicom_helpers import write_dicom
    from radiograph_files import bomb_png, extremity_png, png_bytes, quantise, rg1_stored
    from radiograph_files import example as example_grey

    grey = example_grey(example)
    put("bi_cxr16.png", png_bytes(quantise(grey, 16), 16))
    put("bi_extremity.png", extremity_png())
    put("bi_one_pixel.png", png_bytes(np.array([[128]]), 8))
    jpg = (example / "utils_example1.jpg").read_bytes()
    put("bi_truncated.jpg", jpg[: len(jpg) // 2])
    rgba = np.concatenate([np.stack([quantise(grey, 8)] * 3, -1), np.full((*grey.shape, 1), 255)], -1)
    rgba[: grey.shape[0] // 4, : grey.shape[1] // 4, 3] = 0  # a transparent corner
    put("bi_transparent.png", png_bytes(rgba, 8))
    put("bi_bomb.png", bomb_png())
    with tempfile.TemporaryDirectory() as folder:
        stored, ds = rg1_stored()
        frames = np.stack([stored, stored.max() - stored])
        put("bi_frames.dcm", write_dicom(Path(folder) / "f.dcm", frames, photometric="MONOCHROME1",
                                         bits_stored=int(ds.BitsStored)).read_bytes())
        rgb = np.stack([quantise(grey, 8)] * 3, -1)
        put("bi_rgb.dcm", write_dicom(Path(folder) / "c.dcm", rgb, photometric="RGB", bits_stored=8).read_bytes())
