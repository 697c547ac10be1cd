"""Preview node: the organ masks drawn over the radiograph, shown in the UI."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention.mask_batch import AnyOrganMasks, check_mask_count, each_image, sample_masks
from ..imaging.overlay import overlay_organs
from .common import check_inputs, user_errors
from .schema import CATEGORY_MASKS, described, fraction_input, organ_masks_input


class CXRPreviewOrganMasks(io.ComfyNode):
    """Draws every organ in its own colour (tint, outline, legend) over the radiograph and shows it, so you can
    check the masks sit on the right anatomy and the right side before sampling. A batch: each image with its own
    masks (or the one set they share)."""

    TITLE = "Preview Organ Masks"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRPreviewOrganMasks",
            display_name=cls.TITLE,
            category=CATEGORY_MASKS,
            description=described(cls),
            is_output_node=True,
            inputs=[
                io.Image.Input("image", tooltip="The radiograph (any size with the masks' aspect ratio), or a batch."),
                organ_masks_input("The organ masks to draw: one set, or one per image of the batch."),
                fraction_input("opacity", 0.35, "Tint strength inside organs.", step=0.05),
            ],
            outputs=[io.Image.Output(display_name="overlay", tooltip="The overlay as an IMAGE (for saving).")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, organ_masks: AnyOrganMasks, opacity: float) -> io.NodeOutput:
        check_inputs(cls, opacity=opacity)
        check_mask_count(organ_masks, image.shape[0], node=cls.TITLE)
        with user_errors(cls.TITLE, "organ_masks"):
            frames = each_image(range(image.shape[0]),
                                lambda i: overlay_organs(image[i], sample_masks(organ_masks, i), opacity))
        overlay = torch.stack(frames)
        return io.NodeOutput(overlay, ui=ui.PreviewImage(overlay, cls=cls))


NODES: list[type[io.ComfyNode]] = [CXRPreviewOrganMasks]
