"""ComfyUI's sampler and guider machinery for real-image inversion (the nodes are in ``nodes/inversion.py``).

The DDIM inversion of ``attention/inversion.py`` runs *inside* ComfyUI's own sampling machinery: a
``comfy.samplers.CFGGuider`` with the given model, conditioning and cfg samples with a ``KSAMPLER`` whose
sampler function is the inversion loop. So the denoiser it inverts is exactly the one SamplerCustom will
call later (same latent scaling ``process_latent_in/out``, same cond processing, same model patches and
wrappers), and the pack needs no private copy of ComfyUI's CFG code.

An inversion's outputs carry an :class:`InversionRecord` (which model, conditioning, cfg and schedule were
inverted, and the inverted trajectory) under :data:`RECORD_KEY` of the LATENT; :class:`CheckedGuider`
refuses a regeneration that does not match it, and feeds a kept region the patient's own inverted
trajectory instead of ComfyUI's straight-line ``source + sigma * eps``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from ...attention.inversion import (
    EPS,
    FLOW,
    InversionReport,
    NoiseConvention,
    check_schedule,
    ddim_invert,
    implied_noise,
)
from ...attention.run_state import latent_fingerprint
from ...errors import CXRInputError

RECORD_KEY = "cxr_inversion"  # LATENT dict key; ComfyUI's samplers copy unknown keys to their output
# Schedulers that can be restricted exactly to [sigma_min, sigma_start] (others read the model's whole table).
SCHEDULERS = ("normal", "karras", "exponential", "sgm_uniform", "kl_optimal")


@dataclass(frozen=True)
class InversionRecord:
    """What an inversion used: a regeneration must use the same model, negative prompt, cfg and schedule."""

    model_key: str
    positive_key: str
    negative_key: str
    cfg: float
    sigmas: tuple[float, ...]
    source_key: str
    inverted_key: str
    noise_key: str
    # The inverted latents at sigmas[:-1] (model space, CPU): what a kept region is fed while regenerating.
    trajectory: tuple[torch.Tensor, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Inversion:
    """One inversion's result: the noisy latent (ComfyUI's latent scale), the noise that reaches it from the
    source, its record and the inversion loop's report."""

    samples: torch.Tensor
    eps: torch.Tensor
    record: InversionRecord
    report: InversionReport


def model_key(model) -> str:
    """The model's weights and noise schedule: the loaded checkpoint object, its weight patches (LoRA) and
    its model sampling. Attention patches and wrappers (gate, boost, capture) do not count."""
    ms = model.get_model_object("model_sampling")
    return (f"{type(model.model).__name__}@{id(model.model):x}/{model.patches_uuid}/{type(ms).__name__}:"
            f"{float(ms.sigma_min):.6g}-{float(ms.sigma_max):.6g}")


def conditioning_key(conditioning) -> str:
    """A digest of a CONDITIONING: its tensors (context, pooled output, masks) and plain options."""
    h = hashlib.sha1()
    for tensor, options in conditioning:
        h.update(latent_fingerprint(tensor).encode())
        for k in sorted(options):
            v = options[k]
            if isinstance(v, torch.Tensor):
                h.update(f"{k}={latent_fingerprint(v)}".encode())
            elif isinstance(v, (int, float, str, bool, tuple, type(None))):
                h.update(f"{k}={v!r}".encode())
            else:
                h.update(f"{k}:{type(v).__name__}".encode())
    return h.hexdigest()


def sampling_convention(model, title: str) -> NoiseConvention:
    """The model's noise convention: EPS (and its subclasses: v-prediction, x0, EDM) mixes x = x0 + σ·ε, CONST
    (flow matching: SD3/SD3.5, Flux) x = (1 − σ)·x0 + σ·ε. Any other sampling is refused."""
    ms = model.get_model_object("model_sampling")
    if isinstance(ms, comfy.model_sampling.EPS):
        return EPS
    if isinstance(ms, comfy.model_sampling.CONST):
        return FLOW
    # ComfyUI builds the model sampling as a class named ModelSampling*: name its prediction base instead.
    kinds = [c.__name__ for c in type(ms).__mro__
             if c.__module__ == comfy.model_sampling.__name__ and not issubclass(c, torch.nn.Module)]
    raise CXRInputError(
        f"unsupported model sampling {kinds[0] if kinds else type(ms).__name__} (inversion supports EPS, "
        "x = x0 + σ·ε, and CONST flow matching, x = (1 − σ)·x0 + σ·ε).", node=title, input_name="model",
        fix="Use an SD1.x, SD2.x or SDXL-family checkpoint (CXR models such as RoentGen) or an SD3/SD3.5-family "
        "(flow) one, without a model-sampling node that changes its prediction type.")


class _Range:
    """A model sampling seen through a lower sigma_max, so ComfyUI's normal/sgm schedulers span [min, start].

    The schedulers space their steps evenly in the model's time ``timestep(sigma)`` and map back with
    ``sigma(t)``. For EPS models the two are inverses (the discrete table). ComfyUI's flow samplings are not:
    ``timestep`` is ``sigma * multiplier`` while ``sigma`` applies the shift (SD3:
    ``shift·t / (1 + (shift − 1)·t)``), so ``sigma(timestep(start))`` would start above the start (0.75 → 0.9
    at shift 3). Here ``timestep`` is the exact inverse of ``sigma`` (bisection on the monotone map), so the
    schedule starts at the start and ends at sigma_min, spaced evenly in the model's own (shifted) time.
    """

    def __init__(self, ms, sigma_max: float) -> None:
        self._ms = ms
        self._flow = isinstance(ms, comfy.model_sampling.CONST)
        self.sigma_max = torch.tensor(sigma_max)
        self.sigma_min = ms.sigma_min

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self._ms.timestep(sigma)
        if not self._flow or math.isclose(float(self._ms.sigma(t)), float(sigma), rel_tol=1e-6):
            return t
        target = torch.as_tensor(sigma, dtype=torch.float64)
        lo, hi = 0.0, float(self._ms.timestep(torch.tensor(1.0)))  # flow sigmas end at 1, at this time
        for _ in range(60):  # to float64 resolution: the map is monotone increasing
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(self._ms.sigma(torch.tensor(mid, dtype=torch.float64))) < target else (lo, mid)
        return torch.tensor(0.5 * (lo + hi))

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self._ms.sigma(timestep)


def inversion_sigmas(model, scheduler: str, steps: int, start_percent: float, title: str,
                     convention: NoiseConvention = EPS) -> torch.Tensor:
    """``steps`` steps of ``scheduler`` from ``percent_to_sigma(start_percent)`` (capped at sigma_max) to 0.

    ``start_percent`` is ComfyUI's convention for either kind: for SD3 (shift 3) ``percent_to_sigma`` is
    ``shift(1 − p)``, 1.0 at 0 and 0.75 at 0.5; sigma_max is 1 and sigma_min ``shift(1/1000)`` ≈ 0.003."""
    ms = model.get_model_object("model_sampling")
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    start = min(float(ms.percent_to_sigma(start_percent)), sigma_max)
    if start <= sigma_min * (1 + 1e-6):
        raise CXRInputError(
            f"start_percent {start_percent} is at the end of the noise range (sigma {start:.4g}): nothing to invert.",
            node=title, input_name="start_percent", fix="Use a start below 1, e.g. 0.3–0.7.")
    if convention.flow and start >= 1.0 - 1e-6:
        # ComfyUI stores a flow latent at sigma as x / (1 − σ) (inverse_noise_scaling): none exists at sigma 1.
        raise CXRInputError(
            f"start_percent {start_percent} is sigma 1 (pure noise) for this flow model: ComfyUI has no LATENT for "
            "it (it stores x / (1 − σ)).", node=title, input_name="start_percent",
            fix="Use a start above 0, e.g. 0.3–0.7 (0.01 is nearly pure noise).")
    if scheduler in ("normal", "sgm_uniform"):
        sigmas = comfy.samplers.normal_scheduler(_Range(ms, start), steps, sgm=scheduler == "sgm_uniform")
    else:
        handler = comfy.samplers.SCHEDULER_HANDLERS[scheduler].handler
        sigmas = handler(n=steps, sigma_min=sigma_min, sigma_max=start)
    try:
        check_schedule(sigmas, convention)
    except CXRInputError as err:  # a collapsed schedule is a steps/start problem, not one of a wired input
        raise CXRInputError(f"{steps} steps from sigma {start:.4g}: {err.problem}", node=title, input_name="steps",
                            fix="Use fewer steps or a smaller start_percent.") from None
    return sigmas.float().cpu()


def _max_denoise(ms, sigma: float) -> bool:
    """ComfyUI's test (``Sampler.max_denoise``) for starting from pure noise, where it scales an EPS model's noise
    by sqrt(1 + sigma²) instead of sigma (CONST's noise scaling ignores it: at sigma 1 the latent is the noise)."""
    sigma_max = float(ms.sigma_max)
    return math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max


def invert(model, positive, negative, samples: torch.Tensor, cfg: float, sigmas: torch.Tensor,
           refine: int, convention: NoiseConvention = EPS) -> Inversion:
    """Invert ``samples`` (a LATENT's tensor) along ``sigmas`` with ComfyUI's CFG guider and record what was used.

    The noise is the one ComfyUI's ``noise_scaling`` turns into the inverted latent at the start sigma ``s``:
    ``(x_s − x0) / s`` for EPS, ``(x_s − (1 − s)·x0) / s`` for flow."""
    x_t, x0, report = _run_inversion(model, positive, negative, samples, cfg, sigmas, refine, convention)
    sigma_t = float(sigmas[0])
    eps = implied_noise(x_t, x0, sigma_t, convention)
    if not convention.flow and _max_denoise(model.get_model_object("model_sampling"), sigma_t):
        # ComfyUI will scale by sqrt(1 + σ²), not σ
        eps = eps * (sigma_t / math.sqrt(1.0 + sigma_t * sigma_t))
    # ComfyUI's LATENT convention for a latent with noise left at sigma (what a sampler stopping there returns,
    # and what a sampler without added noise scales back to x_t): x_t for EPS, x_t / (1 − σ) for flow (CONST's
    # inverse_noise_scaling), so SamplerCustom with add_noise off starts exactly at x_t either way.
    ms = model.get_model_object("model_sampling")
    stored = ms.inverse_noise_scaling(torch.tensor([sigma_t], dtype=x_t.dtype), x_t)
    inverted = model.model.process_latent_out(stored).to(samples.dtype)
    record = InversionRecord(
        model_key=model_key(model), positive_key=conditioning_key(positive),
        negative_key=conditioning_key(negative), cfg=float(cfg), sigmas=tuple(float(s) for s in sigmas),
        source_key=latent_fingerprint(samples), inverted_key=latent_fingerprint(inverted),
        noise_key=latent_fingerprint(eps), trajectory=report.trajectory)
    return Inversion(inverted, eps, record, report)


def _run_inversion(model, positive, negative, samples: torch.Tensor, cfg: float, sigmas: torch.Tensor,
                   refine: int, convention: NoiseConvention) -> tuple[torch.Tensor, torch.Tensor, InversionReport]:
    """Run the inversion as a ComfyUI sampler: returns x_T and x0 in the model's space (CPU), and the report."""
    pbar = comfy.utils.ProgressBar(len(sigmas) - 1)
    held: dict = {}

    def inversion_sampler(model_k, x, sigmas_dev, extra_args=None, callback=None, disable=None):
        extra = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise(latent: torch.Tensor, sigma: float) -> torch.Tensor:
            return model_k(latent, sigma * s_in, **extra)

        # The source after process_latent_in, as KSAMPLER hands it to its model wrapper: the sampler's own
        # start x is the zero noise scaled in, which is the source for EPS but (1 − σ)·source for flow.
        source = model_k.latent_image.to(x.dtype)
        held["x0"] = source.detach().float().cpu().clone()
        x_t, held["report"] = ddim_invert(denoise, source, sigmas_dev, refine=refine, convention=convention,
                                          progress=lambda i, n: pbar.update_absolute(i, n))
        held["x_t"] = x_t.detach().float().cpu().clone()
        return x_t

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    # The noise is zero (nothing random); the sampler reads the source from its model wrapper (above).
    zeros = torch.zeros_like(samples, device="cpu")
    with torch.inference_mode():
        guider.sample(zeros, samples, comfy.samplers.KSAMPLER(inversion_sampler), sigmas, denoise_mask=None,
                      callback=None, disable_pbar=True, seed=0)
    return held["x_t"], held["x0"], held["report"]


class InvertedNoise:
    """NOISE for SamplerCustomAdvanced: the inversion's ``eps``, valid only with the latent it inverted."""

    def __init__(self, eps: torch.Tensor, record: InversionRecord, title: str) -> None:
        self.seed = 0  # SamplerCustomAdvanced passes it on as the run's seed; nothing here is random
        self.eps = eps
        self.record = record
        self.title = title

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if latent_fingerprint(samples) != self.record.source_key:
            raise CXRInputError(
                f"the sampler's latent_image ({tuple(samples.shape)}) is not the latent this noise was inverted "
                "from.", node=self.title, input_name="latent",
                fix="Give SamplerCustomAdvanced the same source latent (or its Apply Keep Region output); for the "
                "'inverted' latent use SamplerCustom with add_noise off instead.")
        return self.eps.to(samples.dtype).clone()


class CheckedGuider(comfy.samplers.CFGGuider):
    """A CFGGuider that refuses a regeneration whose schedule or start is not the inversion's, and in a kept
    region feeds the model the patient's own inverted trajectory.

    ComfyUI's keep path feeds the kept region the source noised with one fixed ``eps`` (``source + eps * sigma``;
    flow: ``(1 - sigma) * source + sigma * eps``, the model's own ``noise_scaling`` either way); a DDIM path
    is not that straight line (eps drifts along it), so the edited region would see a context slightly
    different from the one it was inverted with. At every call whose sigma is on the inversion's schedule
    (every call of euler/ddim), this guider replaces the keep part of the model input by the trajectory
    (exactly where the mask is 0, blended by the mask in the feather), so the source prompt retraces the
    inversion and an edit starts from the patient's own path. The kept output is still ComfyUI's source.
    """

    def __init__(self, model, record: InversionRecord, title: str, positive, negative, cfg: float) -> None:
        super().__init__(model)
        self.record = record
        self.title = title
        self._keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (mask, noise, source in)
        self.set_conds(positive, negative)
        self.set_cfg(cfg)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        rec = self.record
        given = [float(s) for s in sigmas.flatten().tolist()]
        if len(given) != len(rec.sigmas) or not all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(given, rec.sigmas, strict=False)):
            raise CXRInputError(
                f"the sampler's sigmas ({len(given) - 1} steps from {given[0]:.4g}) are not the inversion's "
                f"({len(rec.sigmas) - 1} steps from {rec.sigmas[0]:.4g}).", node=self.title, input_name="inverted",
                fix="Connect Invert Radiograph's 'sigmas' output to the sampler's sigmas, unchanged.")
        key = latent_fingerprint(latent_image)
        if key == rec.inverted_key:
            if denoise_mask is not None:
                raise CXRInputError(
                    "the inverted (noisy) latent carries a noise mask: ComfyUI would keep the noise there.",
                    node=self.title, input_name="inverted",
                    fix="Give the sampler the source latent with the keep region and the inversion's 'noise'.")
        elif key == rec.source_key:
            if latent_fingerprint(noise) != rec.noise_key:
                raise CXRInputError(
                    "the sampler got the source latent but not the inversion's noise.", node=self.title,
                    input_name="inverted", fix="Connect Invert Radiograph's 'noise' output to SamplerCustomAdvanced.")
            if denoise_mask is not None and rec.trajectory:
                self._keep = (denoise_mask, noise, latent_image)
        else:
            raise CXRInputError(
                "the sampler's latent is neither the inverted latent nor the source it came from.", node=self.title,
                input_name="inverted", fix="Use the latent that was inverted (or the inversion's 'inverted' output).")
        try:
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self._keep = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        if self._keep is not None:
            x = self._follow_trajectory(x, timestep)
        return super().predict_noise(x, timestep, model_options, seed)

    def _follow_trajectory(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = float(timestep.flatten()[0])
        step = next((i for i, s in enumerate(self.record.sigmas[:-1]) if math.isclose(s, sigma, rel_tol=1e-5)), None)
        if step is None:  # an intermediate sigma (heun, dpm_2 ...): ComfyUI's own keep input stays
            return x
        raw_mask, noise, source = self._keep
        model = self.inner_model
        mask = comfy.sampler_helpers.prepare_mask(raw_mask, x.shape, x.device).to(x.dtype)
        path = self.record.trajectory[step].to(x.device, x.dtype).expand_as(x)
        # What KSamplerX0Inpaint put in the keep part: the source noised with the fixed eps.
        noised = model.scale_latent_inpaint(x=x, sigma=timestep, noise=noise.to(x.device, x.dtype),
                                            latent_image=model.process_latent_in(source.to(x.device, x.dtype)))
        return torch.where(mask == 0, path, x + (1 - mask) * (path - noised))
