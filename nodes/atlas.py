"""Node: approximate lung and heart masks from a CheXmask shape atlas, with no model weights."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention.mask_batch import batch_masks, each_image
from ..hosts.comfy import audit
from ..imaging.atlas import DEFAULT_MIN_QUALITY, atlas_organ_masks
from ..imaging.overlay import overlay_organs
from .common import check_inputs, user_errors
from .schema import CATEGORY_MASKS, described, fraction_input, organ_masks_output


class CXRAtlasOrgans(io.ComfyNode):
    """APPROXIMATE right lung, left lung and heart masks without any model weights: a mean lung/heart outline learnt
    from CheXmask annotations is fitted to the radiograph (pose and a few shape modes, so lung borders fall on
    dark-to-bright edges). About 1–2 s on a CPU. It reports a fit quality and stops with an error when the image
    does not look like a frontal chest radiograph. Check the overlay; for exact masks load them from files or use
    the PSPNet segmentation. Right/left are the patient's sides (the right lung is on the image's left in a PA
    view). A batch of radiographs gets one fit and one mask set per image."""

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
                    "image", tooltip="The frontal (PA/AP) chest radiograph, displayed with bright bones and dark "
                    "lungs (invert MONOCHROME1 data first). A batch is fitted image by image (one mask set each)."
                ),
                fraction_input("min_quality", DEFAULT_MIN_QUALITY, "Stop with an error when the fit quality (0–1) is "
                               "below this. Chest radiographs measured 0.8–1.0, non-chest images below 0.4. Lower it "
                               "only after checking the overlay. Applies to every image of a batch.", step=0.05),
            ],
            outputs=[
                organ_masks_output("Approximate right_lung, left_lung and heart masks at the image's size (one set "
                                   "per image of a batch)."),
                io.Image.Output(display_name="overlay",
                                tooltip="The fitted outlines drawn over the radiograph (each image of a batch)."),
                io.String.Output(
                    display_name="fit_report",
                    tooltip="Fit quality and the measures behind it (border agreement, contrast, brightness); one line "
                    "per image of a batch.",
                ),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, min_quality: float) -> io.NodeOutput:
        check_inputs(cls, min_quality=min_quality)
        frames = list(image)
        with user_errors(cls.TITLE, "image"):  # an image that does not fit stops the batch, named by its index
            fits = each_image(frames, lambda frame: atlas_organ_masks(frame[..., :3].float().mean(-1), min_quality))
        masks = batch_masks([m for m, _ in fits])
        overlay = torch.stack([overlay_organs(frame, m) for frame, (m, _) in zip(frames, fits, strict=True)])
        reports = [fit.report(min_quality) for _, fit in fits]
        audit.note("atlas_fit_quality", [round(fit.quality, 4) for _, fit in fits])
        report = reports[0] if len(reports) == 1 else "\n".join(f"image {i + 1}: {r}" for i, r in enumerate(reports))
        return io.NodeOutput(masks, overlay, report, ui=ui.PreviewImage(overlay, cls=cls))


NODES: list[type[io.ComfyNode]] = [CXRAtlasOrgans]
