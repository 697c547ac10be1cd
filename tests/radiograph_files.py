"""Radiograph files of every kind the loader reads, made at test time from the shared real radiographs.

Each variant is a real radiograph (the CheXmask example JPEG, the NIH PNG, pydicom-data's RG1 DICOM) scaled
down to at most :data:`SIDE` px and written in one format, with the grey values it must load as
(``expected``, [H, W] in [0, 1]). A small PNG writer covers what Pillow cannot write: 16-bit colour and
16-bit grey + alpha, with every PNG row filter in turn (the decoder must undo each one).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from dicom_helpers import rg1_path, write_dicom
from PIL import Image

from conftest import need

SIDE = 192  # longest side of a variant: small enough for the atlas and the fit to take well under a second


@dataclass(frozen=True)
class Variant:
    name: str
    suffix: str
    write: Callable[[Path], np.ndarray]  # writes the file, returns the expected [H, W] grey in [0, 1]


# ---------------------------------------------------------------------------------------------------- sources
def _shrink(grey: np.ndarray, side: int = SIDE, square: bool = False) -> np.ndarray:
    """[H, W] float in [0, 1] scaled (area) so the longest side is ``side``; ``square`` crops the centre first."""
    if square:
        n = min(grey.shape)
        y0, x0 = (grey.shape[0] - n) // 2, (grey.shape[1] - n) // 2
        grey = grey[y0:y0 + n, x0:x0 + n]
    h, w = grey.shape
    scale = side / max(h, w)
    im = Image.fromarray(grey.astype(np.float32), mode="F").resize((round(w * scale), round(h * scale)), Image.BOX)
    return np.clip(np.asarray(im, dtype=np.float64), 0, 1)


def example(folder: Path, square: bool = False) -> np.ndarray:
    """The CheXmask example PA radiograph (786×899 JPEG) as grey in [0, 1]."""
    grey = np.asarray(Image.open(folder / "utils_example1.jpg").convert("L"), dtype=np.float64) / 255
    return _shrink(grey, square=square)


def nih(data_dir: Path, side: int = SIDE) -> np.ndarray:
    """The NIH ChestX-ray14 radiograph (512×512 PNG) as grey in [0, 1]."""
    grey = np.asarray(Image.open(data_dir / "cxr" / "nih" / "00000001_000.png").convert("L"), dtype=np.float64)
    return _shrink(grey / 255, side=side)


def rg1_stored(square: bool = False) -> tuple[np.ndarray, pydicom.Dataset]:
    """RG1_UNCR.dcm's stored values (15-bit MONOCHROME1), scaled down, and its dataset."""
    ds = pydicom.dcmread(rg1_path())
    stored = ds.pixel_array.astype(np.float64)
    top = float(2**int(ds.BitsStored) - 1)
    return np.rint(_shrink(stored / top, square=square) * top).astype(np.int64), ds


# ---------------------------------------------------------------------------------------------------- writers
def quantise(grey: np.ndarray, bits: int) -> np.ndarray:
    return np.rint(np.clip(grey, 0, 1) * (2**bits - 1)).astype(np.int64)


def _filter_rows(raw: np.ndarray, bpp: int) -> bytes:
    """PNG-filter each row of ``raw`` ([H, row bytes] uint8), cycling None, Sub, Up, Average, Paeth."""
    out = bytearray()
    prev = np.zeros(raw.shape[1], np.int64)
    for y, row in enumerate(raw.astype(np.int64)):
        kind = y % 5
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(row)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    return bytes(out)


def png_bytes(samples: np.ndarray, bits: int, text: dict[str, str] | None = None, exif: bytes | None = None) -> bytes:
    """A PNG of ``samples`` ([H, W] grey or [H, W, C], C = 2 grey + alpha, 3 RGB, 4 RGBA), 8 or 16 bits, with
    every row filter in turn; optional tEXt chunks and an eXIf chunk."""
    arr = samples if samples.ndim == 3 else samples[..., None]
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    dtype = ">u2" if bits == 16 else np.uint8
    raw = np.frombuffer(arr.astype(dtype).tobytes(), np.uint8).reshape(h, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour_type, 0, 0, 0))
    for key, value in (text or {}).items():
        body += chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    if exif is not None:
        body += chunk(b"eXIf", exif)
    body += chunk(b"IDAT", zlib.compress(_filter_rows(raw, c * bits // 8)))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def jpeg_bytes(samples: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(samples.astype(np.uint8)).save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def jpeg_grey(path: Path) -> np.ndarray:
    """What a JPEG decodes to (lossy: the expectation is the decoded file, read independently by Pillow)."""
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def tinted(grey: np.ndarray, bits: int) -> np.ndarray:
    """A colour rendering of a grey radiograph (a slight warm tint, as a screenshot or colour export has)."""
    top = 2**bits - 1
    return np.stack([quantise(grey, bits), quantise(grey * 0.97, bits), np.rint(quantise(grey, bits) * 0.9)],
                    axis=-1).clip(0, top).astype(np.int64)


def bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side × side pixels (400 million: 400 MB as 8-bit, 1.6 GB as float) in ~50 kB."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def extremity_png(side: int = SIDE) -> bytes:
    """pydicom-data's RG3_UNCR.dcm (a real extremity radiograph, not a chest) as a 16-bit grey PNG, bone bright."""
    path = pydicom.data.get_testdata_file("RG3_UNCR.dcm")
    need(path is not None, "pydicom-data's RG3_UNCR.dcm not found: pip install pydicom-data")
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    grey = 1 - (stored - stored.min()) / (stored.max() - stored.min())  # MONOCHROME1
    return png_bytes(quantise(_shrink(grey, side=side), 16), 16)


# ---------------------------------------------------------------------------------------------------- variants
def variants(data_dir: Path) -> list[Variant]:
    """Every kind of radiograph file: DICOM MONOCHROME1/2, PNG 8/16-bit grey/colour, JPEG grey/colour;
    square and non-square."""
    folder = data_dir / "cxr" / "chexmask-example"

    def dicom_mono1(square: bool) -> Callable[[Path], np.ndarray]:
        def write(path: Path) -> np.ndarray:
            stored, ds = rg1_stored(square)
            write_dicom(path, stored, photometric="MONOCHROME1", bits_stored=int(ds.BitsStored))
            # No window in the file: the full range, inverted (MONOCHROME1 stores bone dark).
            return 1 - (stored - stored.min()) / (stored.max() - stored.min())
        return write

    def dicom_mono2(source: Callable[[], np.ndarray], bits: int) -> Callable[[Path], np.ndarray]:
        def write(path: Path) -> np.ndarray:
            stored = quantise(source(), bits)
            write_dicom(path, stored, bits_stored=bits, WindowCenter=2 ** (bits - 1), WindowWidth=2**bits)
            # That window covers the stored range exactly: linear windowing (DICOM C.11.2.1.2.1) gives
            # ((x − c + 0.5) / (w − 1) + 0.5) = x / (2^bits − 1).
            return stored / (2**bits - 1)
        return write

    def png(source: Callable[[], np.ndarray], bits: int, colour: bool) -> Callable[[Path], np.ndarray]:
        def write(path: Path) -> np.ndarray:
            grey = source()
            samples = tinted(grey, bits) if colour else quantise(grey, bits)
            path.write_bytes(png_bytes(samples, bits, text={"Comment": "variant"}))
            return (_luma(samples) if colour else samples) / (2**bits - 1)
        return write

    def jpeg(source: Callable[[], np.ndarray], colour: bool) -> Callable[[Path], np.ndarray]:
        def write(path: Path) -> np.ndarray:
            grey = source()
            path.write_bytes(jpeg_bytes(tinted(grey, 8) if colour else quantise(grey, 8)))
            decoded = jpeg_grey(path)
            return (_luma(decoded) if colour else decoded) / 255
        return write

    def ex(square: bool = False) -> Callable[[], np.ndarray]:
        return lambda: example(folder, square)

    def chest14() -> np.ndarray:
        return nih(data_dir)

    return [
        Variant("dicom_mono1_15bit_nonsquare", ".dcm", dicom_mono1(False)),
        Variant("dicom_mono1_15bit_square", ".dcm", dicom_mono1(True)),
        Variant("dicom_mono2_12bit_square", ".dcm", dicom_mono2(chest14, 12)),
        Variant("dicom_mono2_8bit_nonsquare", ".dcm", dicom_mono2(ex(), 8)),
        Variant("png_grey_8bit_square", ".png", png(chest14, 8, colour=False)),
        Variant("png_grey_16bit_nonsquare", ".png", png(ex(), 16, colour=False)),
        Variant("png_rgb_8bit_nonsquare", ".png", png(ex(), 8, colour=True)),
        Variant("png_rgb_16bit_square", ".png", png(chest14, 16, colour=True)),
        Variant("jpeg_grey_nonsquare", ".jpg", jpeg(ex(), colour=False)),
        Variant("jpeg_rgb_square", ".jpg", jpeg(ex(square=True), colour=True)),
    ]
