"""Node: organ masks from torchxrayvision's chest anatomy PSPNet, with weights from a ComfyUI models folder."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io

from ..attention.mask_batch import batch_masks, each_image
from ..attention.organs import OrganMasks
from ..errors import CXRInputError
from ..imaging import segmentation as seg
from .common import check_inputs, user_errors
from .schema import CATEGORY_MASKS, organ_masks_output

LOG = logging.getLogger(__name__)
MODEL_FOLDER = "cxr_segmentation"
WEIGHT_EXTENSIONS = {".pth", ".pt", ".safetensors"}


def register_model_folder() -> None:
    """Add ``models/cxr_segmentation`` to ComfyUI's model folders (extra paths from
    ``extra_model_paths.yaml`` under the same name are kept). The folder is not created here: the pack
    never writes into the ComfyUI install; the missing-file message says where to put the weights."""
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, default, is_default=True)
    # add_model_folder_path creates a new entry with no extensions (= every file): list weights only.
    folder_paths.folder_names_and_paths[MODEL_FOLDER][1].update(WEIGHT_EXTENSIONS)


register_model_folder()


def weight_files() -> list[str]:
    return folder_paths.get_filename_list(MODEL_FOLDER)


def common_structures(sets: list[OrganMasks]) -> list[OrganMasks]:
    """The mask sets of a batch on one list of structures: a structure found in some images only is added as an
    empty mask to the others (it was searched for and not found there), in the network's order."""
    if all(s.names == sets[0].names for s in sets):
        return sets
    names = tuple(n for n in seg.ORGAN_NAMES if any(n in s for s in sets))
    LOG.info("structures not found in every image of the batch are empty masks where missing")
    return [OrganMasks(names, torch.stack([s.get(n) if n in s else torch.zeros(s.height, s.width) for n in names]))
            for s in sets]


def missing_weights_message(name: str) -> str:
    folders = " or ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
    what = f"weight file '{name}' is not" if name else "no weight file is"
    return (
        f"{what} in {folders}. Fix: download torchxrayvision's {seg.OFFICIAL_WEIGHTS} ({seg.OFFICIAL_URL}; "
        f"torchxrayvision keeps a copy in ~/.torchxrayvision/models_data/ once it has downloaded it) into "
        f"{folders}, then refresh ComfyUI. This pack downloads nothing."
    )


class CXRSegmentOrgans(io.ComfyNode):
    TITLE = "Segment Organs (PSPNet)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = weight_files()
        default = seg.OFFICIAL_WEIGHTS if seg.OFFICIAL_WEIGHTS in files else (files[0] if files else None)
        names = ", ".join(seg.ORGAN_NAMES)
        return io.Schema(
            node_id="CXRSegmentOrgans",
            display_name=cls.TITLE,
            category=CATEGORY_MASKS,
            description="Segments 14 chest structures with torchxrayvision's ChestX-Det PSPNet (weights "
            f"{seg.OFFICIAL_WEIGHTS} in models/{MODEL_FOLDER}; nothing is downloaded) and returns them as "
            f"ORGAN_MASKS at the image's size: {names}. Right/left are the patient's sides (the right lung is "
            "on the image's left in a PA view). Needs the optional torchxrayvision: "
            'pip install "cxr-counterfactual[seg]".',
            inputs=[
                io.Image.Input("image", tooltip="The frontal chest radiograph, any size; it is padded to a square "
                               f"and resized to {seg.INPUT_SIZE} px for the network. A batch is segmented image by "
                               "image (one mask set each)."),
                io.Combo.Input(
                    "weights", options=files, default=default,
                    tooltip=f"PSPNet weight file from models/{MODEL_FOLDER} (.pth/.pt/.safetensors): "
                    f"torchxrayvision's {seg.OFFICIAL_WEIGHTS}.",
                ),
                io.Float.Input(
                    "threshold", default=0.5, min=0.01, max=0.99, step=0.01,
                    tooltip="Probability at or above which a pixel belongs to a structure (each structure has "
                    "its own sigmoid; structures may overlap). Structures not found are left out, except the "
                    "lungs and heart, whose absence is an error. In a batch, a structure found in some images "
                    "only is an empty mask in the others.",
                ),
            ],
            outputs=[organ_masks_output(f"The structures found, as one bundle at the image's size (one per image "
                                        f"of a batch): {names}.")],
        )

    @classmethod
    def validate_inputs(cls, weights: str) -> bool | str:
        if not seg.torchxrayvision_available():
            return f"[{cls.TITLE}] the optional package torchxrayvision is not installed. Fix: {seg.INSTALL_HINT}."
        if not weights or folder_paths.get_full_path(MODEL_FOLDER, weights) is None:
            return f"[{cls.TITLE}] input 'weights': {missing_weights_message(weights)}"
        return True

    @classmethod
    def fingerprint_inputs(cls, weights: str, **_: object) -> str:
        path = folder_paths.get_full_path(MODEL_FOLDER, weights) if weights else None
        if path is None:
            return f"{weights}:missing"
        st = os.stat(path)
        return f"{weights}:{st.st_mtime_ns}:{st.st_size}"

    @classmethod
    def execute(cls, image: torch.Tensor, weights: str, threshold: float) -> io.NodeOutput:
        check_inputs(cls, threshold=threshold)
        with user_errors(cls.TITLE, "weights"):
            seg.require_torchxrayvision()
            path = folder_paths.get_full_path(MODEL_FOLDER, weights) if weights else None
            if path is None:
                raise CXRInputError(missing_weights_message(weights))
            model = seg.load_pspnet(Path(path))
        device = mm.get_torch_device()
        LOG.info("PSPNet segmentation with %s on %s", weights, device)
        with user_errors(cls.TITLE, "threshold"):
            segment = functools.partial(seg.segment_organs, model, threshold=threshold, input_size=seg.INPUT_SIZE,
                                        device=device)
            sets = each_image(list(image), segment)
        masks = batch_masks(common_structures(sets))
        del model
        mm.soft_empty_cache()
        return io.NodeOutput(masks)


NODES: list[type[io.ComfyNode]] = [CXRSegmentOrgans]
