"""Shared by the DICOM tests: the real RG1_UNCR.dcm, synthetic files written with pydicom, error checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from conftest import need
from cxr_counterfactual.errors import CXRInputError

# Native-pixel regions of RG1_UNCR.dcm (PA view): both lungs and the mediastinum/spine between them.
LUNG_BOXES = ((slice(500, 1100), slice(300, 700)), (slice(500, 1100), slice(1200, 1550)))
MEDIASTINUM = (slice(400, 1000), slice(850, 1000))

# Patient data that must never leave read_dicom (all written into one synthetic file).
IDENTIFIERS: dict[str, Any] = {
    "PatientName": "Doe^Jane^SECRET",
    "PatientID": "PID-93731",
    "PatientBirthDate": "19410317",
    "AccessionNumber": "ACC-55821X",
    "InstitutionName": "St Hidden Infirmary",
    "ReferringPhysicianName": "Quill^Ramona",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77331",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.77332",
    "StudyDate": "20190607",
    "StudyID": "STUDY-4471",
    "OtherPatientIDs": "OTHER-88213",
    "PatientAddress": "12 Lantern Row",
}


# --------------------------------------------------------------------------------------------- helpers


def rg1_path() -> Path:
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(path is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    return Path(str(path))


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encapsulated: bool = False,
    with_pixels: bool = True,
    **elements: Any,
) -> Path:
    """A minimal valid Part-10 DICOM radiograph (file meta, explicit VR little endian unless told).

    Args:
        path: where to write it.
        pixels: ``[H, W]`` grey, ``[F, H, W]`` frames, or ``[H, W, 3]`` for RGB (8-bit).
        photometric: Photometric Interpretation.
        bits_stored: Bits Stored (16 bits allocated unless the data is 8-bit).
        signed: Pixel Representation 1.
        transfer_syntax: the file meta Transfer Syntax UID.
        encapsulated: store the (uncompressed) bytes as one encapsulated fragment, as compressed
            transfer syntaxes require.
        with_pixels: leave Pixel Data out when False.
        **elements: any further elements by keyword (window, rescale, identifiers, ...).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    rows, cols = (pixels.shape[0], pixels.shape[1]) if colour or pixels.ndim == 2 else pixels.shape[1:]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if with_pixels:
        dtype = {(8, False): np.uint8, (16, False): "<u2", (16, True): "<i2"}[(ds.BitsAllocated, signed)]
        raw = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
        if encapsulated:
            ds.PixelData = encapsulate([raw])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = raw
            ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR windowing (PS3.3 C.11.2.1.2.1) as a fraction of the output range."""
    c, w = center - 0.5, width - 1.0
    out = (values.astype(np.float64) - c) / w + 0.5
    out[values <= c - w / 2] = 0.0
    out[values > c + w / 2] = 1.0
    return out


def ramp(height: int, width: int, lo: int, hi: int, seed: int = 0) -> np.ndarray:
    """A smooth ramp from lo to hi plus a little noise: varied values that hit both ends."""
    rng = np.random.default_rng(seed)
    base = np.linspace(lo, hi, height * width).reshape(height, width)
    noisy = base + rng.integers(-3, 4, size=base.shape)
    noisy.flat[0], noisy.flat[-1] = lo, hi
    return np.clip(np.rint(noisy), lo, hi).astype(np.int64)


def expect_error(call: Callable[[], object], *needles: str) -> CXRInputError:
    """Run ``call``; it must raise CXRInputError whose text holds every needle (case-insensitive)."""
    with pytest.raises(CXRInputError) as info:
        call()
    text = str(info.value).lower()
    for needle in needles:
        assert needle.lower() in text, f"{needle!r} not in error: {info.value}"
    assert info.value.fix, "every user error carries a fix"
    return info.value
