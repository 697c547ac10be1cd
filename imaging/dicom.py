"""Read a chest radiograph from a DICOM file into a display-ready grey image and its native geometry.

Pipeline (DICOM PS3.3 C.11 order, with pydicom's own functions):

1. decode the pixel data (first frame of a multi-frame file, with a logged warning: a chest radiograph
   is one frame; dual-energy or tomosynthesis series that pack several frames still give a usable first
   frame, and decoding only that frame keeps memory low);
2. modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence (``pydicom.pixels.apply_modality_lut``);
3. VOI, chosen by ``window``:

   - ``"auto"``: the file's VOI LUT Sequence if present, else its first Window Center/Width, else the full
     range of the values (min-max);
   - ``"window"``: the file's first Window Center/Width (an error when the file has none);
   - ``"full_range"``: min-max of the values, ignoring the file's VOI;

4. normalise to [0, 1] by the VOI's *output* range: for windowing, pydicom maps into the stored-value range
   (from Bits Stored and Pixel Representation, rescaled when a modality transform exists), which is probed
   from pydicom itself so the two never disagree; for a VOI LUT Sequence, the range of the LUT's entries
   (descriptors of real files often declare 16 bits for 12-bit entries); 12–16-bit data is therefore
   scaled by its real range, never by 255;
5. MONOCHROME1 is inverted, so dense tissue (bone) is bright for both photometric interpretations. A
   Presentation LUT Shape is not applied on top: for DX/CR it only restates the photometric
   interpretation (INVERSE for MONOCHROME1), and applying both would invert twice.

Patient data: only the pixel data and the image-pixel/geometry elements (Rows, Columns, Bits Stored,
Photometric Interpretation, Pixel Spacing / Imager Pixel Spacing, Number of Frames, Transfer Syntax) and
the VOI/modality elements used to compute the pixels are read. No other header element (Patient Name,
Patient ID, Birth Date, Accession Number, Institution, UIDs, dates, ...) is accessed, so none can reach the
returned object, a log line, an exception message or a file name. pydicom's own exception texts are never
passed on (errors are raised ``from None`` with the pack's own wording), because a parser message may
quote header content.

Errors are :class:`~cxr_counterfactual.errors.CXRInputError` with a problem and a fix: missing file, not a
DICOM file, no pixel data, colour / palette images, compressed pixel data without an installed decoder,
pixel data that cannot be decoded, constant pixels, a requested window the file lacks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array

from ..errors import CXRInputError
from .geometry import NativeGeometry

logger = logging.getLogger(__name__)

WindowMode = Literal["auto", "window", "full_range"]
WINDOW_MODES: tuple[str, ...] = ("auto", "window", "full_range")
SUPPORTED_PHOTOMETRIC: tuple[str, ...] = ("MONOCHROME1", "MONOCHROME2")

# pip packages that give pydicom a decoder, by transfer syntax family (pydicom's plugin requirements).
_JPEG_PACKAGES = "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_J2K_PACKAGES = "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
_DECODER_PACKAGES: dict[str, str] = {
    pydicom.uid.JPEGBaseline8Bit: _JPEG_PACKAGES,
    pydicom.uid.JPEGExtended12Bit: _JPEG_PACKAGES,
    pydicom.uid.JPEGLossless: _JPEG_PACKAGES,
    pydicom.uid.JPEGLosslessSV1: _JPEG_PACKAGES,
    pydicom.uid.JPEGLSLossless: "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    pydicom.uid.JPEGLSNearLossless: "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    pydicom.uid.JPEG2000Lossless: _J2K_PACKAGES,
    pydicom.uid.JPEG2000: _J2K_PACKAGES,
    pydicom.uid.HTJ2KLossless: "pylibjpeg pylibjpeg-openjpeg",
    pydicom.uid.HTJ2KLosslessRPCL: "pylibjpeg pylibjpeg-openjpeg",
    pydicom.uid.HTJ2K: "pylibjpeg pylibjpeg-openjpeg",
    pydicom.uid.RLELossless: "pylibjpeg pylibjpeg-rle",
}


@dataclass(frozen=True)
class DicomRadiograph:
    """A radiograph read from DICOM. Holds no patient identifier, by design.

    Attributes:
        pixels: ``[H, W]`` float32 in [0, 1], display-ready (bright = dense, as a radiologist sees it).
        geometry: native size, pixel spacing, bit depth and photometric interpretation of the file.
        voi: which VOI produced ``pixels``: ``"voi_lut"``, ``"window"`` or ``"full_range"``.
    """

    pixels: torch.Tensor = field(repr=False)
    geometry: NativeGeometry
    voi: str


def read_dicom(path: str | os.PathLike[str], window: str = "auto") -> DicomRadiograph:
    """Read a MONOCHROME1/2 DICOM radiograph into display-ready grey pixels and its native geometry.

    Args:
        path: the DICOM file (Part 10, with file meta information).
        window: ``"auto"`` (VOI LUT Sequence, else first window, else min-max), ``"window"`` (the file's
            first Window Center/Width, required) or ``"full_range"`` (min-max of the values).

    Returns:
        The pixels (``[H, W]`` float32 in [0, 1], bright = dense) and the :class:`NativeGeometry`.

    Raises:
        CXRInputError: for any file the pipeline cannot turn into a grey radiograph (see module doc).
    """
    mode = _check_mode(window)
    ds = _read_dataset(Path(path))
    photometric = _check_image_module(ds)
    _check_decoder(ds)
    stored = _decode_first_frame(ds)
    values = _modality(stored, ds)
    lo, hi = float(np.min(values)), float(np.max(values))
    if lo == hi:
        raise CXRInputError(
            f"every pixel of the image has the same value ({lo:g}): there is no radiograph to show.",
            fix="Check the export from the PACS/modality; pick the file that holds the actual image.",
        )
    grey, voi = _apply_voi(values, ds, mode)
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey  # MONOCHROME1 stores dense tissue dark; show it bright like MONOCHROME2
    geometry = NativeGeometry(
        height=int(grey.shape[0]),
        width=int(grey.shape[1]),
        pixel_spacing_mm=_pixel_spacing(ds),
        bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16),
        photometric=photometric,
        source="dicom",
        source_path=str(Path(path).resolve()),
    )
    pixels = torch.from_numpy(np.clip(grey, 0.0, 1.0).astype(np.float32))
    logger.debug(
        "DICOM read: %d×%d, %d-bit %s, VOI %s", geometry.height, geometry.width, geometry.bits_stored,
        photometric, voi,
    )
    return DicomRadiograph(pixels=pixels, geometry=geometry, voi=voi)


def _check_mode(window: str) -> WindowMode:
    if window not in WINDOW_MODES:
        raise CXRInputError(
            f"unknown window mode '{window}'.",
            input_name="window",
            fix=f"Use one of {', '.join(WINDOW_MODES)}.",
        )
    return window  # type: ignore[return-value]


def _read_dataset(path: Path) -> Dataset:
    """Parse the file; failures become CXRInputErrors without pydicom's text (it may quote the header)."""
    if not path.exists():
        raise CXRInputError(
            f"the file '{path}' does not exist.",
            fix="Copy the DICOM file into ComfyUI's input folder and pick it in the list (refresh the page).",
        )
    if not path.is_file():
        raise CXRInputError(f"'{path}' is a folder, not a file.", fix="Pick a single DICOM file.")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise _not_dicom() from None
    except OSError as err:
        raise CXRInputError(
            f"the file could not be read ({type(err).__name__}).",
            fix="Check that the file is readable by the user running ComfyUI.",
        ) from None
    except Exception as err:  # noqa: BLE001 - any parser failure means a damaged file
        logger.debug("pydicom could not parse a file: %s", type(err).__name__)
        raise CXRInputError(
            "the file looks like DICOM but could not be parsed (damaged or truncated).",
            fix="Export the image again from the PACS/modality as an uncompressed DICOM file.",
        ) from None


def _not_dicom() -> CXRInputError:
    return CXRInputError(
        "the file is not a DICOM file (no 'DICM' header).",
        fix="Pick a DICOM Part 10 file (.dcm), or a PNG/JPEG radiograph.",
    )


def _check_image_module(ds: Dataset) -> str:
    """Require grey integer pixel data; return the photometric interpretation."""
    if "PixelData" not in ds:
        raise CXRInputError(
            "the DICOM file has no Pixel Data (it may be a report, a structured document or a DICOMDIR).",
            fix="Pick the DICOM file of the radiograph image itself.",
        )
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric not in SUPPORTED_PHOTOMETRIC or samples != 1:
        shown = photometric or "missing"
        raise CXRInputError(
            f"photometric interpretation {shown} ({samples} sample(s) per pixel) is not supported: only "
            "grey MONOCHROME1/MONOCHROME2 radiographs are.",
            fix="Use the original grey radiograph, not a colour, palette or secondary-capture rendering.",
        )
    return photometric


def _check_decoder(ds: Dataset) -> None:
    """Fail early, naming the pip packages, when the transfer syntax has no installed decoder."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax:
        raise CXRInputError(
            "the DICOM file does not state its transfer syntax (no file meta information).",
            fix="Export the image again as a DICOM Part 10 file (with file meta information).",
        )
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise CXRInputError(
            f"the pixel data uses transfer syntax '{tsyntax.name}', which pydicom cannot decode.",
            fix="Export the image again as uncompressed DICOM (Explicit VR Little Endian).",
        ) from None
    if not decoder.is_available:
        packages = _DECODER_PACKAGES.get(str(tsyntax), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise CXRInputError(
            f"the pixel data is compressed ('{tsyntax.name}') and no decoder for it is installed.",
            fix=f"Install one into ComfyUI's Python: pip install {packages}; or export the image "
            "uncompressed.",
        )


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    """Decode the pixel data; only the first frame of a multi-frame file (warned)."""
    frames = _int_or(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        logger.warning("the DICOM file holds %d frames: using the first one.", frames)
    try:
        arr = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as err:  # noqa: BLE001 - decoder failures have many types; none is the user's fault
        logger.debug("pixel decoding failed: %s", type(err).__name__)
        raise CXRInputError(
            "the pixel data could not be decoded (damaged, truncated, or inconsistent with its header).",
            fix="Export the image again from the PACS/modality, preferably uncompressed.",
        ) from None
    if arr.ndim != 2:
        raise CXRInputError(
            f"the decoded pixel data has shape {tuple(arr.shape)}, not one grey image.",
            fix="Use a single-frame grey radiograph.",
        )
    return arr


def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values → modality values (Rescale Slope/Intercept or a Modality LUT Sequence)."""
    try:
        return np.asarray(apply_modality_lut(stored, ds))
    except Exception as err:  # noqa: BLE001 - a malformed modality LUT
        logger.debug("modality LUT failed: %s", type(err).__name__)
        raise CXRInputError(
            "the file's modality LUT / rescale values are invalid.",
            fix="Export the image again from the PACS/modality.",
        ) from None


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _apply_voi(values: np.ndarray, ds: Dataset, mode: WindowMode) -> tuple[np.ndarray, str]:
    """Modality values → [0, 1] float64 (before the MONOCHROME1 inversion), and the VOI used."""
    if mode == "auto" and _has_voi_lut(ds):
        return _voi_lut(values, ds), "voi_lut"
    if mode == "window" and not _has_window(ds):
        raise CXRInputError(
            "the file has no window (Window Center / Window Width).",
            input_name="window",
            fix="Choose 'auto' (the file's VOI LUT, else its full range) or 'full_range'.",
        )
    if mode != "full_range" and _has_window(ds):
        return _windowed(values, ds), "window"
    return _full_range(values), "full_range"


def _full_range(values: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    return (values.astype(np.float64) - lo) / (hi - lo)


def _windowed(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The file's first window, normalised by the output range pydicom maps it into."""
    try:
        out = apply_windowing(values, ds, 0)
        # pydicom maps a window into the stored-value range (rescaled by any modality transform). Probe
        # that range from pydicom itself with two values far outside any window (below → y_min, above →
        # y_max, also for SIGMOID), so the normalisation follows whatever convention it uses.
        with np.errstate(over="ignore", invalid="ignore"):
            y_min, y_max = apply_windowing(np.array([-1e300, 1e300]), ds, 0)
    except Exception as err:  # noqa: BLE001 - bad width / unknown VOI LUT Function
        raise _voi_failed("windowing", err, "the file's window (Window Center / Width or VOI LUT Function) is "
                          "invalid.", fix="Choose 'full_range'.") from None
    return _normalise_voi(out, float(y_min), float(y_max))


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The file's first VOI LUT Sequence item, normalised by the range of the LUT's entries."""
    item = ds.VOILUTSequence[0]
    try:
        nr_entries, first_map, _depth = (int(v) for v in item.LUTDescriptor)
        nr_entries = nr_entries or 2**16
        # pydicom 3.0 indexes the LUT with an array of the *entry* dtype, so an 8-bit LUT with more than
        # 256 entries wraps its indices (e.g. 4096 entries → index % 256). Present the item as 16-bit
        # (the entries are unchanged) and clip the input to the LUT's domain (same result as the
        # standard: below the first mapped value → first entry, above → last) so no index can wrap.
        shim = Dataset()
        shim.file_meta = ds.file_meta
        entry = Dataset()
        entry.LUTDescriptor = [nr_entries % 2**16, first_map, 16]
        entry.add(item["LUTData"])
        shim.VOILUTSequence = [entry]
        index = np.clip(np.rint(values), first_map, first_map + nr_entries - 1).astype(np.int64)
        out = apply_voi(index, shim, 0).astype(np.float64)
        table = apply_voi(np.arange(first_map, first_map + nr_entries, dtype=np.int64), shim, 0)
    except Exception as err:  # noqa: BLE001 - malformed descriptor or LUT data
        raise _voi_failed("VOI LUT", err, "the file's VOI LUT Sequence is malformed.",
                          fix="Choose 'window' (the file's Window Center/Width) or 'full_range'.") from None
    return _normalise_voi(out, float(np.min(table)), float(np.max(table)))


def _voi_failed(step: str, err: Exception, message: str, *, fix: str) -> CXRInputError:
    """The error for a VOI step pydicom could not apply. Only the exception's type is logged: its text may quote
    the header."""
    logger.debug("%s failed: %s", step, type(err).__name__)
    return CXRInputError(message, input_name="window", fix=fix)


def _normalise_voi(out: np.ndarray, y_min: float, y_max: float) -> np.ndarray:
    """Map the VOI output range [y_min, y_max] to [0, 1]; a VOI that flattens the image is an error."""
    if y_max == y_min or float(np.min(out)) == float(np.max(out)):
        raise CXRInputError(
            "the file's VOI (window or LUT) maps every pixel to the same grey level.",
            input_name="window",
            fix="Choose 'full_range' to show the whole range of the stored values.",
        )
    return (out.astype(np.float64) - y_min) / (y_max - y_min)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing; zero/invalid means unknown."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        # Some files (RG1_UNCR.dcm among them) store "0.000\0.000": present but meaningless.
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return (row, col)
    return None


def _int_or(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default
