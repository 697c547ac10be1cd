"""The edit and keep regions (and optionally the organ masks) as one DICOM Segmentation of the exported image.

Built with highdicom (the optional ``[audit]`` extra), which writes the Segmentation IOD from the image it
segments: the SEG shares the exported image's Frame of Reference, names it in its Referenced Series Sequence and
each frame's Source Image, and copies its patient and study (empty when patient data was removed, since the
exported image is de-identified). So a viewer that opens both overlays where the image was changed.

Segments (BINARY, at the image's native size, always in this order):

1. ``edit region``: where the counterfactual may differ from the source (the edit region, feather included,
   brought back to native size: every pixel with a weight above 0);
2. ``keep region``: the rest, where the patient's pixels were kept;
3. onwards: the organ masks, each above 0.5 at native size, when asked for.

Codes: the regions use a local coding scheme (``99CXRCF``, DICOM's private-scheme form), the organs SNOMED CT.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..errors import CXRInputError

INSTALL_HINT = 'pip install "cxr-counterfactual[audit]" (or pip install highdicom) and restart ComfyUI'
SERIES_NUMBER = 9902
LOCAL_SCHEME = "99CXRCF"
# Organ name → (SNOMED CT code, meaning).
ORGAN_CODES: dict[str, tuple[str, str]] = {
    "right_lung": ("3341006", "Right lung"), "left_lung": ("44029006", "Left lung"), "heart": ("80891009", "Heart"),
    "lungs": ("39607008", "Lung"),
}


@dataclass(frozen=True)
class Segment:
    """One segment: its label, a ``[H, W]`` bool mask at the image's size, and whether it is an organ."""

    label: str
    mask: np.ndarray
    organ: bool = False


def highdicom_available() -> bool:
    return importlib.util.find_spec("highdicom") is not None


def region_segments(edit: np.ndarray, organs: Sequence[tuple[str, np.ndarray]] = ()) -> list[Segment]:
    """The segments of one exported frame from its edit weights at native size (``[H, W]`` in [0, 1]).

    Raises:
        CXRInputError: the edit region is empty at native size (nothing would show where the image changed).
    """
    changed = np.asarray(edit) > 0
    if not changed.any():
        raise CXRInputError(
            "the edit region is empty at the radiograph's native size: a Segmentation would show no change.",
            input_name="edit_region", fix="Connect the edit_region the edit was made with (Edit / Keep Regions), "
            "or disconnect it to export without a Segmentation.")
    segments = [Segment("edit region", changed), Segment("keep region", ~changed)]
    segments += [Segment(name, np.asarray(mask) > 0.5, organ=True) for name, mask in organs]
    return segments


def _code(label: str, organ: bool) -> tuple[Any, Any]:
    """(category, type) coded concepts of a segment."""
    from highdicom.sr import CodedConcept

    if organ:
        code, meaning = ORGAN_CODES.get(label, ("91723000", "Anatomical structure"))
        return CodedConcept("91723000", "SCT", "Anatomical Structure"), CodedConcept(code, "SCT", meaning)
    value = "EDIT" if label.startswith("edit") else "KEEP"
    meaning = "Counterfactual edit region" if value == "EDIT" else "Region kept from the source"
    return CodedConcept("REGION", LOCAL_SCHEME, "Image region"), CodedConcept(value, LOCAL_SCHEME, meaning)


def segmentation_dataset(image: Dataset, segments: Sequence[Segment], *, version: str,
                         description: str) -> Dataset:
    """A DICOM SEG of ``image`` (the exported derived image, with its Frame of Reference UID) holding ``segments``.

    Raises:
        CXRInputError: highdicom is not installed, or a mask is not at the image's size.
    """
    if not highdicom_available():
        raise CXRInputError("a DICOM Segmentation needs the optional package highdicom.", fix=INSTALL_HINT)
    import highdicom as hd

    size = (int(image.Rows), int(image.Columns))
    for s in segments:
        if s.mask.shape != size:
            raise CXRInputError(f"the {s.label} is {s.mask.shape[0]}×{s.mask.shape[1]}, not the exported image's "
                                f"{size[0]}×{size[1]}.", fix="Connect masks of the radiograph that was exported.")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="cxr_counterfactual", version=version,
        family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing"))
    descriptions = []
    for number, s in enumerate(segments, start=1):
        category, kind = _code(s.label, s.organ)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=s.label, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    pixels = np.stack([s.mask for s in segments], axis=-1)[None]  # [frames=1, H, W, segments]
    # highdicom 0.28 turns the image's Pixel Spacing into a Pixel Measures Sequence without Slice Thickness, which
    # its own reader (and the IOD) then refuses; a projection radiograph has no slice thickness to give. The SEG
    # lies on the image's own pixel grid (one frame per segment, each naming the image as its source), so it is
    # built from the header without the spacing: a viewer overlays it pixel for pixel.
    header = Dataset()
    header.update({e.tag: e for e in image if e.keyword not in ("PixelData", "PixelSpacing", "ImagerPixelSpacing")})
    header.file_meta = image.file_meta
    seg = hd.seg.Segmentation(
        source_images=[header], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cxr_counterfactual",
        manufacturer_model_name="cxr_counterfactual", software_versions=version, device_serial_number="none",
        content_description=description[:64], content_label="CXR_EDIT", series_description=description[:64],
        omit_empty_frames=False)
    return seg


def seg_bytes(seg: Dataset) -> bytes:
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
