"""Read a chest radiograph from DICOM, PNG or JPEG into display-ready grey pixels and its native geometry.

One entry point, :func:`read_radiograph`, picks the decoder by the file's content (the ``DICM`` marker, the
PNG signature, the JPEG start-of-image marker), falling back to the name only for files with neither (a
DICOM without preamble, or a damaged file, gets the DICOM reader's own explanation).

- **DICOM**: :func:`~.dicom.read_dicom` (modality LUT, VOI, MONOCHROME1 inverted; no patient identifier
  read).
- **PNG / JPEG** (:func:`read_image`): the file's samples at their full bit depth. ``window="auto"`` applies
  no window: a 16-bit PNG maps 0..65535 onto 0..1 and an 8-bit file 0..255 (nothing saturates);
  ``"full_range"`` stretches the lowest to the highest value, as for DICOM; ``"window"`` is an error (an
  image file stores no window). Pillow keeps only 8 bits of a 16-bit colour PNG; those are decoded here in
  full (see :func:`_png16_samples`).

  Conversions, all documented in the node's tooltips:

  - colour (RGB, palette, CMYK) becomes grey by ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (what
    Pillow's ``convert("L")`` uses), computed in floating point so a 16-bit file keeps its precision; a
    colour file whose channels are equal everywhere (a grey radiograph saved as RGB) gives that grey
    exactly;
  - an alpha channel that is opaque everywhere is dropped; any transparent pixel is an error (what lies
    behind a transparent pixel is unknown);
  - the EXIF orientation tag is applied (as ComfyUI's Load Image and every viewer do);
  - an animated PNG / multi-picture JPEG gives its first frame, with a warning in the log.

  Metadata: only the orientation tag is read. Text chunks, EXIF and XMP (which may name the patient) never
  reach the returned object, a log line or an error message: Pillow's exception texts (which quote file
  names) are not passed on, and Pillow's own loggers are silenced while a file is read (at DEBUG level
  they print every EXIF tag with its value).

Limits for every format: each side at least :data:`MIN_SIDE` pixels; PNG/JPEG at most :data:`MAX_PIXELS`
pixels, checked from the header before anything is decoded (a decompression bomb: a few kilobytes that
unpack to gigabytes), whatever Pillow's own limit is set to.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import CXRInputError
from .dicom import WINDOW_MODES, read_dicom
from .geometry import NativeGeometry

logger = logging.getLogger(__name__)

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
# A radiograph is hundreds of pixels across; below one latent cell (8 px, the VAE's factor) it is no image.
MIN_SIDE = 8
# Five times the largest chest detector (43 × 43 cm at 0.1 mm ≈ 18.5 MP) and above Pillow's own warning
# threshold (≈ 89 MP): an IMAGE of this size already takes 1.2 GB as float32.
MAX_PIXELS = 100_000_000
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, Pillow's convert("L") weights
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_ORIENTATION_TAG = 0x0112
# Pillow decodes 16-bit colour PNGs into 8-bit modes; these raw modes hold all 16 bits (see _png16_samples).
_PNG16_COLOUR = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_CONVERT_FIX = "Save the radiograph as a grey PNG (16-bit keeps the full range) or export it as DICOM."


@dataclass(frozen=True)
class Radiograph:
    """A radiograph read from any supported file. Holds no patient identifier, by design.

    Attributes:
        pixels: ``[H, W]`` float32 in [0, 1], display-ready (bright = dense).
        geometry: native size, pixel spacing (DICOM only), bit depth, photometric interpretation (DICOM
            only) and ``source`` ("dicom" or "image").
        voi: how the grey levels were mapped: ``"voi_lut"``, ``"window"``, ``"full_range"`` or, for an
            image file, ``"bit_depth"`` (no window: 0..2^bits − 1 onto 0..1).
    """

    pixels: torch.Tensor = field(repr=False)
    geometry: NativeGeometry
    voi: str


def is_radiograph_name(name: str) -> bool:
    """Whether a file name may hold a radiograph the loader reads (what the node lists).

    DICOM files are often named without an extension by PACS exports (``IM000001``); hidden files and
    ``DICOMDIR`` indexes (no pixel data) are left out.
    """
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    lower = name.lower()
    return lower.endswith(DICOM_SUFFIXES + IMAGE_SUFFIXES) or "." not in name


def read_radiograph(path: str | os.PathLike[str], window: str = "auto") -> Radiograph:
    """Read a DICOM, PNG or JPEG radiograph (chosen by the file's content) into grey pixels and geometry.

    Args:
        path: the file.
        window: ``"auto"``, ``"window"`` or ``"full_range"`` (see the module doc for each format).

    Raises:
        CXRInputError: a file that cannot become a grey radiograph, with the reason and a fix.
    """
    if window not in WINDOW_MODES:
        raise CXRInputError(f"unknown window mode '{window}'.", input_name="window",
                            fix=f"Use one of {', '.join(WINDOW_MODES)}.")
    path = Path(path)
    kind = _kind(path)
    if kind == "dicom":
        read = read_dicom(path, window)
        result = Radiograph(pixels=read.pixels, geometry=read.geometry, voi=read.voi)
    else:
        result = read_image(path, window)
    _check_size(result.geometry.height, result.geometry.width)
    return result


def _kind(path: Path) -> str:
    """"dicom" or "image", from the file's first bytes, else from its name."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        head = b""  # the reader of the name's kind reports a missing or unreadable file
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((_PNG_SIGNATURE, _JPEG_SOI)):
        return "image"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "dicom"


def _check_size(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise CXRInputError(
            f"the image is only {width}×{height} px: too small to be a radiograph (at least {MIN_SIDE} px a "
            "side).", fix="Pick the radiograph itself, not a thumbnail or an icon.")


def read_image(path: str | os.PathLike[str], window: str = "auto") -> Radiograph:
    """Read a PNG or JPEG radiograph: grey pixels at the file's full bit depth and its native geometry.

    Raises:
        CXRInputError: not a PNG/JPEG, damaged or truncated, too large (decompression bomb), transparent
            pixels, constant pixels, or ``window="window"``.
    """
    path = Path(path)
    if not path.is_file():
        raise CXRInputError(f"the file '{path.name}' does not exist.",
                            fix="Copy the radiograph into ComfyUI's input folder and pick it in the list.")
    if window == "window":
        raise CXRInputError("a PNG/JPEG file stores no window (Window Center / Width): only DICOM does.",
                            input_name="window",
                            fix="Choose 'auto' (the file's whole bit depth) or 'full_range' (lowest to highest "
                            "value).")
    samples, bits = _decode(path)
    _check_size(*samples.shape[:2])
    grey = _to_grey(samples, bits)
    lo, hi = float(grey.min()), float(grey.max())
    if lo == hi:
        raise CXRInputError(f"every pixel of the image has the same value ({lo:g}): there is no radiograph to "
                            "show.", fix="Pick the file that holds the actual radiograph.")
    if window == "full_range":
        scaled, voi = (grey - lo) / (hi - lo), "full_range"
    else:
        scaled, voi = grey / float(2**bits - 1), "bit_depth"
    geometry = NativeGeometry(height=int(grey.shape[0]), width=int(grey.shape[1]), bits_stored=bits,
                              source="image")
    logger.debug("image read: %d×%d, %d-bit, %s", geometry.height, geometry.width, bits, voi)
    return Radiograph(pixels=torch.from_numpy(np.clip(scaled, 0.0, 1.0).astype(np.float32)),
                      geometry=geometry, voi=voi)


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """``([H, W, C] samples, bits)``: C is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)."""
    try:
        with _quiet_pillow(), _strict_pillow(), warnings.catch_warnings():
            # Pillow warns above its own limit and raises above twice that; the limit applied is ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _decode_open(im)
    except Image.DecompressionBombError:
        raise _too_large() from None
    except CXRInputError:
        raise
    except UnidentifiedImageError:
        raise CXRInputError("the file is not a PNG, JPEG or DICOM image (its content matches none of them).",
                            fix="Pick a DICOM, PNG or JPEG radiograph.") from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders fail with many types; none names the fix
        logger.debug("image decoding failed: %s", type(err).__name__)
        raise CXRInputError("the image could not be decoded (damaged or truncated file).",
                            fix="Export or download the radiograph again.") from None


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Silence Pillow's loggers while a file is read: at DEBUG level Pillow logs every EXIF tag it parses
    (with its value: a patient's name in ImageDescription, say) and JPEG files are parsed at open."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "PIL" or name.startswith("PIL.")]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, before, strict=True):
            lg.disabled = was


@contextmanager
def _strict_pillow() -> Iterator[None]:
    """Refuse truncated files while one is read, whatever the process set: packs often switch Pillow's
    ``LOAD_TRUNCATED_IMAGES`` on for good, and a truncated radiograph would then load with a grey fill.
    (ComfyUI's own Load Image sets this global around its reads the same way.)"""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _too_large() -> CXRInputError:
    return CXRInputError(
        f"the image declares more than {MAX_PIXELS // 1_000_000} million pixels: a chest radiograph has fewer "
        "than 20 million, so this is not one (or a 'decompression bomb' that would fill the memory).",
        fix="Pick the radiograph itself, or scale the image down below that size first.")


def _decode_open(im: ImageFile.ImageFile) -> tuple[np.ndarray, int]:
    if im.format not in ("PNG", "JPEG", "MPO"):
        raise CXRInputError(f"{im.format or 'this'} images are not supported (only DICOM, PNG and JPEG).",
                            fix=_CONVERT_FIX)
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise _too_large()
    frames = int(getattr(im, "n_frames", 1))  # an animated PNG, a multi-picture (MPO) JPEG
    if frames > 1:
        logger.warning("the image file holds %d frames: using the first one.", frames)
    rawmode = im.tile[0].args if im.tile else None
    if im.format == "PNG" and (rawmode in _PNG16_COLOUR or rawmode == "LA;16B"):
        samples, exif = _png16_samples(str(im.filename), rawmode)
        bits = 16
    else:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNG (Pillow < 10 opens it as "I")
            samples, bits = np.asarray(im).astype(np.int64)[..., None], 16
        else:
            samples, bits = _eight_bit(im), 8
        exif = im.info.get("exif")  # after decoding: a PNG's eXIf chunk may follow its pixel data
    return _orient(samples, exif_orientation(exif)), bits


def _eight_bit(im: Image.Image) -> np.ndarray:
    """8-bit samples of a grey, grey + alpha, colour or palette image (1-, 2-, 4-bit grey expanded to 8)."""
    mode = im.mode
    if mode == "P":
        mode = "RGBA" if "transparency" in im.info else "RGB"
    elif mode == "1":
        mode = "L"
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK or YCbCr JPEGs, palette + alpha
        mode = "RGBA" if "A" in mode else "RGB"
    arr = np.asarray(im if mode == im.mode else im.convert(mode)).astype(np.int64)
    return arr[..., None] if arr.ndim == 2 else arr


def _png16_samples(filename: str, rawmode: str) -> tuple[np.ndarray, bytes | None]:
    """All 16 bits of a 16-bit colour or grey + alpha PNG, which Pillow would cut to their high bytes, and
    the file's raw EXIF.

    Pillow's zip decoder un-filters the rows by the raw mode's bytes per pixel; a raw mode of the same size
    that unpacks other bytes gives the rest, exactly:

    - RGB/RGBA: ``"…;16B"`` unpacks the high byte of each big-endian sample, ``"…;16L"`` (the same 6 or 8
      bytes read as little-endian) its low byte;
    - grey + alpha: ``"RGBA"`` (4 bytes) unpacks the four bytes as they are: grey high, grey low, alpha
      high, alpha low.
    """
    exif: bytes | None = None

    def decode(raw: str) -> np.ndarray:
        nonlocal exif
        with Image.open(filename) as again:
            again.tile = [again.tile[0]._replace(args=raw)]
            again.load()
            exif = again.info.get("exif")
            return np.asarray(again).astype(np.int64)

    if rawmode == "LA;16B":
        b = decode("RGBA")
        return np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], axis=-1), exif
    high = decode(rawmode)
    return high * 256 + decode(_PNG16_COLOUR[rawmode]), exif


def exif_orientation(exif: bytes | None) -> int:
    """The EXIF Orientation tag (1–8; 1 when absent or unreadable), read from IFD0 alone.

    Parsed here rather than with ``Image.getexif()``, which reads every tag (and logs their values).
    """
    if not exif:
        return 1
    data = exif[6:] if exif.startswith(b"Exif\0\0") else exif
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    try:
        if order is None:
            return 1
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        for i in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", data, ifd + 2 + 12 * i)
            if tag == _ORIENTATION_TAG and kind == 3:  # SHORT, stored left-aligned in the value field
                (orientation,) = struct.unpack_from(order + "H", value)
                return orientation if 1 <= orientation <= 8 else 1
    except struct.error:
        pass
    return 1


def _orient(samples: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1–8) to ``[H, W, C]``, as ImageOps.exif_transpose does."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a)}
    op = ops.get(orientation)
    return np.ascontiguousarray(op(samples)) if op else samples


def _to_grey(samples: np.ndarray, bits: int) -> np.ndarray:
    """``[H, W]`` float64 grey values (0..2^bits − 1) of ``[H, W, C]`` samples; refuses transparency."""
    channels = samples.shape[-1]
    if channels in (2, 4):
        alpha = samples[..., -1]
        if int(alpha.min()) < 2**bits - 1:
            share = float((alpha < 2**bits - 1).mean())
            raise CXRInputError(
                f"{share:.1%} of the image's pixels are transparent (alpha channel): a radiograph has no "
                "transparent pixels, and what lies behind them is unknown.",
                fix="Save the radiograph without transparency (flatten it / remove the alpha channel).")
        samples = samples[..., :-1]
    if samples.shape[-1] == 1:
        return samples[..., 0].astype(np.float64)
    if bool((samples == samples[..., :1]).all()):
        return samples[..., 0].astype(np.float64)  # a grey radiograph saved as colour: exactly its grey
    return samples.astype(np.float64) @ np.asarray(LUMA)
