"""Node that loads a chest radiograph from a DICOM file as an IMAGE plus its native geometry.

No upload button: ComfyUI's frontend (comfyui-frontend-package 1.27) offers upload widgets only for images,
videos and audio, and each silently drops any file whose browser MIME type is not ``image/*`` /
``video/*`` / ``audio/*``; a ``.dcm`` file is ``application/dicom`` (or has no type), and the generic
``file_upload`` kind has no widget in that frontend. Users copy the file into ``ComfyUI/input`` (subfolders
allowed) or post it to ComfyUI's ``/upload/image`` endpoint, which stores any file; then refresh.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..errors import CXRInputError
from ..imaging.dicom import WINDOW_MODES, read_dicom
from .common import CATEGORY_INPUT, GeometryType, file_fingerprint, resolve_input_file, user_errors

DICOM_SUFFIXES = (".dcm", ".dicom")
_COPY_FIX = (
    "Copy the DICOM file into ComfyUI's input folder (ComfyUI/input, subfolders allowed), refresh the "
    "page and pick it in the list."
)


def input_dicom_files() -> list[str]:
    """Files in ComfyUI's input folder (and its subfolders) that may be DICOM, as '/'-separated names.

    A name counts when it ends in .dcm/.dicom or has no extension (PACS exports often name files
    ``IM000001``); hidden files and folders and ``DICOMDIR`` indexes (no pixel data) are left out.
    """
    root = folder_paths.get_input_directory()
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if _may_be_dicom(name):
                found.append(name if rel == "." else Path(rel, name).as_posix())
    return sorted(found)


def _may_be_dicom(name: str) -> bool:
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    lower = name.lower()
    return lower.endswith(DICOM_SUFFIXES) or "." not in name


def _resolve(name: str) -> Path:
    return resolve_input_file(name, fix=_COPY_FIX)


class CXRLoadDICOM(io.ComfyNode):
    """A DICOM radiograph (MONOCHROME1/2, 8–16 bit) as a display-ready grey IMAGE and its geometry."""

    TITLE = "Load Chest X-ray (DICOM)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRLoadDICOM",
            display_name=cls.TITLE,
            category=CATEGORY_INPUT,
            description="Loads a chest radiograph from a DICOM file in ComfyUI's input folder: applies the "
            "file's rescale and VOI (window or VOI LUT), scales 12–16-bit data by its real range and shows "
            "MONOCHROME1 inverted, so bone is bright; a multi-frame file gives its first frame (with a "
            "warning in the log). Patient data in the header is never read or passed on. No upload "
            "button (the frontend accepts only image/video/audio files): copy the .dcm file into "
            "ComfyUI/input and refresh.",
            inputs=[
                io.Combo.Input(
                    "dicom_file",
                    options=input_dicom_files(),
                    tooltip="DICOM file in ComfyUI's input folder (.dcm, .dicom or no extension; "
                    "subfolders listed as folder/name). Copy files into ComfyUI/input and refresh the page "
                    "to list them.",
                ),
                io.Combo.Input(
                    "window",
                    options=list(WINDOW_MODES),
                    default="auto",
                    tooltip="Grey mapping. auto: the file's VOI LUT, else its first window, else the full "
                    "range. window: the file's first Window Center/Width (error if it has none). "
                    "full_range: stretch the lowest to the highest value.",
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
                    tooltip="Native size, pixel spacing (mm, when the file states it), bit depth and "
                    "photometric interpretation: no patient data.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, dicom_file: str, window: str = "auto") -> bool | str:
        # ComfyUI 0.3.64 does not check V3 combo values against their options, so both inputs are
        # checked here (a prompt posted through the API can hold any string).
        if window not in WINDOW_MODES:
            return str(
                CXRInputError(
                    f"unknown window mode '{window}'.", node=cls.TITLE, input_name="window",
                    fix=f"Use one of {', '.join(WINDOW_MODES)}.",
                )
            )
        try:
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
            radiograph = read_dicom(_resolve(dicom_file), window)
        image = radiograph.pixels[None, :, :, None].repeat(1, 1, 1, 3).to(torch.float32)
        return io.NodeOutput(image, radiograph.geometry)


NODES: list[type[io.ComfyNode]] = [CXRLoadDICOM]
