"""Node that loads a chest radiograph (DICOM, PNG or JPEG) as an IMAGE plus its native geometry.

The node id stays ``CXRLoadDICOM`` and its inputs stay ``dicom_file``, ``window`` in that order: saved
workflows store widget values by position and API workflows by name. The decoding lives in
:mod:`..imaging.radiograph`.

No upload button: ComfyUI's frontend (comfyui-frontend-package 1.27) offers upload widgets only for images,
videos and audio, and each silently drops any file whose browser MIME type is not ``image/*`` /
``video/*`` / ``audio/*``; a ``.dcm`` file is ``application/dicom`` (or has no type). An image-upload widget
would also add a widget value after the file name, shifting ``window`` in every saved workflow. Users copy
the file into ``ComfyUI/input`` (subfolders allowed) or post it to ComfyUI's ``/upload/image`` endpoint,
which stores any file (PNG/JPEG uploaded for Load Image land there too); then refresh.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..errors import CXRInputError
from ..imaging.dicom import WINDOW_MODES
from ..imaging.radiograph import is_radiograph_name, read_radiograph
from .common import check_inputs, file_fingerprint, resolve_input_file, user_errors
from .schema import CATEGORY_INPUT, GeometryType, described

_COPY_FIX = (
    "Copy the radiograph (DICOM, PNG or JPEG) into ComfyUI's input folder (ComfyUI/input, subfolders "
    "allowed), refresh the page and pick it in the list."
)


def input_radiograph_files() -> list[str]:
    """Files in ComfyUI's input folder (and its subfolders) that may be radiographs, as '/'-separated names.

    DICOM (.dcm, .dicom, or no extension, as PACS exports often name files ``IM000001``), PNG and JPEG;
    hidden files and folders and ``DICOMDIR`` indexes (no pixel data) are left out.
    """
    root = folder_paths.get_input_directory()
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if is_radiograph_name(name):
                found.append(name if rel == "." else Path(rel, name).as_posix())
    return sorted(found)


def _resolve(name: str) -> Path:
    return resolve_input_file(name, fix=_COPY_FIX)


class CXRLoadDICOM(io.ComfyNode):
    """Loads a chest radiograph from a DICOM, PNG or JPEG file in ComfyUI's input folder, recognised by its content.
    DICOM: the file's rescale and VOI (window or VOI LUT), 12–16-bit data scaled by its real range, MONOCHROME1
    shown inverted so bone is bright; a multi-frame file gives its first frame (with a warning in the log).
    PNG/JPEG: the file's whole bit depth with no window (a 16-bit PNG keeps its 65536 grey levels), colour made
    grey. Patient data (DICOM header, PNG text, EXIF) is never passed on. No upload button (the frontend's would
    drop DICOM files): copy the file into ComfyUI/input and refresh."""

    TITLE = "Load Chest X-ray (DICOM/PNG/JPEG)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRLoadDICOM",
            display_name=cls.TITLE,
            category=CATEGORY_INPUT,
            description=described(cls),
            inputs=[
                io.Combo.Input(
                    "dicom_file",
                    options=input_radiograph_files(),
                    tooltip="Radiograph in ComfyUI's input folder: DICOM (.dcm, .dicom or no extension), PNG "
                    "(8- or 16-bit, grey or colour) or JPEG; subfolders listed as folder/name. Copy files into "
                    "ComfyUI/input and refresh the page to list them. Colour files become grey by ITU-R "
                    "BT.601 luma (0.299 R + 0.587 G + 0.114 B; equal channels give their grey exactly); an "
                    "alpha channel must be fully opaque (it is then dropped); the EXIF orientation is applied.",
                ),
                io.Combo.Input(
                    "window",
                    options=list(WINDOW_MODES),
                    default="auto",
                    tooltip="Grey mapping. auto: DICOM: the file's VOI LUT, else its first window, else the "
                    "full range; PNG/JPEG: no window, 0 to the bit depth's maximum (255 or 65535) onto black "
                    "to white. window: the DICOM file's first Window Center/Width (error if it has none, and "
                    "for PNG/JPEG). full_range: stretch the lowest to the highest value (e.g. a 16-bit PNG "
                    "holding unscaled 12-bit values).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image",
                    tooltip="The radiograph at native size, [1, H, W, 3] in [0, 1] (grey in all three "
                    "channels), bright = dense.",
                ),
                GeometryType.Output(
                    display_name="geometry",
                    tooltip="Native size, bit depth, and for DICOM pixel spacing (mm, when the file states it) "
                    "and photometric interpretation: no patient data. Feed it to Fit Radiograph to Model so "
                    "the export keeps the source's bit depth.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, dicom_file: str, window: str = "auto") -> bool | str:
        # ComfyUI 0.3.64 does not check V3 combo values against their options, so both inputs are
        # checked here (a prompt posted through the API can hold any string).
        try:
            check_inputs(cls, window=window)
            _resolve(dicom_file)
        except CXRInputError as err:
            return str(err.located(cls.TITLE, "dicom_file"))
        return True

    @classmethod
    def fingerprint_inputs(cls, dicom_file: str, window: str = "auto") -> str:
        # mtime + size: re-read when the file is replaced, without hashing a 10 MB file on every queue.
        return file_fingerprint(dicom_file)

    @classmethod
    def execute(cls, dicom_file: str, window: str = "auto") -> io.NodeOutput:
        with user_errors(cls.TITLE, "dicom_file"):
            radiograph = read_radiograph(_resolve(dicom_file), window)
        image = radiograph.pixels[None, :, :, None].repeat(1, 1, 1, 3).to(torch.float32)
        return io.NodeOutput(image, radiograph.geometry)


NODES: list[type[io.ComfyNode]] = [CXRLoadDICOM]
