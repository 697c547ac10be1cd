"""Latent refinement by attention-concentration energy (pure torch; no ComfyUI import).

The pathology words' cross-attention map ``A`` (``[h, w]``: the attention probabilities of their token
columns, summed over the words' tokens, averaged over heads and over the chosen layers) should lie inside
the target region ``T`` (e.g. the left lung). The energy of a map is::

    A~      = G_s * A                                  (Gaussian smoothing, Attend-and-Excite style)
    E_conc  = 1 − Σ_{n∈T} A~_n / Σ_n A~_n              (the share of pathology mass outside the target)
    a       = mean_n sigmoid((A~_n / max A~ − τ) / κ)  (soft area fraction of the normalised map above τ)
    E_ext   = |a − |T| / N|                            (extent: that area vs the target's area fraction)
    E       = (1 − λ)·E_conc + λ·E_ext                 (λ = extent_weight, default 0)

Both terms lie in [0, 1], so ``E`` does too; ``E = 0`` when all (smoothed) mass lies inside ``T`` and
λ = 0. Smoothing (kernel 3, σ 0.5 as in A&E) only spreads mass to neighbouring cells, so mass held one
cell inside the border still counts fully.

A refinement step moves the latent against the energy's gradient, normalised to unit RMS and scaled by
the current noise level (the latent's own scale in k-diffusion form ``x = x0 + σ·ε``)::

    x ← x − step_size · σ · g / rms(g),   g = ∂E/∂x

Attend-and-Excite (Chefer et al. 2023) updates the VP latent by ``α_t = 20·sqrt(1 − ᾱ_t)`` times the raw
gradient; normalising the gradient keeps ``step_size`` meaningful across models whose attention
gradients differ by orders of magnitude (random test weights vs trained ones), and the σ factor gives the
same decay over the schedule. Optional per-window thresholds stop a step's iterations once ``E`` is low
enough (A&E's 0.05 / 0.5 / 0.8 attention targets at 0 / 20 / 40 % correspond to energies 0.95 / 0.5 / 0.2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CXRInputError


@dataclass(frozen=True)
class RefineConfig:
    """Settings of one refinement sampler (immutable; the sampler converts percents to sigmas at run time)."""

    iterations: int = 1
    step_size: float = 0.1
    start_percent: float = 0.0
    end_percent: float = 0.5
    thresholds: tuple[tuple[float, float], ...] = ()
    smoothing: float = 0.5
    extent_weight: float = 0.0
    extent_threshold: float = 0.5
    extent_sharpness: float = 0.05


def gaussian_kernel(sigma: float, size: int = 3) -> torch.Tensor:
    """A normalised ``[size, size]`` Gaussian kernel."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def smooth_maps(maps: torch.Tensor, sigma: float, size: int = 3) -> torch.Tensor:
    """Gaussian-smooth ``[B, h, w]`` maps (replicate padding, so borders do not lose mass to zeros).

    ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma, size).to(maps.device, maps.dtype)
    pad = size // 2
    x = F.pad(maps[:, None], (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(x, k[None, None])[:, 0]


def concentration_energy(maps: torch.Tensor, inside: torch.Tensor, *, smoothing: float = 0.5,
                         extent_weight: float = 0.0, extent_threshold: float = 0.5,
                         extent_sharpness: float = 0.05) -> torch.Tensor:
    """The energy ``E ∈ [0, 1]`` per map (module docstring), differentiable in ``maps``.

    Args:
        maps: ``[B, h, w]`` non-negative pathology attention maps.
        inside: ``[h, w]`` (or ``[h·w]``) bool, the target's cells at this grid.
        smoothing: Gaussian σ in cells (0 = none).
        extent_weight: λ, weight of the extent term (0 = concentration only).
        extent_threshold: τ, the level (of the map normalised to its max) that counts as "covered".
        extent_sharpness: κ, temperature of the soft threshold.

    Returns:
        ``[B]`` energies.
    """
    b, h, w = maps.shape
    inside = inside.reshape(h, w).to(maps.device)
    if not inside.any():
        raise CXRInputError(f"the target covers no cell of the {h}×{w} attention grid.", input_name="target_organs",
                            fix="Use a larger target, or a smaller grid_factor (finer grid).")
    a = smooth_maps(maps.float(), smoothing).clamp_min(0)
    total = a.sum(dim=(1, 2)).clamp_min(1e-12)
    conc = 1 - (a * inside).sum(dim=(1, 2)) / total
    if extent_weight <= 0:
        return conc.clamp(0, 1)
    norm = a / a.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    area = torch.sigmoid((norm - extent_threshold) / extent_sharpness).mean(dim=(1, 2))
    ext = (area - inside.float().mean()).abs()
    return ((1 - extent_weight) * conc + extent_weight * ext).clamp(0, 1)


def refinement_step(x: torch.Tensor, grad: torch.Tensor, sigma: float, step_size: float) -> torch.Tensor:
    """``x − step_size·σ·g/rms(g)`` per batch item (a zero gradient leaves that item unchanged)."""
    dims = tuple(range(1, grad.dim()))
    rms = grad.pow(2).mean(dim=dims, keepdim=True).sqrt()
    direction = torch.where(rms > 0, grad / rms.clamp_min(1e-30), torch.zeros_like(grad))
    return x - step_size * sigma * direction


def parse_thresholds(spec: str) -> tuple[tuple[float, float], ...]:
    """``"0:0.95, 0.2:0.5, 0.4:0.2"`` (percent:energy) → sorted pairs; empty = no early stop.

    Raises:
        CXRInputError: a malformed pair or a value outside [0, 1].
    """
    pairs = []
    for part in re.split(r"[,;\n]+", spec):
        if not part.strip():
            continue
        p, sep, e = part.partition(":")
        try:
            pct, energy = float(p), float(e)
        except ValueError:
            pct = energy = math.nan
        if not sep or not (0 <= pct <= 1 and 0 <= energy <= 1):
            raise CXRInputError(f"'{part.strip()}' is not a percent:energy pair in [0, 1].", input_name="thresholds",
                                fix="Write e.g. 0:0.95, 0.2:0.5, 0.4:0.2 (or leave it empty).")
        pairs.append((pct, energy))
    return tuple(sorted(pairs))


def grid_at(latent: tuple[int, int], downsamples: int) -> tuple[int, int]:
    """The token grid after ``downsamples`` stride-2 convolutions (each rounds up)."""
    h, w = latent
    for _ in range(downsamples):
        h, w = -(-h // 2), -(-w // 2)
    return h, w
