"""Preview node: the organ masks drawn over the radiograph, shown in the UI."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention.organs import OrganMasks
from ..imaging.overlay import overlay_organs
from .common import check_inputs, user_errors
from .schema import CATEGORY_MASKS, described, fraction_input, organ_masks_input


class CXRPreviewOrganMasks(io.ComfyNode):
    """Draws every organ in its own colour (tint, outline, legend) over the radiograph and shows it, so you can
    check the masks sit on the right anatomy and the right side before sampling."""

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
                io.Image.Input("image", tooltip="The radiograph (any size with the masks' aspect ratio)."),
                organ_masks_input("The organ masks to draw."),
                fraction_input("opacity", 0.35, "Tint strength inside organs.", step=0.05),
            ],
            outputs=[io.Image.Output(display_name="overlay", tooltip="The overlay as an IMAGE (for saving).")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, organ_masks: OrganMasks, opacity: float) -> io.NodeOutput:
        check_inputs(cls, opacity=opacity)
        with user_errors(cls.TITLE, "organ_masks"):
            frames = [overlay_organs(frame, organ_masks, opacity) for frame in image]
        overlay = torch.stack(frames)
        return io.NodeOutput(overlay, ui=ui.PreviewImage(overlay, cls=cls))


NODES: list[type[io.ComfyNode]] = [CXRPreviewOrganMasks]
