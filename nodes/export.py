"""Export node: the counterfactual at the radiograph's native size as 8/16-bit PNG and/or derived DICOM, with its audit
trail (provenance sidecar JSON, PNG text, DICOM private block) and the edit/keep regions as a DICOM Segmentation."""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

import torch
from comfy.cli_args import args
from comfy_api.latest import io, ui

from .. import __version__
from ..attention.organs import OrganMasks
from ..errors import CXRInputError
from ..imaging.dicom_seg import region_segments, seg_bytes, segmentation_dataset
from ..imaging.export import (
    DERIVATION,
    DESCRIPTION,
    SYNTHETIC_TEXT,
    add_provenance,
    derived_dataset,
    dicom_bytes,
    exclusive_paths,
    png_bytes,
    quantise,
    read_source_header,
    write_new,
)
from ..imaging.geometry import FitRecord, native_region, undo_fit
from ..imaging.provenance import SCHEMA, canonical_json
from .audit import provenance
from .common import check_inputs, output_location, user_errors, validation_of
from .schema import CATEGORY_OUTPUT, FitType, OrganMasksType, described

logger = logging.getLogger(__name__)

FORMATS = ("png", "dicom", "png+dicom")
BIT_DEPTHS = ("auto", "8", "16")
SIDECAR, SEG = ".json", "seg.dcm"  # suffixes after ComfyUI's ``name_00001_``
PNG_KEY = "cxr_provenance"  # the PNG text chunk holding the provenance document


def native_grey(title: str, image: torch.Tensor, fit: FitRecord) -> torch.Tensor:
    """``[B, H, W]`` grey at native size from an IMAGE on the fitted grid (or already at native size)."""
    x = image[..., :3].float().mean(-1, keepdim=True).movedim(-1, 1).cpu()
    size = tuple(image.shape[1:3])
    if size == (fit.height, fit.width):
        x = undo_fit(x, fit)
    elif size != (fit.native_height, fit.native_width):
        raise CXRInputError(
            f"the image is {size[0]}×{size[1]}, neither the fitted {fit.height}×{fit.width} nor the native "
            f"{fit.native_height}×{fit.native_width} size of this fit.", node=title, input_name="image",
            fix="Connect the decoded edit of the radiograph that 'fit' came from.")
    return x[:, 0].clamp(0, 1)


class CXRExportCounterfactual(io.ComfyNode):
    """Writes the edit at the radiograph's native size into ComfyUI's output folder, never over an existing file: a
    grey PNG (16-bit for a DICOM or 16-bit source) marked synthetic in its text chunks, and/or a DICOM Secondary
    Capture marked SYNTHETIC COUNTERFACTUAL (Conversion Type SYN, Image Type DERIVED\\SECONDARY, new UIDs), with the
    source DICOM's header copied and patient data removed unless kept on purpose. Every export carries its audit
    trail (checkpoint hashes, versions, seeds, every stage's settings, the mask source, what the run measured) in a
    sidecar JSON, the PNG's text and the DICOM; with the edit region connected, a DICOM Segmentation of the edit and
    keep regions (and optionally the organs) references the exported DICOM, so a PACS viewer shows what changed."""

    TITLE = "Export Counterfactual (native size)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRExportCounterfactual", display_name=cls.TITLE, category=CATEGORY_OUTPUT, is_output_node=True,
            description=described(cls),
            inputs=[
                io.Image.Input("image", tooltip="The edit: on the fitted grid (decoded by the VAE) or already at "
                               "native size."),
                FitType.Input("fit", tooltip="The 'fit' output of Fit Radiograph to Model (feed its 'geometry' from "
                              "Load DICOM to export DICOM with the source's header and bit depth)."),
                io.String.Input("filename_prefix", default="cxr_counterfactual/counterfactual",
                                tooltip="Like Save Image: a subfolder and file prefix in ComfyUI's output folder; "
                                "files are numbered name_00001_.png / .dcm."),
                io.Combo.Input("format", options=list(FORMATS), default="png", tooltip="Which files to write."),
                io.Combo.Input("bit_depth", options=list(BIT_DEPTHS), default="auto",
                               tooltip="auto: the source's (PNG 16-bit when the source had more than 8 bits; DICOM "
                               "its Bits Stored). 8 or 16 forces it."),
                io.Boolean.Input("keep_patient_data", default=False,
                                 tooltip="Off: the DICOM copies only image geometry/acquisition elements from the "
                                 "source, identifiers left empty, a new study; the audit trail names input files and "
                                 "CheXmask row ids by their SHA-256 only. On: the whole header, patient and study "
                                 "included, and the trail names them (for filing next to the source inside your "
                                 "institution)."),
                io.Boolean.Input("include_workflow", default=True,
                                 tooltip="PNG only: store the ComfyUI prompt and workflow in the PNG, as Save Image "
                                 "does. They name input files, which may name the patient: turn off to share."),
                io.Mask.Input("edit_region", optional=True,
                              tooltip="Optional: the edit region the edit was made with (Edit / Keep Regions' "
                              "edit_region, on the fitted grid or at native size). With a DICOM export it is written "
                              "as a DICOM Segmentation (name_00001_seg.dcm: segment 1 the edit region, every pixel "
                              "with weight above 0 at native size; segment 2 the keep region, the rest) that "
                              "references the exported image."),
                OrganMasksType.Input("organ_masks", optional=True,
                                     tooltip="Optional: the organ masks (fitted grid), added to the Segmentation as "
                                     "further segments when 'segment_organs' is on."),
                io.Boolean.Input("segment_organs", default=False, optional=True,
                                 tooltip="Add the connected organ masks to the DICOM Segmentation (each above 0.5 at "
                                 "native size)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The grey edit at native size, as exported."),
                io.String.Output(display_name="files", tooltip="The files written, relative to the output folder (the "
                                 "images, their provenance sidecar JSON and any DICOM Segmentation)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, format: str = "png", bit_depth: str = "auto") -> bool | str:
        return validation_of(cls, format=format, bit_depth=bit_depth)  # a bad API value stops before the graph runs

    @classmethod
    def execute(cls, image: torch.Tensor, fit: FitRecord, filename_prefix: str, format: str, bit_depth: str,
                keep_patient_data: bool, include_workflow: bool, edit_region: torch.Tensor | None = None,
                organ_masks: OrganMasks | None = None, segment_organs: bool = False) -> io.NodeOutput:
        check_inputs(cls, format=format, bit_depth=bit_depth)
        grey = native_grey(cls.TITLE, image, fit)
        geometry = fit.geometry
        source_bits = max(8, min(16, geometry.bits_stored)) if geometry is not None else 8
        dicom_bits = source_bits if bit_depth == "auto" else int(bit_depth)
        png_bits = 16 if dicom_bits > 8 else 8
        photometric = "MONOCHROME1" if geometry is not None and geometry.photometric == "MONOCHROME1" else "MONOCHROME2"
        source = None
        if "dicom" in format and geometry is not None and geometry.source_path:
            with user_errors(cls.TITLE, "fit"):
                source = read_source_header(geometry.source_path, fit.native_height, fit.native_width)
        # Everything that can fail is settled before the first file is written: the regions, the hashes.
        segments = cls._segments(grey.shape[0], fit, edit_region, organ_masks if segment_organs else None) \
            if "dicom" in format and edit_region is not None else None
        if edit_region is not None and "dicom" not in format:
            logger.info("CXR export: edit_region given but no DICOM exported: no Segmentation written")
        hidden = cls.hidden
        with user_errors(cls.TITLE):
            trail = provenance(hidden.prompt if hidden else None, hidden.unique_id if hidden else None,
                               keep_patient_data)
        suffixes = [s for s, on in ((".png", "png" in format), (".dcm", "dicom" in format), (SEG, segments is not None),
                                    (SIDECAR, True)) if on]
        folder, stem, counter, subfolder = output_location(cls.TITLE, filename_prefix, fit.native_width,
                                                           fit.native_height)
        settings = {"format": format, "bit_depth": bit_depth, "png_bits": png_bits if "png" in format else None,
                    "dicom_bits": dicom_bits if "dicom" in format else None, "photometric": photometric,
                    "keep_patient_data": keep_patient_data, "include_workflow": include_workflow,
                    "segment_organs": segment_organs}
        text = cls._png_text(include_workflow)
        written, saved = [], []
        for index, frame in enumerate(grey.numpy()):
            counter, paths = exclusive_paths(folder, stem, counter, suffixes)
            names = {s: f"{subfolder}/{p.name}" if subfolder else p.name for s, p in paths.items()}
            blobs: dict[str, bytes] = {}
            export: dict[str, Any] = {"frame": index, "frames": int(grey.shape[0]), "settings": settings,
                                      "files": list(names.values()),
                                      "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
            document = {**trail, "export": export}
            if ".dcm" in paths:
                ds = derived_dataset(quantise(frame, dicom_bits, invert=photometric == "MONOCHROME1"), dicom_bits,
                                     photometric, source=source, keep_patient_data=keep_patient_data,
                                     pixel_spacing_mm=geometry.pixel_spacing_mm if geometry is not None else None)
                export["dicom"] = {"sop_instance_uid": ds.SOPInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
                                   "frame_of_reference_uid": ds.FrameOfReferenceUID}
                if segments is not None:
                    with user_errors(cls.TITLE, "edit_region"):
                        seg = segmentation_dataset(ds, segments[index], version=__version__,
                                                   description=f"{DESCRIPTION} REGIONS")
                    export["segmentation"] = {"sop_instance_uid": seg.SOPInstanceUID,
                                              "segments": [s.label for s in segments[index]]}
                add_provenance(ds, SCHEMA, trail["provenance_sha256"], canonical_json(document))
                blobs[".dcm"] = dicom_bytes(ds)
                if segments is not None:
                    add_provenance(seg, SCHEMA, trail["provenance_sha256"], canonical_json(document))
                    blobs[SEG] = seg_bytes(seg)
            if ".png" in paths:
                blobs[".png"] = png_bytes(frame, png_bits, {**text, PNG_KEY: canonical_json(document)})
            blobs[SIDECAR] = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()
            for suffix, path in paths.items():
                write_new(path, blobs[suffix])
            if ".png" in paths:
                saved.append(ui.SavedResult(paths[".png"].name, subfolder, io.FolderType.output))
            written += list(names.values())
            counter += 1
        logger.info("CXR export: wrote %d file(s), provenance %s", len(written), trail["provenance_sha256"][:12])
        files = "\n".join(written)
        out_image = grey[..., None].expand(-1, -1, -1, 3).contiguous()
        return io.NodeOutput(out_image, files, ui={"images": saved, "text": (files,)})

    @classmethod
    def _segments(cls, frames: int, fit: FitRecord, edit_region: torch.Tensor,
                  organ_masks: OrganMasks | None) -> list[list]:
        """Each frame's segments at native size (edit, keep, organs); an empty edit region stops the export."""
        if edit_region.ndim not in (2, 3) or not bool(torch.isfinite(edit_region).all()):
            raise CXRInputError(f"expected a MASK [B, H, W] of finite values, got shape {tuple(edit_region.shape)}.",
                                node=cls.TITLE, input_name="edit_region",
                                fix="Connect Edit / Keep Regions' edit_region.")
        with user_errors(cls.TITLE, "edit_region", fix="Connect the edit region made on this fit's grid."):
            region = native_region(edit_region.reshape(-1, *edit_region.shape[-2:]).cpu(), fit)
        if region.shape[0] not in (1, frames):
            raise CXRInputError(f"{region.shape[0]} edit regions for {frames} images.", node=cls.TITLE,
                                input_name="edit_region", fix="Use one edit region, or one per image.")
        organs: list[tuple[str, Any]] = []
        if organ_masks is not None:
            with user_errors(cls.TITLE, "organ_masks", fix="Connect the organ masks of this fit's grid."):
                native = native_region(organ_masks.data, fit).numpy()
            organs = list(zip(organ_masks.names, native, strict=True))
        out = []
        for index in range(frames):
            with user_errors(cls.TITLE, "edit_region"):
                out.append(region_segments(region[min(index, region.shape[0] - 1)].numpy(), organs))
        return out

    @classmethod
    def _png_text(cls, include_workflow: bool) -> dict[str, str]:
        """Text chunks: the prompt and workflow (as SaveImage writes them) unless left out, then our marks."""
        text: dict[str, str] = {}
        hidden = cls.hidden
        if include_workflow and not args.disable_metadata and hidden is not None:
            if hidden.prompt:
                text["prompt"] = json.dumps(hidden.prompt)
            for key, value in (hidden.extra_pnginfo or {}).items():
                text[key] = json.dumps(value)
        text["cxr_counterfactual"] = SYNTHETIC_TEXT  # last, so no workflow key can replace the marks
        text["Comment"] = DERIVATION
        return text


NODES: list[type[io.ComfyNode]] = [CXRExportCounterfactual]
