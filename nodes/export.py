"""Export node: the counterfactual at the radiograph's native size as 8/16-bit PNG and/or derived DICOM."""

from __future__ import annotations

import json
import logging

import torch
from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..errors import CXRInputError
from ..imaging.export import (
    DERIVATION,
    SYNTHETIC_TEXT,
    derived_dataset,
    dicom_bytes,
    exclusive_paths,
    png_bytes,
    quantise,
    read_source_header,
    write_new,
)
from ..imaging.geometry import FitRecord, undo_fit
from .common import check_inputs, output_location, user_errors, validation_of
from .schema import CATEGORY_OUTPUT, FitType, described

logger = logging.getLogger(__name__)

FORMATS = ("png", "dicom", "png+dicom")
BIT_DEPTHS = ("auto", "8", "16")


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
    source DICOM's header copied and patient data removed unless kept on purpose."""

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
                                 tooltip="DICOM only. Off: only image geometry/acquisition elements are copied from "
                                 "the source, identifiers left empty, a new study. On: the whole header, patient and "
                                 "study included (for filing next to the source inside your institution)."),
                io.Boolean.Input("include_workflow", default=True,
                                 tooltip="PNG only: store the ComfyUI prompt and workflow in the PNG, as Save Image "
                                 "does. They name input files, which may name the patient: turn off to share."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The grey edit at native size, as exported."),
                io.String.Output(display_name="files", tooltip="The files written, relative to the output folder."),
            ],
        )

    @classmethod
    def validate_inputs(cls, format: str = "png", bit_depth: str = "auto") -> bool | str:
        return validation_of(cls, format=format, bit_depth=bit_depth)  # a bad API value stops before the graph runs

    @classmethod
    def execute(cls, image: torch.Tensor, fit: FitRecord, filename_prefix: str, format: str, bit_depth: str,
                keep_patient_data: bool, include_workflow: bool) -> io.NodeOutput:
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
        suffixes = [s for s, on in ((".png", "png" in format), (".dcm", "dicom" in format)) if on]
        folder, stem, counter, subfolder = output_location(cls.TITLE, filename_prefix, fit.native_width,
                                                           fit.native_height)
        text = cls._png_text(include_workflow)
        written, saved = [], []
        for frame in grey.numpy():
            counter, paths = exclusive_paths(folder, stem, counter, suffixes)
            if ".png" in paths:
                write_new(paths[".png"], png_bytes(frame, png_bits, text))
                saved.append(ui.SavedResult(paths[".png"].name, subfolder, io.FolderType.output))
            if ".dcm" in paths:
                ds = derived_dataset(quantise(frame, dicom_bits, invert=photometric == "MONOCHROME1"), dicom_bits,
                                     photometric, source=source, keep_patient_data=keep_patient_data,
                                     pixel_spacing_mm=geometry.pixel_spacing_mm if geometry is not None else None)
                write_new(paths[".dcm"], dicom_bytes(ds))
            written += [f"{subfolder}/{p.name}" if subfolder else p.name for p in paths.values()]
            counter += 1
        logger.info("CXR export: wrote %d file(s)", len(written))
        files = "\n".join(written)
        out_image = grey[..., None].expand(-1, -1, -1, 3).contiguous()
        return io.NodeOutput(out_image, files, ui={"images": saved, "text": (files,)})

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
