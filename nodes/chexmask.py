"""Node that loads a radiograph's organ masks from a CheXmask CSV (the masks a user has not drawn).

No upload button: a CheXmask CSV is text (often gigabytes), which ComfyUI's frontend does not upload. Users
copy it into ``ComfyUI/input`` (subfolders allowed) and refresh. The file is indexed once per session by
streaming it (nothing is written next to it) and only the chosen row is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..errors import CXRInputError
from ..hosts.comfy import audit
from ..imaging.chexmask import (
    BORDER_CROP_MODES,
    DEFAULT_MIN_DICE,
    DICE_MAX,
    DICE_MEAN,
    ID_COLUMNS,
    CheXmaskRow,
    LoadedMasks,
    Preprocessing,
    check_quality,
    plan_native,
    row_masks,
)
from ..imaging.chexmask_index import CheXmaskIndex, open_index
from .common import check_inputs, file_fingerprint, resolve_input_file, user_errors
from .schema import CATEGORY_MASKS, described, fraction_input, organ_masks_output

AUTO = "auto"
ID_CHOICES = (AUTO, *ID_COLUMNS)
_COPY_FIX = (
    "Copy the CheXmask CSV (unzipped: .csv, not .csv.gz) into ComfyUI's input folder, refresh the page and "
    "pick it in the list."
)


def input_csv_files() -> list[str]:
    """``.csv`` files in ComfyUI's input folder and its subfolders, as '/'-separated names."""
    root = folder_paths.get_input_directory()
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        found += [n if rel == "." else Path(rel, n).as_posix() for n in files if n.lower().endswith(".csv")]
    return sorted(found)


def _resolve(name: str) -> Path:
    if name.lower().endswith((".gz", ".zip")):
        # A compressed file cannot be seeked into, so each lookup would decompress gigabytes.
        raise CXRInputError(f"'{name}' is compressed.", input_name="csv_file", fix=_COPY_FIX)
    return resolve_input_file(name, fix=_COPY_FIX)


def _grey(image: torch.Tensor) -> np.ndarray:
    """The first radiograph of an IMAGE batch as ``[H, W]`` 8-bit grey (what the CheXmask scripts read)."""
    pixels = image[0].float().cpu()
    pixels = pixels[..., :3].mean(dim=-1) if pixels.ndim == 3 else pixels
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def describe(
    index: CheXmaskIndex, row: CheXmaskRow, loaded: LoadedMasks, min_dice: float, native: Preprocessing | None
) -> str:
    """The row's quality and how its masks were made, for a text preview."""
    scores = ", ".join(
        f"{c} {s:.3f}" for c in (DICE_MEAN, DICE_MAX) if (s := row.score(c)) is not None
    ) or "no Dice RCA score"
    sources = ", ".join(f"{o} from {s}" for o, s in loaded.sources.items())
    lines = [
        f"CheXmask row '{row.image_id}' (column '{index.id_column}', {index.dataset}) in {index.path.name}",
        f"{scores}; min_dice {min_dice:.2f}",
        f"grid {row.grid[0]}×{row.grid[1]} (H×W): {sources}",
    ]
    if loaded.mapping:
        lines.append(
            f"mapped onto the radiograph's {loaded.grid[0]}×{loaded.grid[1]} by undoing CheXmask's "
            f"pad-to-square and resize to 1024, {loaded.mapping}"
        )
    if loaded.mapping and native is not None and any(native.crop):
        border = ", ".join(str(v) for v in native.crop)
        lines.append(f"black border the dataset had cropped (left, top, right, bottom px): {border}")
    return "\n".join(lines)


class CXRLoadCheXmask(io.ComfyNode):
    """Loads the right lung, left lung and heart of one radiograph from a CheXmask CSV (MIMIC-CXR-JPG, CheXpert,
    ChestX-Ray8, PadChest, VinDr-CXR, CANDID-PTX) by its image id. The CSV is streamed and indexed once (never read
    whole), the RLE masks are decoded (an empty mask falls back to the landmark contour), and rows below the Dice
    RCA threshold are refused. Connect the radiograph to get masks at its native size: rows on the 1024×1024
    preprocessed grid are mapped back by undoing the dataset's pad-to-square and resize. Right/left are the
    patient's sides: in a PA view the right lung is on the image's left."""

    TITLE = "Load Organ Masks (CheXmask)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRLoadCheXmask",
            display_name=cls.TITLE,
            category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[
                io.Combo.Input(
                    "csv_file", options=input_csv_files(),
                    tooltip="CheXmask CSV in ComfyUI's input folder (unzipped .csv; subfolders listed as "
                    "folder/name). Copy it there and refresh the page to list it.",
                ),
                io.String.Input(
                    "image_id", default="",
                    tooltip="The radiograph's id exactly as the CSV writes it: dicom_id (MIMIC), Path "
                    "(CheXpert), Image Index (ChestX-Ray8), ImageID (PadChest, CANDID-PTX) or image_id (VinDr).",
                ),
                io.Combo.Input(
                    "id_column", options=list(ID_CHOICES), default=AUTO,
                    tooltip="Column holding the id. auto: the first of dicom_id, Path, Image Index, ImageID, "
                    "image_id found in the header.",
                ),
                fraction_input("min_dice", DEFAULT_MIN_DICE, "Refuse rows whose 'Dice RCA (Mean)' (estimated "
                               "segmentation quality) is below this. CheXmask's authors discard rows below 0.7; 0 "
                               "accepts every row."),
                io.Combo.Input(
                    "border_crop", options=list(BORDER_CROP_MODES), default=AUTO,
                    tooltip="MIMIC-CXR-JPG and PadChest radiographs had their black border cropped before "
                    "padding. auto: re-find that border on the connected radiograph for those datasets; "
                    "undo: always; ignore: never. Only used when mapping a 1024 grid row onto the image.",
                ),
                io.Image.Input(
                    "image", optional=True,
                    tooltip="The radiograph at its original size (e.g. Load Image of the dataset's file). "
                    "Connected: masks come at its size. Unconnected: masks stay on the row's grid. One image (this "
                    "row's); for a batch use one node per image and CXR Batch Organ Masks.",
                ),
            ],
            outputs=[
                organ_masks_output("right_lung, left_lung and heart (patient's sides) as one bundle."),
                io.String.Output(
                    display_name="quality",
                    tooltip="The row's Dice RCA scores, where each mask came from (RLE or landmarks) and "
                    "how it was mapped onto the radiograph.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, csv_file: str, image_id: str, id_column: str, border_crop: str) -> bool | str:
        try:
            _resolve(csv_file)
            if not image_id.strip():
                raise CXRInputError("no image id given.", input_name="image_id",
                                    fix="Type the radiograph's id as the CSV writes it.")
            check_inputs(cls, id_column=id_column, border_crop=border_crop)
        except CXRInputError as err:
            return str(err.located(cls.TITLE, "csv_file"))
        return True

    @classmethod
    def fingerprint_inputs(
        cls, csv_file: str, image_id: str, id_column: str, min_dice: float, border_crop: str, image=None
    ) -> str:
        # mtime + size: re-read when the CSV is replaced, without hashing gigabytes on every queue.
        return f"{file_fingerprint(csv_file)}|{image_id}|{id_column}|{min_dice}|{border_crop}"

    @classmethod
    def execute(
        cls,
        csv_file: str,
        image_id: str,
        id_column: str,
        min_dice: float,
        border_crop: str,
        image: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        check_inputs(cls, min_dice=min_dice)
        if image is not None and image.shape[0] != 1:
            # One row id names one radiograph: a batch would leave the other images without masks of their own.
            raise CXRInputError(
                f"got a batch of {image.shape[0]} images for one CheXmask row.", node=cls.TITLE, input_name="image",
                fix="Use one Load Organ Masks (CheXmask) per radiograph (each with its image_id) and join their "
                "organ masks with CXR Batch Organ Masks.")
        problem = cls.validate_inputs(csv_file, image_id, id_column, border_crop)
        if problem is not True:
            raise CXRInputError(str(problem))  # already names node, input and fix
        with user_errors(cls.TITLE, "csv_file"):
            index = open_index(_resolve(csv_file), id_column)
            row = index.row(image_id)
            check_quality(row, min_dice)
            native = None if image is None else plan_native(row, _grey(image), index.dataset, border_crop)
            loaded = row_masks(row, native)
        audit.note("chexmask_dice", {c: row.score(c) for c in (DICE_MEAN, DICE_MAX)})
        return io.NodeOutput(loaded.masks, describe(index, row, loaded, min_dice, native))


NODES: list[type[io.ComfyNode]] = [CXRLoadCheXmask]
