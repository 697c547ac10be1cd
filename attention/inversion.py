"""Deterministic DDIM inversion of a latent, in k-diffusion's parameterisation (pure torch, no ``comfy``).

ComfyUI's samplers work on ``x = x0 + sigma * eps`` (the model's latent space, i.e. *after* the latent
scaling ``process_latent_in``; for EPS and v-prediction models alike, because ComfyUI's denoiser always
returns an ``x0`` estimate). A deterministic DDIM step from ``sigma_hi`` down to ``sigma_lo`` is then
exactly an Euler step of the probability-flow ODE::

    d = (x - D(x, sigma_hi)) / sigma_hi          # the predicted noise eps
    x_lo = x_hi + (sigma_lo - sigma_hi) * d       # = D(x, sigma_hi) + sigma_lo * d

which is what ComfyUI's ``euler`` (and ``ddim``, an alias of it) computes. Inversion runs the schedule
backwards, from the clean latent at ``sigma = 0`` up to the start sigma. Each step first takes the classic
DDIM-inversion guess (the model evaluated at the *current* latent with the *target* sigma, as in
Mokady et al.'s null-text inversion code), then optionally refines it by fixed-point iteration so that
the Euler step the sampler will take from it lands back on the current latent::

    y  <- x_lo + (sigma_hi - sigma_lo) * d(y, sigma_hi)      # solves  y + (sigma_lo - sigma_hi) d(y) = x_lo

Each refinement costs one model call per step and is Anderson-mixed (memory one: a secant step from the
last two evaluations, no extra call), which converges where the plain iteration contracts slowly. The
residual of every evaluated iterate is tracked; the best one is returned when the iteration stops
improving, and it stops early when it diverges, so a cfg or a model that makes the map expansive never
makes the result worse than the DDIM guess.

The caller supplies ``denoise(x, sigma) -> x0`` (ComfyUI's CFG guider inside a sampler run) and the
sampling schedule the regeneration will use (descending, ending at 0).

Flow-matching models (ComfyUI's CONST sampling: SD3/SD3.5, Flux) mix differently, ``x = (1 - sigma) * x0 +
sigma * n`` with ``sigma`` in (0, 1], and their network predicts the velocity ``v = n - x0``; ComfyUI's
denoiser still returns ``x0 = x - sigma * v``. The Euler step above is then ``d = (x - x0) / sigma = v``
and ``x_lo = x_hi + (sigma_lo - sigma_hi) * v``: the Euler step of the flow's ODE, the same arithmetic.
So the inversion loop, its refinement and :func:`euler_sample` are one rule for both; only mixing a latent
with noise differs, which :class:`NoiseConvention` states once (:data:`EPS`, :data:`FLOW`). The first step
up from ``sigma = 0`` needs no model call at sigma 0 (where a flow model's ``v`` is undefined in ComfyUI's
schedules, which never evaluate it there): the guess evaluates the model at the step's target sigma, the
schedule's smallest one, and the refinement solves the exact inverse of the Euler step from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import CXRInputError

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class InversionReport:
    """What an inversion did.

    Attributes:
        steps: schedule steps inverted.
        model_calls: denoiser evaluations made.
        residuals: per step (from sigma = 0 upwards), the relative fixed-point residual
            ``|y + (lo - hi) d(y) - x_lo| / |y0 - x_lo|`` (``y0`` the plain DDIM guess: the share of the step
            the sampler's Euler step would miss) of the last evaluated iterate (an upper bound for the
            returned one while the iteration contracts); ``nan`` without refinement.
        trajectory: the inverted latents aligned with the sampling schedule (``trajectory[i]`` at
            ``sigmas[i]``, so ``trajectory[0]`` is the result), detached on the CPU; a regeneration can
            feed them to the model in a kept region so that region follows the patient's own path.
    """

    steps: int
    model_calls: int
    residuals: tuple[float, ...]
    trajectory: tuple[torch.Tensor, ...] = ()

    def audit(self) -> dict[str, object]:
        """What the export's audit trail keeps: the reconstruction error (the worst finite residual, None without
        refinement) and the residual per step."""
        finite = [r for r in self.residuals if math.isfinite(r)]
        return {"steps": self.steps, "model_calls": self.model_calls,
                "reconstruction_error": max(finite) if finite else None,
                "residuals": [r if math.isfinite(r) else None for r in self.residuals]}


@dataclass(frozen=True)
class NoiseConvention:
    """How a model's sampling mixes the clean latent ``x0`` with noise ``n`` at ``sigma`` (ComfyUI's
    ``model_sampling.noise_scaling`` without its start-from-pure-noise special case).

    Attributes:
        name: ``"eps"`` (``x = x0 + sigma * n``, sigma unbounded) or ``"flow"`` (``x = (1 - sigma) * x0 +
            sigma * n``, sigma at most 1).
        max_sigma: the largest sigma the mixing is defined for.
    """

    name: str
    max_sigma: float

    @property
    def flow(self) -> bool:
        return self.name == "flow"

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """The latent at ``sigma`` made of ``x0`` and ``noise``."""
        return (1.0 - sigma) * x0 + sigma * noise if self.flow else x0 + sigma * noise

    def noise(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
        """The noise with ``noised(x0, noise, sigma) == x_t`` (the inverse of :meth:`noised` in ``noise``)."""
        if not 0 < sigma <= self.max_sigma * (1 + 1e-6):  # float32 schedules may round 1 a hair up
            raise CXRInputError(f"sigma {sigma} is outside (0, {self.max_sigma:g}] ({self.name} sampling).",
                                input_name="sigmas", fix="Start above sigma 0 and within the model's noise range.")
        return (x_t - (1.0 - sigma) * x0) / sigma if self.flow else (x_t - x0) / sigma


EPS = NoiseConvention("eps", math.inf)
FLOW = NoiseConvention("flow", 1.0)


def check_schedule(sigmas: torch.Tensor | Sequence[float], convention: NoiseConvention = EPS) -> list[float]:
    """The schedule as floats, checked: at least one step, strictly descending, positive, ending at 0, and
    within the convention's range (a flow model's sigma is at most 1).

    Raises:
        CXRInputError: any of the above fails (names the input ``sigmas``).
    """
    values = [float(s) for s in (sigmas.flatten().tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    fix = "Use the 'sigmas' output of Invert Radiograph (DDIM), or a schedule that ends at 0."
    if len(values) < 2:
        raise CXRInputError("the schedule has no step (fewer than two sigmas).", input_name="sigmas", fix=fix)
    if values[-1] != 0.0:
        raise CXRInputError(f"the schedule ends at sigma {values[-1]:.4g}, not 0.", input_name="sigmas", fix=fix)
    if any(not math.isfinite(v) or v <= 0 for v in values[:-1]):
        raise CXRInputError("the schedule has a non-positive or non-finite sigma before its end.",
                            input_name="sigmas", fix=fix)
    if values[0] > convention.max_sigma * (1 + 1e-6):
        raise CXRInputError(f"the schedule starts at sigma {values[0]:.4g}, above the {convention.name} sampling's "
                            f"largest, {convention.max_sigma:g}.", input_name="sigmas",
                            fix="Use the 'sigmas' output of Invert Radiograph, made from this model's schedule.")
    if any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise CXRInputError("the schedule is not strictly descending (two steps share a sigma).",
                            input_name="sigmas", fix="Use fewer steps or an earlier start (smaller start_percent).")
    return values


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().norm())


def invert_step(denoise: Denoiser, x_lo: torch.Tensor, sigma_lo: float, sigma_hi: float,
                refine: int = 0, accelerate: bool = True) -> tuple[torch.Tensor, int, float]:
    """One inverse Euler/DDIM step: the latent at ``sigma_hi`` whose Euler step to ``sigma_lo`` gives ``x_lo``
    (for a flow model, ``x_hi = x_lo + (sigma_hi - sigma_lo) * v``: the inverse of its ODE's Euler step).

    Solves ``y = g(y) = x_lo + h * d(y, sigma_hi)`` (``h = sigma_hi - sigma_lo``), starting from the classic
    DDIM-inversion guess, with ``refine`` further model calls. ``accelerate`` uses Anderson mixing with a
    memory of one (a secant step built from the last two evaluations, no extra model call): it converges
    where the plain fixed-point iteration contracts slowly or not at all.

    Returns:
        ``(y, model_calls, relative_residual)`` (see :class:`InversionReport`).
    """
    h = sigma_hi - sigma_lo
    # Classic DDIM inversion guess: noise predicted at the current latent with the target sigma
    # (at sigma_lo = 0 the model cannot be evaluated at the current sigma at all).
    y = x_lo + h * (x_lo - denoise(x_lo, sigma_hi)) / sigma_hi
    calls = 1
    # Relative to the step itself (|y - x_lo| = h|d|): the share of the step the sampler would miss. (The
    # latent's own norm is a poor scale: in model space it is ~0.02 per element while steps are ~sigma.)
    scale = max(_norm(y - x_lo), 1e-12)
    best, best_res, last_res = y, math.inf, math.nan
    g_prev: torch.Tensor | None = None
    r_prev: torch.Tensor | None = None
    for k in range(refine):
        g = x_lo + h * (y - denoise(y, sigma_hi)) / sigma_hi
        calls += 1
        r = g - y  # minus the miss of the sampler's own Euler step from y: y - h d(y) - x_lo
        last_res = _norm(r) / scale
        if last_res < best_res:
            best, best_res = y, last_res
        elif k >= 2 and last_res > 4 * best_res:  # diverging even with a secant step: stop spending calls
            return best, calls, best_res
        if accelerate and r_prev is not None and g_prev is not None:
            dr = (r - r_prev).double()
            denom = float((dr * dr).sum())
            gamma = float((r.double() * dr).sum()) / denom if denom > 0 else 0.0
            y_next = g - gamma * (g - g_prev)
        else:
            y_next = g
        g_prev, r_prev, y = g, r, y_next
    if refine and last_res > best_res:  # the last evaluation was not the best: return the best one
        return best, calls, best_res
    # Otherwise the iterate one update past the best evaluated one (its residual, unevaluated, is
    # typically smaller still); nan without refinement.
    return y, calls, (best_res if refine else math.nan)


def ddim_invert(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor | Sequence[float], *, refine: int = 0,
                accelerate: bool = True, progress: Progress | None = None,
                convention: NoiseConvention = EPS) -> tuple[torch.Tensor, InversionReport]:
    """Invert ``x0`` (the clean latent, model space) to the noisy latent at ``sigmas[0]``.

    Args:
        denoise: ``denoise(x, sigma) -> x0`` estimate (ComfyUI's denoiser, for eps and flow models alike).
        x0: the clean latent in the model's space (after ``process_latent_in``).
        sigmas: the *sampling* schedule, descending and ending at 0; sampling ``euler`` with it from the
            result regenerates ``x0`` (exactly, up to the fixed-point residual and float rounding).
        refine: fixed-point refinements per step (each one model call).
        accelerate: Anderson mixing of the refinements (see :func:`invert_step`).
        progress: called ``(done, total)`` after every step.
        convention: the model's mixing; the steps are the same for both, only the schedule's range differs.

    Returns:
        ``(x_T, report)`` with ``x_T`` at ``sigmas[0]``.
    """
    values = check_schedule(sigmas, convention)
    if refine < 0:
        raise CXRInputError(f"refine is {refine}.", input_name="refine", fix="Use 0 or more refinement iterations.")
    ascending = values[::-1]  # 0 = s_n < ... < s_0
    x = x0
    calls = 0
    residuals: list[float] = []
    path: list[torch.Tensor] = []
    total = len(ascending) - 1
    for i in range(total):
        x, n, res = invert_step(denoise, x, ascending[i], ascending[i + 1], refine, accelerate)
        calls += n
        residuals.append(res)
        path.append(x.detach().float().cpu().clone())
        if progress is not None:
            progress(i + 1, total)
    return x, InversionReport(steps=total, model_calls=calls, residuals=tuple(residuals),
                              trajectory=tuple(reversed(path)))


def euler_sample(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Deterministic Euler (= DDIM) sampling along ``sigmas``: the reference the inversion is the inverse of.

    The same arithmetic as ComfyUI's ``sample_euler`` without churn, for host-free tests.
    """
    values = check_schedule(sigmas)
    for hi, lo in zip(values, values[1:], strict=False):
        d = (x - denoise(x, hi)) / hi
        x = x + (lo - hi) * d
    return x


def implied_noise(x_t: torch.Tensor, x0: torch.Tensor, sigma: float,
                  convention: NoiseConvention = EPS) -> torch.Tensor:
    """The noise ``eps`` with ``x_t = x0 + sigma * eps`` (flow: ``x_t = (1 - sigma) * x0 + sigma * eps``): the
    inverted latent as a (deterministic) noise.

    Feeding it with ``x0`` to a sampler that adds noise (ComfyUI's ``noise_scaling``) starts at ``x_t``, and
    lets ComfyUI's keep-region path noise the kept source with the same ``eps`` at every step.
    """
    return convention.noise(x_t, x0, sigma)


__all__ = ["EPS", "FLOW", "Denoiser", "InversionReport", "NoiseConvention", "check_schedule", "ddim_invert",
           "euler_sample", "implied_noise", "invert_step"]
