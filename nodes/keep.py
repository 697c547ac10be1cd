"""Keep the patient's anatomy: the edit region as ComfyUI's latent noise mask, and an exact final paste.

How the keep region works (ComfyUI 0.3.64, ``comfy/samplers.py``):
- ``CXRApplyKeepRegion`` sets the edit region as the LATENT's ``noise_mask`` (exactly SetLatentNoiseMask).
  Every sampler then runs through ``KSamplerX0Inpaint``: at *each* model call it replaces the model's input
  outside the mask by the source latent noised to the *current* sigma (the model sampling's ``noise_scaling``:
  ``latent + noise·sigma`` for EPS, ``(1 − sigma)·latent + sigma·noise`` for flow models such as SD3) and
  the prediction there by the source. So the kept region is never pasted one step too noisy, and the
  feathered border is blended at every step (no seam). RadEdit's released ``StableDiffusionRadEditPipeline``
  pastes after ``scheduler.step`` (``latents = mask_keep * image_latents[i] + (1 - mask_keep) * latents``, its
  loop starting from ``image_latents[0]``): the kept cells carry the noise of the step's input timestep while the
  rest has moved on to the next one.
- That path ends at the source only up to float rounding (~1e-5 relative: the latent is scaled by
  0.18215 and back, and the last Euler step computes ``x − (x − x0)``). ``CXRPasteKeepRegion``, after the
  sampler, copies the source latent bit for bit where the sampler's mask is exactly 0 (the latent cells
  ComfyUI keeps in full: its own bilinear resize of the mask, ``comfy.utils.reshape_mask``). It changes
  nothing else, so it cannot create a seam: inside the feather the sampler's per-step blend stays.
"""

from __future__ import annotations

import logging

import comfy.utils
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..attention.organs import aspect_matches
from ..errors import CXRInputError
from ..hosts.comfy.inversion import RECORD_KEY
from ..imaging.overlay import ORGAN_COLOURS
from .schema import CATEGORY_EDIT, described

logger = logging.getLogger("cxr_counterfactual")

EDIT_COLOUR = ORGAN_COLOURS["edit"]
KEEP_COLOUR = (0.10, 0.80, 1.00)  # cyan: visible on both bone and lung
# A kept cell the sampler moved by more than this (relative to the latent's range) was not kept by the
# sampler itself: ComfyUI's rounding is ~1e-5; more means the sampler ignores the noise mask.
DRIFT_TOLERANCE = 1e-4


def latent_keep_mask(noise_mask: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, C, h, w]``: where ComfyUI's sampler keeps the source in full (its resized mask is exactly 0)."""
    return comfy.utils.reshape_mask(noise_mask.float().cpu(), samples.shape) == 0


def _as_masks(mask: torch.Tensor, title: str) -> torch.Tensor:
    if mask.ndim not in (2, 3) or mask.numel() == 0:
        raise CXRInputError(f"expected a MASK [B, H, W], got shape {tuple(mask.shape)}.", node=title,
                            input_name="edit_region", fix="Connect a MASK, e.g. Edit / Keep Regions' edit_region.")
    masks = mask.reshape(-1, *mask.shape[-2:]).float().cpu()
    if not bool(torch.isfinite(masks).all()):
        raise CXRInputError("the edit region contains NaN or infinite values.", node=title, input_name="edit_region",
                            fix="Fix the node that made the MASK (values must be 0 to 1), e.g. use Edit / Keep "
                            "Regions' edit_region.")
    return masks


def _outline(region: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, W]`` pixels of ``region`` within ``width`` of its border."""
    inside = region.float()[:, None]
    eroded = -F.max_pool2d(-inside, 2 * width + 1, stride=1, padding=width)
    return (inside - eroded)[:, 0].clamp(0, 1)


def region_preview(image: torch.Tensor | None, edit: torch.Tensor, kept: torch.Tensor,
                   opacity: float = 0.45) -> torch.Tensor:
    """``[B, H, W, 3]``: the edit region tinted, the fully kept region outlined, over the image (or grey)."""
    if image is None:
        h, w = edit.shape[-2:]
        base = torch.full((edit.shape[0], h, w, 3), 0.25)
    else:
        base = image[..., :3].float().cpu()
        if base.shape[-1] == 1:
            base = base.expand(*base.shape[:-1], 3)
    b, h, w = base.shape[:3]
    e = F.interpolate(edit[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    k = F.interpolate(kept[:, None].float(), size=(h, w), mode="nearest")[:, 0]
    n = max(b, e.shape[0], k.shape[0])
    base, e, k = (t.expand(n, *t.shape[1:]) for t in (base, e, k))
    a = (opacity * e)[..., None]
    out = base * (1 - a) + torch.tensor(EDIT_COLOUR) * a
    line = _outline(k, max(1, round(min(h, w) / 256)))[..., None]
    return (out * (1 - line) + torch.tensor(KEEP_COLOUR) * line).clamp(0, 1)


class CXRApplyKeepRegion(io.ComfyNode):
    """Keeps the patient's anatomy outside the edit: sets the edit region as the latent's noise mask (as
    SetLatentNoiseMask), so every ComfyUI sampler feeds the model the source noised to the current step outside it
    and blends the feathered border at every step. Shows the regions: edit tinted amber, the fully kept region (kept
    bit for bit by Paste Keep Region) outlined cyan."""

    TITLE = "Apply Keep Region"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRApplyKeepRegion", display_name=cls.TITLE, category=CATEGORY_EDIT,
            description=described(cls),
            inputs=[
                io.Latent.Input("latent", tooltip="The encoded radiograph (VAE Encode of Fit Radiograph to Model's "
                                "image)."),
                io.Mask.Input("edit_region", tooltip="Where the edit may change the image (1), with a feathered "
                              "border: Edit / Keep Regions' edit_region. Same field of view as the latent."),
                io.Image.Input("image", optional=True, tooltip="The radiograph to draw the regions on (optional)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The same latent with the edit region as noise_mask: "
                                 "feed it to the sampler, and to Paste Keep Region as 'source'."),
                io.Image.Output(display_name="preview", tooltip="The regions over the image (edit amber, kept cyan)."),
            ],
        )

    @classmethod
    def execute(cls, latent: dict, edit_region: torch.Tensor, image: torch.Tensor | None = None) -> io.NodeOutput:
        import nodes as comfy_nodes  # ComfyUI's own nodes.py (SetLatentNoiseMask)

        if RECORD_KEY in latent:
            raise CXRInputError(
                "this is an inverted (noisy) latent: ComfyUI's keep path would keep the noise.", node=cls.TITLE,
                input_name="latent", fix="Apply the keep region to the source latent and give SamplerCustomAdvanced "
                "the inversion's 'noise' output.")
        samples = latent["samples"]
        mask = _as_masks(edit_region, cls.TITLE)
        h, w = samples.shape[-2:]
        if not aspect_matches(mask.shape[-2], mask.shape[-1], h * 8, w * 8):
            raise CXRInputError(
                f"the edit region is {mask.shape[-2]}×{mask.shape[-1]} but the latent is {h}×{w} cells "
                f"({h * 8}×{w * 8} px): another field of view.", node=cls.TITLE, input_name="edit_region",
                fix="Make the regions from the masks of Fit Radiograph to Model (the image you encoded).")
        if mask.shape[0] not in (1, samples.shape[0]):
            raise CXRInputError(f"{mask.shape[0]} masks for a batch of {samples.shape[0]} latents.", node=cls.TITLE,
                                input_name="edit_region", fix="Use one mask, or one per latent.")
        out = comfy_nodes.SetLatentNoiseMask().set_mask(latent, mask)[0]
        kept = latent_keep_mask(out["noise_mask"], samples)[:, 0]
        edited = comfy.utils.reshape_mask(out["noise_mask"], samples.shape)[:, 0] > 0
        if not bool(edited.any()):
            raise CXRInputError(
                "the edit region is empty: the keep region covers the whole image, so the sampler would return the "
                "patient unchanged.", node=cls.TITLE, input_name="edit_region",
                fix="Pick edit organs present in the masks (Edit / Keep Regions), or take them out of 'protect'.")
        if not bool(kept.any()):
            raise CXRInputError(
                "the edit region (with its feather) covers the whole image: no latent cell is kept.",
                node=cls.TITLE, input_name="edit_region",
                fix="Use fewer edit organs, a smaller margin or feather; to change everything, sample without a keep "
                "region.")
        if image is not None and not aspect_matches(image.shape[1], image.shape[2], h * 8, w * 8):
            raise CXRInputError(f"the image ({image.shape[1]}×{image.shape[2]}) is not the latent's field of view.",
                                node=cls.TITLE, input_name="image", fix="Connect the image that was encoded.")
        logger.info("%s: %.1f%% of latent cells edited, %.1f%% kept exactly", cls.TITLE,
                    100 * float(edited.float().mean()), 100 * float(kept.float().mean()))
        preview = region_preview(image, mask, kept)
        return io.NodeOutput(out, preview, ui=ui.PreviewImage(preview, cls=cls))


class CXRPasteKeepRegion(io.ComfyNode):
    """After the sampler: copies the patient's latent bit for bit into every latent cell the sampler kept in full
    (noise mask exactly 0), removing ComfyUI's float rounding there (~1e-5). Changes nothing inside the edit or its
    feathered border, so it adds no seam. Logs a warning if the sampler had moved the kept cells by more than
    rounding (a sampler that ignores the noise mask)."""

    TITLE = "Paste Keep Region (exact)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRPasteKeepRegion", display_name=cls.TITLE, category=CATEGORY_EDIT,
            description=described(cls),
            inputs=[
                io.Latent.Input("samples", tooltip="The sampler's output LATENT."),
                io.Latent.Input("source", tooltip="Apply Keep Region's output: the patient's latent with the keep "
                                "region."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The sampled latent with the kept region exactly "
                                      "the patient's.")],
        )

    @classmethod
    def execute(cls, samples: dict, source: dict) -> io.NodeOutput:
        if "noise_mask" not in source:
            raise CXRInputError("the source latent has no keep region (noise_mask).", node=cls.TITLE,
                                input_name="source", fix="Connect the output of Apply Keep Region.")
        if RECORD_KEY in source:
            raise CXRInputError("the source is an inverted (noisy) latent.", node=cls.TITLE, input_name="source",
                                fix="Connect Apply Keep Region's output (the patient's own latent).")
        if RECORD_KEY in samples:
            raise CXRInputError(
                "these samples started from the 'inverted' latent, where ComfyUI cannot keep a region: a paste would "
                "leave a seam.", node=cls.TITLE, input_name="samples",
                fix="Sample from the source latent (with its keep region) and the inversion's 'noise' output in "
                "SamplerCustomAdvanced.")
        out, src = samples["samples"], source["samples"].to(samples["samples"].device)
        if src.shape[1:] != out.shape[1:] or src.shape[0] not in (1, out.shape[0]):
            raise CXRInputError(
                f"the source latent {tuple(src.shape)} does not match the samples {tuple(out.shape)}.",
                node=cls.TITLE, input_name="source", fix="Connect the latent this sampler started from.")
        src = src.expand_as(out).to(out.dtype)
        keep = latent_keep_mask(source["noise_mask"], out).to(out.device)
        if bool(keep.any()):
            drift = float((out - src).abs()[keep].max())
            scale = max(float(src.abs().max()), 1.0)
            if drift > DRIFT_TOLERANCE * scale:
                logger.warning("%s: the sampler moved kept cells by up to %.3g (more than rounding): it does not "
                               "honour the noise mask; pasted anyway, check the border.", cls.TITLE, drift)
        result = dict(samples)
        result["samples"] = torch.where(keep, src, out)
        return io.NodeOutput(result)


NODES: list[type[io.ComfyNode]] = [CXRApplyKeepRegion, CXRPasteKeepRegion]
