"""Real-image inversion nodes: the patient's latent mapped deterministically to the noise it would come from.

``CXRInvertLatent`` runs the DDIM inversion of ``attention/inversion.py`` inside ComfyUI's own sampling
machinery (the guider and sampler glue is ``hosts/comfy/inversion.py``), so the denoiser it inverts is
exactly the one SamplerCustom will call later. EPS models (SD1.x/2.x/SDXL) and flow-matching ones (CONST:
SD3/SD3.5) are inverted by the same Euler steps; the noise follows the model's own mixing (see
``NoiseConvention``).

Outputs, and how they plug into ComfyUI's samplers (sampler ``euler`` or ``ddim``, the same cfg):
- ``inverted`` LATENT + ``sigmas`` → SamplerCustom with ``add_noise`` off (or SamplerCustomAdvanced with
  DisableNoise). No keep region on this route: ComfyUI's noise-mask path would keep the *noisy* latent.
- ``noise`` NOISE + the *source* LATENT (with the keep region of Apply Keep Region) + ``sigmas`` →
  SamplerCustomAdvanced: ComfyUI starts at ``source + sigma * eps`` (the inverted latent) and noises the
  kept region with that same ``eps`` at every step, so inversion and keep region compose.

Both outputs carry the inversion's record. ``CXRInversionGuider``, a CFGGuider for SamplerCustomAdvanced,
refuses a regeneration that does not match it, and feeds a kept region the patient's own inverted trajectory
instead of ComfyUI's straight-line ``source + sigma * eps``.
"""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

from ..errors import CXRInputError
from ..hosts.comfy import audit
from ..hosts.comfy.inversion import (
    RECORD_KEY,
    SCHEDULERS,
    CheckedGuider,
    InversionRecord,
    InvertedNoise,
    conditioning_key,
    inversion_sigmas,
    invert,
    model_key,
    sampling_convention,
)
from .common import check_inputs
from .schema import CATEGORY_EDIT, described

logger = logging.getLogger("cxr_counterfactual")


def cfg_input(tooltip: str) -> io.Input:
    """The guidance scale: one range for the inversion and the regeneration that must match it."""
    return io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01, tooltip=tooltip)


class CXRInvertLatent(io.ComfyNode):
    """Maps the patient's encoded radiograph deterministically to the noisy latent at 'start_percent' (DDIM
    inversion with the model, prompt and cfg given, refined by fixed-point steps). Sampling back with euler/ddim,
    the returned sigmas and the same prompt gives the patient again; an edited prompt gives the counterfactual. Use
    'inverted' with SamplerCustom (add_noise off), or 'noise' with the source latent (and its keep region) in
    SamplerCustomAdvanced."""

    TITLE = "Invert Radiograph (DDIM)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRInvertLatent", display_name=cls.TITLE, category=CATEGORY_EDIT, is_experimental=True,
            description=described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The edit's checkpoint (SD1.x/2.x/SDXL, or SD3/SD3.5 flow), plain or "
                               "gated; not boosted (boosting targets the edit prompt's words). Regenerate with the "
                               "same checkpoint."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the patient as they are (the source "
                                      "prompt, without the counterfactual finding)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt; use the same one for the edit."),
                io.Latent.Input("latent", tooltip="The encoded radiograph (VAE Encode; Apply Keep Region's output is "
                                "fine, its mask is ignored here)."),
                cfg_input("Classifier-free guidance during inversion; use the same cfg to regenerate. 1 inverts most "
                          "exactly; higher values amplify the inversion error."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Steps from the start sigma down to 0 ('sigmas' has steps + 1 values)."),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="karras",
                               tooltip="How the steps spread between the start sigma and the model's smallest one. "
                               "karras (dense at low noise) inverts far more exactly than normal."),
                io.Float.Input("start_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Where inversion stops and regeneration starts: 0 = pure noise, towards 1 = "
                               "little noise. A fraction of the model's noise range (ComfyUI's convention, "
                               "percent_to_sigma, as ControlNet uses), not of the step count. Must be below 1 "
                               "(and above 0 for a flow model such as SD3)."),
                io.Int.Input("refine", default=4, min=0, max=20,
                             tooltip="Fixed-point refinements per step (each one more model call, Anderson-mixed): "
                             "they make the euler step back land on the previous latent; 0 = plain DDIM inversion."),
            ],
            outputs=[
                io.Latent.Output(display_name="inverted", tooltip="The noisy latent at the start sigma (ComfyUI's "
                                 "latent scale), for SamplerCustom with add_noise off. Carries the inversion record."),
                io.Noise.Output(display_name="noise", tooltip="The inverted noise, for SamplerCustomAdvanced with the "
                                "source latent (and its keep region): starts exactly at the inverted latent."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The remaining schedule, start sigma → 0: give it to "
                                 "the sampler unchanged."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent: dict, cfg: float, steps: int, scheduler: str,
                start_percent: float, refine: int) -> io.NodeOutput:
        # Start 1 (no noise left) is refused by inversion_sigmas: the end of the model's noise range is the rule.
        check_inputs(cls, scheduler=scheduler, cfg=cfg, start_percent=start_percent, steps=steps, refine=refine)
        if RECORD_KEY in latent:
            raise CXRInputError("this latent is already an inversion result (a noisy latent).", node=cls.TITLE,
                                input_name="latent", fix="Invert the encoded radiograph (VAE Encode's output).")
        samples = latent["samples"]
        if samples.ndim != 4 or torch.count_nonzero(samples) == 0:
            raise CXRInputError(f"the latent ({tuple(samples.shape)}) is empty or not an image latent.",
                                node=cls.TITLE, input_name="latent", fix="Connect VAE Encode of the radiograph.")
        convention = sampling_convention(model, cls.TITLE)
        sigmas = inversion_sigmas(model, scheduler, steps, start_percent, cls.TITLE, convention)
        result = invert(model, positive, negative, samples, cfg, sigmas, refine, convention)
        inverted = {k: v for k, v in latent.items() if k != "noise_mask"}  # the keep path needs the source
        inverted.update(samples=result.samples, **{RECORD_KEY: result.record})
        report = result.report
        audit.note("inversion", report.audit())
        finite = [r for r in report.residuals if math.isfinite(r)]
        logger.info("%s: %d steps from sigma %.4g (%d model calls), worst fixed-point residual %s", cls.TITLE,
                    report.steps, float(sigmas[0]), report.model_calls, f"{max(finite):.2e}" if finite else "n/a")
        return io.NodeOutput(inverted, InvertedNoise(result.eps, result.record, cls.TITLE), sigmas.clone())


class CXRInversionGuider(io.ComfyNode):
    """ComfyUI's CFG guider for SamplerCustomAdvanced that first checks the regeneration matches the inversion: same
    checkpoint (attention patches such as the gate are fine), same negative prompt, and at sampling time the
    inversion's sigmas and start latent/noise. The positive prompt may differ: that is the edit (the same prompt
    regenerates the patient)."""

    TITLE = "Inversion Guider (checked CFG)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRInversionGuider", display_name=cls.TITLE, category=CATEGORY_EDIT, is_experimental=True,
            description=described(cls),
            inputs=[
                io.Model.Input("model", tooltip="The edit's model (e.g. gated and boosted)."),
                io.Conditioning.Input("positive", tooltip="The edit prompt (the counterfactual finding)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt: the same as the inversion's."),
                cfg_input("Classifier-free guidance; a cfg other than the inversion's is allowed but logged (the kept "
                          "anatomy then drifts more)."),
                io.Latent.Input("inverted", tooltip="Invert Radiograph's 'inverted' output: its record is checked."),
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="A CFGGuider for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg: float, inverted: dict) -> io.NodeOutput:
        check_inputs(cls, cfg=cfg)
        record = inverted.get(RECORD_KEY)
        if not isinstance(record, InversionRecord):
            raise CXRInputError("this latent is not an inversion result.", node=cls.TITLE, input_name="inverted",
                                fix="Connect the 'inverted' output of Invert Radiograph (DDIM).")
        if model_key(model) != record.model_key:
            raise CXRInputError(
                "the model is not the one the radiograph was inverted with (another checkpoint, LoRA or model "
                "sampling).", node=cls.TITLE, input_name="model",
                fix="Invert with the same checkpoint as the edit (gated or boosted copies of it are fine).")
        if conditioning_key(negative) != record.negative_key:
            raise CXRInputError("the negative prompt differs from the inversion's.", node=cls.TITLE,
                                input_name="negative", fix="Connect the same negative conditioning to both nodes.")
        if not math.isclose(cfg, record.cfg, rel_tol=1e-6):
            logger.warning("%s: cfg %.3g differs from the inversion's %.3g: the regeneration will not retrace the "
                           "inversion exactly.", cls.TITLE, cfg, record.cfg)
        if conditioning_key(positive) == record.positive_key:
            logger.info("%s: the positive prompt is the inversion's: this regenerates the patient.", cls.TITLE)
        return io.NodeOutput(CheckedGuider(model, record, cls.TITLE, positive, negative, cfg))


NODES: list[type[io.ComfyNode]] = [CXRInvertLatent, CXRInversionGuider]
