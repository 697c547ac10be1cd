"""Write a counterfactual at the radiograph's native size: 8/16-bit PNG and a derived DICOM, never over a file.

Pixels: the edit is brought back to native size (:func:`~.geometry.undo_fit`), made grey (mean of the RGB
channels) and quantised as ``round(grey · (2^bits − 1))``. A PNG always uses its whole range (16-bit:
0–65535) and is display-ready (bright = dense). A DICOM stores ``bits`` bits (the source's Bits Stored by
default); for a MONOCHROME1 source the values are inverted (``max − value``) and it stays MONOCHROME1. Its
window (centre 2^(bits−1), width 2^bits, linear) maps the stored range back onto the same grey levels,
so a viewer (and :func:`~.dicom.read_dicom`) shows exactly the exported image.

DICOM header: a Secondary Capture instance with Conversion Type ``SYN`` (synthetic image), Image Type
``DERIVED\\SECONDARY``, "SYNTHETIC COUNTERFACTUAL" as Series Description, Derivation Description and Image
Comments, Burned In Annotation ``NO``, new SOP Instance and Series Instance UIDs. From a source DICOM:

- ``keep_patient_data=False`` (default): only an allow-list of acquisition/geometry elements is copied
  (:data:`DEIDENTIFIED_KEEP`); patient, study and institution elements are present but empty where the IOD
  requires them, the Study Instance UID is new, Patient Identity Removed is YES. An allow-list cannot leak
  an element nobody thought of (a private tag, a request sequence quoting an accession number).
- ``keep_patient_data=True``: the whole header is copied (private tags, overlays and the source's
  pixel-value elements such as windows, LUTs and pixel ranges dropped, since they describe the source's
  pixels), the study kept, and a Source Image Sequence points at the source image.

This is not a certified de-identification profile (PS3.15 Annex E): burned-in text in the pixels and
anything the edit itself shows are not inspected.

Audit trail (:mod:`.provenance`): the provenance document is written into a private block (:func:`add_provenance`):
group ``0x0071``, private creator :data:`PRIVATE_CREATOR`, elements ``0x01`` schema (LO), ``0x02`` provenance
SHA-256 (LO), ``0x03`` the document as canonical JSON (UT). A source's own private tags are never copied.
"""

from __future__ import annotations

import copy
import datetime
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ..errors import CXRInputError

SYNTHETIC_TEXT = "synthetic counterfactual, not a real radiograph"
DESCRIPTION = "SYNTHETIC COUNTERFACTUAL"
DERIVATION = ("SYNTHETIC COUNTERFACTUAL: diffusion-model edit of a source radiograph made with cxr_counterfactual; "
              "not a real radiograph, not for diagnosis")
DEIDENTIFIED_KEEP = (
    "SpecificCharacterSet", "Modality", "BodyPartExamined", "ViewPosition", "PatientOrientation", "Laterality",
    "ImageLaterality", "PixelSpacing", "ImagerPixelSpacing", "PixelSpacingCalibrationType",
    "PixelSpacingCalibrationDescription", "EstimatedRadiographicMagnificationFactor", "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign", "PresentationLUTShape", "RescaleType", "RescaleSlope", "RescaleIntercept",
)
# Type 2 elements of the Patient, General Study and General Series modules: present, empty when de-identified (and
# when a kept header lacks them).
EMPTY_WHEN_DEIDENTIFIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PatientOrientation",
)
# Elements that describe the *source's* pixels (values, LUTs, windows, frames, icons): stale for new pixels.
SOURCE_PIXEL_ELEMENTS = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames", "FrameIncrementPointer",
    "ModalityLUTSequence", "VOILUTSequence", "VOILUTFunction", "WindowCenter", "WindowWidth",
    "WindowCenterWidthExplanation", "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
    "PixelPaddingRangeLimit", "PresentationLUTSequence", "ICCProfile", "IconImageSequence", "PlanarConfiguration",
    "SourceImageSequence", "ReferencedImageSequence", "DerivationCodeSequence",
)


def exclusive_paths(folder: str | os.PathLike[str], stem: str, counter: int,
                    suffixes: Iterable[str]) -> tuple[int, dict[str, Path]]:
    """The first counter ≥ ``counter`` at which ``{stem}_{counter:05}_{suffix}`` exists for no suffix.

    ComfyUI's SaveImage numbering (its counter comes from ``folder_paths.get_save_image_path``); the files
    are then created with :func:`write_new`, which refuses an existing file even if one appeared meanwhile.
    """
    folder = Path(folder)
    suffixes = list(suffixes)
    while True:
        paths = {s: folder / f"{stem}_{counter:05}_{s}" for s in suffixes}
        if not any(p.exists() for p in paths.values()):
            return counter, paths
        counter += 1


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``; never replaces an existing file (exclusive create)."""
    with open(path, "xb") as f:
        f.write(data)


def quantise(grey: np.ndarray, bits: int, invert: bool = False) -> np.ndarray:
    """``[H, W]`` grey in [0, 1] → integers ``round(grey · (2^bits − 1))`` (uint8 up to 8 bits, else uint16)."""
    if not 1 <= bits <= 16:
        raise CXRInputError(f"{bits} bits per pixel is not supported.", fix="Use 8 to 16 bits.")
    top = 2**bits - 1
    g = np.clip(np.asarray(grey, dtype=np.float64), 0.0, 1.0)
    values = np.rint((1.0 - g if invert else g) * top)
    return values.astype(np.uint8 if bits <= 8 else np.uint16)


def png_bytes(grey: np.ndarray, bits: int, text: dict[str, str]) -> bytes:
    """A grey PNG (8-bit ``L`` or 16-bit ``I;16``, full range) with ``text`` as tEXt chunks."""
    if bits not in (8, 16):
        raise CXRInputError(f"a PNG holds 8 or 16 bits, not {bits}.", input_name="bit_depth", fix="Pick 8 or 16.")
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(quantise(grey, bits)).save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def read_source_header(path: str, height: int, width: int) -> Dataset:
    """The header (no pixels) of the DICOM a radiograph was loaded from, checked against its native size."""
    fix = "Keep the DICOM file in ComfyUI's input folder until the export ran (or load it again)."
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        raise CXRInputError("the source DICOM file is gone from where it was loaded.", fix=fix) from None
    except Exception:  # noqa: BLE001 - a parser message may quote the header: never pass it on
        raise CXRInputError("the source DICOM file can no longer be read.", fix=fix) from None
    if (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) != (height, width):
        raise CXRInputError(f"the source DICOM file is no longer the {height}×{width} radiograph that was loaded.",
                            fix=fix)
    return ds


def derived_dataset(stored: np.ndarray, bits: int, photometric: str, *, source: Dataset | None = None,
                    keep_patient_data: bool = False,
                    pixel_spacing_mm: tuple[float, float] | None = None) -> Dataset:
    """A Secondary Capture dataset for ``stored`` (``[H, W]`` from :func:`quantise`), see the module doc."""
    if source is not None and keep_patient_data:
        ds = copy.deepcopy(source)
        ds.remove_private_tags()
        for tag in [t for t in ds.keys() if t.group in range(0x6000, 0x6020) or t.group in range(0x5000, 0x5020)]:
            del ds[tag]  # overlay and curve planes drawn over the source's pixels
        for keyword in SOURCE_PIXEL_ELEMENTS:
            if keyword in ds:
                delattr(ds, keyword)
        if "SOPInstanceUID" in source:
            ref = Dataset()
            ref.ReferencedSOPClassUID = source.get("SOPClassUID", SecondaryCaptureImageStorage)
            ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
            ds.SourceImageSequence = Sequence([ref])
        if "StudyInstanceUID" not in ds:
            ds.StudyInstanceUID = generate_uid()
    else:
        ds = Dataset()
        if source is not None:
            for keyword in DEIDENTIFIED_KEEP:
                if keyword in source:
                    ds.add(copy.deepcopy(source[keyword]))
        ds.StudyInstanceUID = generate_uid()
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "cxr_counterfactual allow-list: geometry, acquisition"
    for keyword in EMPTY_WHEN_DEIDENTIFIED:  # Type 2: present, if need be empty (a kept header may lack some)
        if keyword not in ds:
            setattr(ds, keyword, "")
    if not ds.get("Modality"):
        ds.Modality = "OT"  # unknown acquisition (the source was an ordinary image file)
    if "BodyPartExamined" not in ds:
        ds.BodyPartExamined = "CHEST"
    if pixel_spacing_mm is not None and "PixelSpacing" not in ds and "ImagerPixelSpacing" not in ds:
        ds.PixelSpacing = [f"{pixel_spacing_mm[0]:.6g}", f"{pixel_spacing_mm[1]:.6g}"]
    _mark_synthetic(ds)
    _set_pixels(ds, stored, bits, photometric)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _mark_synthetic(ds: Dataset) -> None:
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    # The synthetic image shares no patient coordinate system with the source: it gets a Frame of Reference of its
    # own, which its DICOM Segmentation (the edit and keep regions, :mod:`.dicom_seg`) shares.
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ConversionType = "SYN"  # DICOM's defined term for a synthetic image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = DESCRIPTION
    ds.DerivationDescription = DERIVATION
    ds.ImageComments = DERIVATION
    ds.BurnedInAnnotation = "NO"
    ds.SeriesNumber = 9901
    ds.InstanceNumber = 1
    now = datetime.datetime.now()
    for prefix in ("Series", "Content", "InstanceCreation"):
        setattr(ds, f"{prefix}Date", now.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", now.strftime("%H%M%S"))


def _set_pixels(ds: Dataset, stored: np.ndarray, bits: int, photometric: str) -> None:
    rows, cols = stored.shape
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    # A linear window over the whole stored range: y = x / (2^bits − 1) (PS3.3 C.11.2.1.2.1).
    ds.WindowCenter = 2 ** (bits - 1)
    ds.WindowWidth = 2**bits
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0  # stored values are the output; no modality transform
    if "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    dtype = np.uint8 if bits <= 8 else np.dtype("<u2")
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    ds["PixelData"].VR = "OB" if bits <= 8 else "OW"


PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "CXR_COUNTERFACTUAL PROVENANCE"


def add_provenance(ds: Dataset, schema: str, digest: str, document: str) -> None:
    """Write the audit trail into the documented private block (see the module doc)."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", schema)
    block.add_new(0x02, "LO", digest)
    block.add_new(0x03, "UT", document)


def read_provenance(ds: Dataset) -> str | None:
    """The document :func:`add_provenance` wrote, or None."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return str(block[0x03].value)
    except KeyError:
        return None


def dicom_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (explicit VR little endian)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
