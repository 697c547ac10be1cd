"""The ComfyUI samplers that latent refinement can drive, and how to run one of them over part of a schedule.

Refinement changes the latent the sampler carries *between* steps, and a sampler function owns its latent for
the whole schedule. So, inside the refinement window, the user's own sampler function runs one step at a time
(``sigmas[i:i + 2]``) with the latent refined before each call; before and after the window it runs the
remaining steps in one call. Everything a step computes is the stock function's code; two things need care:

- **Noise.** Ancestral and SDE samplers draw fresh noise each step from a noise sampler they build from the
  seed (and, for the Brownian-tree ones, from the schedule's sigma range) when they start. Called once per
  segment, each call would rebuild it and replay the same draws. So the run builds that noise sampler once, as
  the stock function would for the whole schedule, and hands it to every call (their ``noise_sampler``
  argument): a one-step sampler run in segments draws exactly the noise of the stock run.
- **History.** Multistep samplers (dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, lms, uni_pc) extrapolate from the
  predictions of earlier steps. A refined step moves the latent off the trajectory those predictions were
  made on, so extrapolating would read the refinement's move as the trajectory's curvature. Each call starts
  without history, as the sampler does at its first step: inside the window these samplers take first-order
  steps (their own start-up step), and after the window they build their history again over the first
  steps. One-step samplers (euler, heun, dpm_2, dpmpp_sde, lcm, ...) are unaffected.

UniPC's ComfyUI form cannot take a one-step schedule (its first step only evaluates the model), so a single
UniPC step is driven here through its own solver object: one evaluation at ``sigmas[i]`` and one
predictor-corrector update of order 1, as the stock sampler's first update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.k_diffusion.sampling as kds
import torch
from comfy.extra_samplers import uni_pc

from ...errors import CXRInputError

Callback = Callable[[dict], None] | None


@dataclass(frozen=True)
class SamplerMethod:
    """One supported sampler: its function, the noise sampler it builds for itself, whether it keeps history."""

    name: str
    function: Callable
    noise: str | None = None  # "default" (seeded generator) or "brownian"/"brownian_gpu" (Brownian tree)
    multistep: bool = False
    unipc_variant: str | None = None  # UniPC: "bh1" / "bh2" (single steps need the solver object)
    inpaint_options: dict = field(default_factory=dict, compare=False)


def _k(name: str, noise: str | None = None, multistep: bool = False, fn: str | None = None, **kw) -> SamplerMethod:
    return SamplerMethod(name, getattr(kds, f"sample_{fn or name}"), noise, multistep, **kw)


#: The samplers refinement supports, by ComfyUI's sampler name (KSamplerSelect's list).
METHODS: dict[str, SamplerMethod] = {m.name: m for m in (
    _k("euler"), _k("euler_ancestral", "default"), _k("heun"), _k("dpm_2"), _k("dpm_2_ancestral", "default"),
    _k("lms", multistep=True), _k("dpmpp_2s_ancestral", "default"), _k("dpmpp_sde", "brownian"),
    _k("dpmpp_sde_gpu", "brownian_gpu"), _k("dpmpp_2m", multistep=True),
    _k("dpmpp_2m_sde", "brownian", True), _k("dpmpp_2m_sde_gpu", "brownian_gpu", True),
    _k("dpmpp_3m_sde", "brownian", True), _k("lcm", "default"),
    # ComfyUI's "ddim" is Euler whose masked-inpainting noise is drawn from seed + 1 (KSAMPLER's inpaint_options)
    _k("ddim", fn="euler", inpaint_options={"random": True}),
    SamplerMethod("uni_pc", uni_pc.sample_unipc, None, True, "bh1"),
    SamplerMethod("uni_pc_bh2", uni_pc.sample_unipc_bh2, None, True, "bh2"),
)}


def method_of(sampler, node: str, input_name: str = "sampler") -> SamplerMethod:
    """The supported method behind a SAMPLER (KSamplerSelect's, or a SamplerCustom-family node's KSAMPLER).

    Raises:
        CXRInputError: not a KSAMPLER, or a sampler function refinement does not support.
    """
    fn = getattr(sampler, "sampler_function", None)
    inpaint = dict(getattr(sampler, "inpaint_options", {}) or {})
    found = [m for m in METHODS.values() if m.function is fn and bool(m.inpaint_options) == bool(inpaint)]
    if found:
        return found[0]
    what = getattr(fn, "__name__", type(sampler).__name__)
    if what.startswith("sample_"):
        what = what[len("sample_"):]
    raise CXRInputError(
        f"refinement cannot drive the sampler '{what}' (it needs a sampler that runs one step at a time from "
        f"the latent it is given).", node=node, input_name=input_name,
        fix="Connect KSamplerSelect (or SamplerEulerAncestral, SamplerDPMPP_2M_SDE, SamplerDPMPP_SDE, SamplerLMS) "
        f"with one of: {', '.join(METHODS)}; or leave the input empty for euler.")


def run_noise_sampler(method: SamplerMethod, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict):
    """The noise sampler ``method``'s function builds when it starts on the whole schedule (None: it draws none)."""
    seed = extra_args.get("seed", None)
    if method.noise == "default":
        return kds.default_noise_sampler(x, seed=seed)
    if method.noise in ("brownian", "brownian_gpu"):
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        return kds.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=method.noise == "brownian")
    return None


def _shifted(callback: Callback, offset: int) -> Callback:
    """The callback with the step index of the whole schedule (a segment counts its steps from 0)."""
    if callback is None or offset == 0:
        return callback
    return lambda d: callback({**d, "i": d["i"] + offset})


def _unipc_step(method: SamplerMethod, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict,
                callback: Callback) -> torch.Tensor:
    """One UniPC step from ``sigmas[0]`` to ``sigmas[1]``, as ``sample_unipc`` converts and updates (variance-
    preserving latent, time = sigma; a final sigma of 0 becomes 0.001 as there), corrector on unless it is the
    schedule's last step."""
    last = float(sigmas[-1]) == 0
    t = sigmas.clone()
    if last:
        t[-1] = 0.001
    ns = uni_pc.SigmaConvert()
    xv = x / torch.sqrt(1.0 + t[0] ** 2.0)
    model_fn = uni_pc.model_wrapper(lambda inp, sigma, **kw: uni_pc.predict_eps_sigma(model, inp, sigma, **kw), ns,
                                    model_type="noise", guidance_type="uncond", model_kwargs=extra_args)
    solver = uni_pc.UniPC(model_fn, ns, predict_x0=True, thresholding=False, variant=method.unipc_variant)
    t0, t1 = t[0].expand(x.shape[0]), t[1].expand(x.shape[0])
    previous = [solver.model_fn(xv, t0)]
    if callback is not None:
        callback({"x": x, "i": 0, "denoised": previous[-1]})
    xv, _ = solver.multistep_uni_pc_update(xv, previous, [t0], t1, 1, use_corrector=not last)
    return xv / ns.marginal_alpha(t[-1])


def run_segment(method: SamplerMethod, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict,
                callback: Callback, disable, offset: int, noise_sampler, options: dict) -> torch.Tensor:
    """The stock sampler over ``sigmas`` (a part of the run's schedule starting at step ``offset``), from ``x``,
    with the run's ``noise_sampler`` and the SAMPLER's ``options`` (e.g. eta, s_noise)."""
    cb = _shifted(callback, offset)
    if method.unipc_variant is not None and len(sigmas) == 2:
        return _unipc_step(method, model, x, sigmas, extra_args, cb)
    kwargs = dict(options)
    if noise_sampler is not None and kwargs.get("noise_sampler") is None:
        kwargs["noise_sampler"] = noise_sampler
    return method.function(model, x, sigmas, extra_args=extra_args, callback=cb, disable=disable, **kwargs)


def plan(steps: int, window: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """The run's calls ``(first step, end step, refined)``: each window step alone (refined before it), every run
    of steps outside the window in one call."""
    calls: list[tuple[int, int, bool]] = []
    for i in range(steps):
        if i in window:
            calls.append((i, i + 1, True))
        elif calls and not calls[-1][2]:
            calls[-1] = (calls[-1][0], i + 1, False)
        else:
            calls.append((i, i + 1, False))
    return calls
