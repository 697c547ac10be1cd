"""Node: organ masks from torchxrayvision's chest anatomy PSPNet, with weights from a ComfyUI models folder."""

from __future__ import annotations

import functools
import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..attention.mask_batch import batch_masks, each_image
from ..attention.organs import OrganMasks
from ..imaging import segmentation as seg
from ..imaging.weight_files import require_torchxrayvision
from .common import check_inputs, user_errors
from .model_files import ModelFolder, WeightFileNode
from .schema import CATEGORY_MASKS, organ_masks_output

LOG = logging.getLogger(__name__)
MODEL_FOLDER = "cxr_segmentation"
FOLDER = ModelFolder(MODEL_FOLDER, seg.OFFICIAL_WEIGHTS, seg.OFFICIAL_URL).register()


def weight_files() -> list[str]:
    return FOLDER.files()


def common_structures(sets: list[OrganMasks]) -> list[OrganMasks]:
    """The mask sets of a batch on one list of structures: a structure found in some images only is added as an
    empty mask to the others (it was searched for and not found there), in the network's order."""
    if all(s.names == sets[0].names for s in sets):
        return sets
    names = tuple(n for n in seg.ORGAN_NAMES if any(n in s for s in sets))
    LOG.info("structures not found in every image of the batch are empty masks where missing")
    return [OrganMasks(names, torch.stack([s.get(n) if n in s else torch.zeros(s.height, s.width) for n in names]))
            for s in sets]


class CXRSegmentOrgans(WeightFileNode):
    TITLE = "Segment Organs (PSPNet)"
    FOLDER = FOLDER

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = weight_files()
        default = FOLDER.default(files)
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
    def execute(cls, image: torch.Tensor, weights: str, threshold: float) -> io.NodeOutput:
        check_inputs(cls, threshold=threshold)
        with user_errors(cls.TITLE, "weights"):
            require_torchxrayvision("the PSPNet segmentation")
            model = seg.load_pspnet(FOLDER.path(weights))
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
