"""Noise levels of a discrete-time (DDPM-family) model in ComfyUI's conventions (pure torch, no host import).

The core's stages act in windows of *sigma*, the k-diffusion noise level of ``x = x0 + σ·ε``; for a
discrete model ``σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)``. ComfyUI derives everything from that table
(``ModelSamplingDiscrete``); a second host (diffusers, whose schedulers hold ``alphas_cumprod``) uses this
class so both hosts turn the same percents into the same sigmas and the same sigmas into the same UNet
timesteps:

- ``sigma(t)``: log-linear interpolation of the table at a (possibly fractional) timestep;
- ``timestep(σ)``: the nearest table entry (what ComfyUI feeds the UNet);
- ``percent_to_sigma(p)``: ``sigma((1 − p)·(T − 1))``, with 0 % above every sigma and 100 % at 0, so a
  window is a fraction of the model's noise range, not of the step count;
- ``normal_sigmas``: ComfyUI's ``normal`` scheduler, with KSampler's handling of ``denoise < 1``.
"""

from __future__ import annotations

import math

import torch

#: ComfyUI's percent_to_sigma at 0 %: above any sigma, so a window starting at 0 % includes the first step.
SIGMA_ABOVE_ALL = 999999999.9


class DiscreteSchedule:
    """The sigma table of a discrete-time diffusion model (``T`` training timesteps)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must hold at least two values in (0, 1)")
        self.sigmas = (((1 - ac) / ac) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_scheduler(cls, scheduler) -> DiscreteSchedule:
        """From any scheduler object with an ``alphas_cumprod`` table (diffusers' DDPM-family schedulers)."""
        table = getattr(scheduler, "alphas_cumprod", None)
        if table is None:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: not a discrete-time scheduler")
        return cls(torch.as_tensor(table))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, timestep: float) -> float:
        """σ at a timestep (fractional timesteps interpolate log σ linearly, as ComfyUI does)."""
        t = min(max(float(timestep), 0.0), float(len(self.sigmas) - 1))
        lo, hi = math.floor(t), math.ceil(t)
        w = t - lo
        return float(((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp())

    def timestep(self, sigma: float) -> int:
        """The timestep whose σ is nearest in log space (the UNet input ComfyUI computes for ``sigma``)."""
        return int((math.log(sigma) - self.log_sigmas).abs().argmin())

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's convention: 0 % is above every sigma, 100 % is 0, else ``sigma((1 − p)·(T − 1))``."""
        if percent <= 0.0:
            return SIGMA_ABOVE_ALL
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * (len(self.sigmas) - 1))

    def normal_sigmas(self, steps: int, denoise: float = 1.0) -> torch.Tensor:
        """ComfyUI's ``normal`` schedule of ``steps`` steps ending at 0; with ``denoise < 1`` the last
        ``steps`` steps of a ``int(steps / denoise)``-step schedule (as KSampler does for img2img)."""
        if steps < 1 or not 0.0 < denoise <= 1.0:
            raise ValueError(f"need steps >= 1 and 0 < denoise <= 1, got {steps}, {denoise}")
        total = steps if denoise > 0.9999 else int(steps / denoise)
        start, end = self.timestep(self.sigma_max), self.timestep(self.sigma_min)
        append_zero = True
        if math.isclose(self.sigma(end), 0, abs_tol=1e-5):
            total, append_zero = total + 1, False
        sigmas = [self.sigma(float(t)) for t in torch.linspace(start, end, total)]
        if append_zero:
            sigmas.append(0.0)
        return torch.tensor(sigmas, dtype=torch.float32)[-(steps + 1):]


def max_denoise(schedule: DiscreteSchedule, first_sigma: float) -> bool:
    """Whether a run starts from pure noise (ComfyUI then scales the noise by ``sqrt(1 + σ²)``)."""
    return math.isclose(schedule.sigma_max, first_sigma, rel_tol=1e-5) or first_sigma > schedule.sigma_max


def noised(latent: torch.Tensor, noise: torch.Tensor, sigma: float, from_pure_noise: bool = False) -> torch.Tensor:
    """``latent + σ·noise`` (ComfyUI's ``noise_scaling`` for EPS/v models; ``sqrt(1 + σ²)`` from pure noise)."""
    scale = math.sqrt(1.0 + sigma**2) if from_pure_noise else sigma
    return latent + noise * scale
