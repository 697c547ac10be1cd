"""Node: approximate lung and heart masks from a CheXmask shape atlas, with no model weights."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..imaging.atlas import DEFAULT_MIN_QUALITY, atlas_organ_masks
from ..imaging.overlay import overlay_organs
from .common import check_inputs, require_single, user_errors
from .schema import CATEGORY_MASKS, described, fraction_input, organ_masks_output


class CXRAtlasOrgans(io.ComfyNode):
    """APPROXIMATE right lung, left lung and heart masks without any model weights: a mean lung/heart outline learnt
    from CheXmask annotations is fitted to the radiograph (pose and a few shape modes, so lung borders fall on
    dark-to-bright edges). About 1–2 s on a CPU. It reports a fit quality and stops with an error when the image
    does not look like a frontal chest radiograph. Check the overlay; for exact masks load them from files or use
    the PSPNet segmentation. Right/left are the patient's sides (the right lung is on the image's left in a PA
    view)."""

    TITLE = "Organ Masks from Atlas (approximate)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRAtlasOrgans",
            display_name=cls.TITLE,
            category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[
                io.Image.Input(
                    "image", tooltip="The frontal (PA/AP) chest radiograph, batch 1, displayed with bright bones "
                    "and dark lungs (invert MONOCHROME1 data first)."
                ),
                fraction_input("min_quality", DEFAULT_MIN_QUALITY, "Stop with an error when the fit quality (0–1) is "
                               "below this. Chest radiographs measured 0.8–1.0, non-chest images below 0.4. Lower it "
                               "only after checking the overlay.", step=0.05),
            ],
            outputs=[
                organ_masks_output("Approximate right_lung, left_lung and heart masks at the image's size."),
                io.Image.Output(display_name="overlay", tooltip="The fitted outlines drawn over the radiograph."),
                io.String.Output(
                    display_name="fit_report",
                    tooltip="Fit quality and the measures behind it (border agreement, contrast, brightness).",
                ),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, min_quality: float) -> io.NodeOutput:
        check_inputs(cls, min_quality=min_quality)
        require_single(cls.TITLE, "image", image.shape[0], "image")
        frame = image[0]
        with user_errors(cls.TITLE, "image"):
            masks, fit = atlas_organ_masks(frame[..., :3].float().mean(-1), min_quality)
        overlay = overlay_organs(frame, masks)[None]
        return io.NodeOutput(masks, overlay, fit.report(min_quality), ui=ui.PreviewImage(overlay, cls=cls))


NODES: list[type[io.ComfyNode]] = [CXRAtlasOrgans]
