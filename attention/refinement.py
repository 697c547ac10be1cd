"""Latent refinement by attention-concentration energy (pure torch; no ComfyUI import).

The pathology words' cross-attention map ``A`` (``[h, w]``: the attention probabilities of their token
columns, summed over the words' tokens, averaged over heads and over the chosen layers) should lie inside
the target region ``T`` (e.g. the left lung). The energy of a map is::

    A~      = G_s * A                                  (Gaussian smoothing, as Attend-and-Excite's code)
    E_conc  = 1 − Σ_{n∈T} A~_n / Σ_n A~_n              (the share of pathology mass outside the target)
    a       = mean_n sigmoid((A~_n / max A~ − τ) / κ)  (soft area fraction of the normalised map above τ)
    E_ext   = |a − |T| / N|                            (extent: that area vs the target's area fraction)
    E       = (1 − λ)·E_conc + λ·E_ext                 (λ = extent_weight, default 0)

Both terms lie in [0, 1], so ``E`` does too; ``E = 0`` when all (smoothed) mass lies inside ``T`` and
λ = 0. Smoothing (kernel 3, σ 0.5: the defaults of Attend-and-Excite's released code, yuval-alaluf/Attend-and-Excite
``config.py`` ``kernel_size``/``sigma``) only spreads mass to neighbouring cells, so mass held one cell inside the
border still counts fully. The energy itself is ours: A&E's loss is ``max over subject tokens of (1 − peak smoothed
attention)`` (``pipeline_attend_and_excite.py``, ``_compute_loss``), a different quantity from a share of mass.

A refinement step moves the latent against the energy's gradient, normalised to unit RMS over the cells that
may move and scaled by the current noise level (the latent's own scale in k-diffusion form ``x = x0 + σ·ε``)::

    x ← x − step_size · σ · m·g / r,   g = ∂E/∂x,   r = sqrt(Σ (m·g)² / Σ m)

per batch item, where ``m ∈ [0, 1]`` is the sampler's denoise (edit) mask (1 everywhere without a keep region,
so ``r = rms(g)``). The move ``d`` then has ``sqrt(Σ d² / Σ m) = step_size · σ``: over a binary mask, the RMS move
of the cells that may move is exactly ``step_size · σ`` whatever their share of the latent, and kept cells
(``m = 0``) do not move. (Normalising over the whole latent would move the editable cells by
``step_size · σ / sqrt(edit fraction)``: 2× at a quarter of the latent.)

σ is always the model's own (the sampler's schedule). The rule is one for both conventions: the move is
``step_size`` times the RMS of the noise part of the latent. In k-diffusion form (eps/v models) ``x = x0 + σ·ε``; a
flow-matching (rectified flow, CONST) model such as SD3/SD3.5 or Flux samples ``x = (1 − σ)·x0 + σ·ε`` with
``σ ∈ [0, 1]``, whose noise part is again ``σ·ε`` (``ε`` of unit RMS): so ``step_size·σ`` moves a flow latent
by the same share of its noise as an eps latent, and the move vanishes at ``σ → 0`` in both. (What differs is the
signal's scale, ``1 − σ`` vs 1: at σ near 1 a flow latent carries little of ``x0``, where an eps latent's noise
dwarfs it; relative to the noise, both moves are alike.) The window's percents become sigmas through the model's
own ``percent_to_sigma`` (:func:`refine_window`; for a flow model percent 0 → σ 1, percent 1 → σ 0, through the
model's shift), so the same percents name the same share of the schedule on either kind of model.

Attend-and-Excite's released code (yuval-alaluf/Attend-and-Excite, ``pipeline_attend_and_excite.py``; defaults in
``config.py``) moves the latent by the *raw* gradient times ``scale_factor·sqrt(scale_range[i])``, with
``scale_factor`` 20 and ``scale_range = linspace(1.0, 0.5, steps)`` indexed by step ``i`` (20 → 14.1 over the
schedule), once per step for the first ``max_iter_to_alter`` = 25 of 50 steps. Normalising the gradient and
scaling by σ is our choice: it keeps ``step_size`` meaningful across models whose attention gradients differ by
orders of magnitude (random test weights vs trained ones) and shrinks the move with the noise level, a much
steeper decay than A&E's. Optional per-window thresholds stop a step's iterations once ``E`` is low enough. A&E
refines iteratively (up to 20 iterations) at step indices 0, 10 and 20 of 50 until every subject token's peak
attention reaches 0.05 / 0.5 / 0.8 (``config.py`` ``thresholds``); our thresholds are energies at percents of the
noise range, so "0:0.95, 0.2:0.5, 0.4:0.2" is our analogue of those numbers, not an equivalent.

Both hosts run the same loop, :func:`refine_step` (given the host's energy as a callable, as
:func:`.inversion.ddim_invert` is given a denoiser), over the steps of :func:`refine_window`.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import CXRInputError
from .mask_batch import AnyOrganMasks, check_mask_count, mask_sets
from .patch_grid import patch_fit
from .regions import coverage
from .run_record import RefineStep
from .stages import Grid
from .tokens import token_columns

logger = logging.getLogger("cxr_counterfactual")

Energy = Callable[[torch.Tensor], torch.Tensor]
"""A host's energy: latent ``x`` → ``[B]`` energies, differentiable in ``x`` when ``x`` requires grad."""


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
        inside: bool, the target's cells at this grid: ``[h, w]`` (or ``[h·w]``) for one target every map shares,
            or ``[B, h, w]`` (or ``[B, h·w]``) for each map's own target (a batch of radiographs).
        smoothing: Gaussian σ in cells (0 = none).
        extent_weight: λ, weight of the extent term (0 = concentration only).
        extent_threshold: τ, the level (of the map normalised to its max) that counts as "covered".
        extent_sharpness: κ, temperature of the soft threshold.

    Returns:
        ``[B]`` energies.
    """
    b, h, w = maps.shape
    inside = inside.reshape(-1, h, w).to(maps.device)  # [1 or B, h, w]: one target per map, or one for all
    for one in inside:
        require_cells(one, (h, w))
    a = smooth_maps(maps.float(), smoothing).clamp_min(0)
    total = a.sum(dim=(1, 2)).clamp_min(1e-12)
    conc = 1 - (a * inside).sum(dim=(1, 2)) / total
    if extent_weight <= 0:
        return conc.clamp(0, 1)
    norm = a / a.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    area = torch.sigmoid((norm - extent_threshold) / extent_sharpness).mean(dim=(1, 2))
    ext = (area - inside.float().mean(dim=(1, 2))).abs()
    return ((1 - extent_weight) * conc + extent_weight * ext).clamp(0, 1)


def refinement_step(x: torch.Tensor, grad: torch.Tensor, sigma: float, step_size: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x − step_size·σ·m·g/r`` per batch item, ``r = sqrt(Σ (m·g)² / Σ m)`` (module docstring).

    The move's mask-weighted RMS, ``sqrt(Σ move² / Σ m)``, is ``step_size·σ``: for a binary mask the RMS over the
    cells that may move; for a soft (feathered) mask the move's energy per unit of editable area. Cells where
    ``m = 0`` are returned bit for bit. A batch item whose mask or masked gradient is all zero is unchanged.

    Args:
        x: the latent ``[B, ...]``.
        grad: ``∂E/∂x``, ``x``'s shape.
        sigma: the current noise level.
        step_size: the RMS move in units of ``sigma``.
        mask: where the latent may move, in ``[0, 1]``, broadcastable to ``grad`` (ComfyUI's ``denoise_mask``:
            ``[1 or B, 1 or C, h, w]``); None = everywhere.

    Returns:
        The moved latent, ``x``'s dtype.
    """
    g = grad.float()  # the sums in float32 even for a half-precision latent
    m = torch.ones_like(g) if mask is None else mask.to(g.device, g.dtype).expand_as(g)
    g = g * m
    dims = tuple(range(1, g.dim()))
    area = m.sum(dim=dims, keepdim=True)
    r = (g.pow(2).sum(dim=dims, keepdim=True) / area.clamp_min(1e-30)).sqrt()
    direction = torch.where((r > 0) & (area > 0), g / r.clamp_min(1e-30), torch.zeros_like(g))
    return (x - step_size * sigma * direction).to(x.dtype)


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


def require_cells(inside: torch.Tensor, grid: Grid, node: str = "") -> None:
    """Refuse a target that covers no cell of the energy grid (its energy would be 1 whatever the latent).

    Raises:
        CXRInputError: ``inside`` holds no cell (input ``target_organs``).
    """
    if not inside.any():
        raise CXRInputError(f"the target covers no cell of the {grid[0]}×{grid[1]} energy grid.", node=node,
                            input_name="target_organs",
                            fix="Use a larger target, a smaller grid_factor (finer grid), or a larger image.")


@dataclass(frozen=True)
class Refinement:
    """What a refinement reads (as the CXR Refinement Sampler node sets it): the settings, the one-region
    ``target`` (one set every image shares, or one per image of a batch), the pathology words' ``positions`` in a
    prompt of ``cond_len`` tokens, and the energy grid ``latent / grid_factor``."""

    config: RefineConfig
    target: AnyOrganMasks
    positions: Mapping[str, tuple[int, ...]]
    cond_len: int = 77
    grid_factor: int = 4
    _cells: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def columns(self, context_len: int) -> torch.Tensor:
        """The pathology words' key columns in a context of ``context_len`` tokens."""
        return token_columns(itertools.chain.from_iterable(self.positions.values()), self.cond_len, context_len)

    def cells(self, grid: Grid, latent: Grid, node: str = "", patch: int = 0) -> torch.Tensor:
        """``[S, h·w]`` bool: the energy grid's cells inside the target of each of its ``S`` mask sets (1 when
        every image shares one), cached per grid, latent and ``patch`` (a diffusion transformer's patch size: its
        tokens are the padded latent's ``patch×patch`` patches, :func:`.patch_grid.patch_fit`; 0: a UNet layer's
        grid).

        Raises:
            CXRInputError: a set's target covers no cell (:func:`require_cells`; for a batch the message says
                which image).
        """
        key = (grid, latent, patch)
        fit = patch_fit(latent, patch) if patch else None
        if key not in self._cells:
            sets = mask_sets(self.target)
            rows = []
            for i, target in enumerate(sets):
                # a plain tensor even when first asked under inference mode: the energy's autograd pass saves it
                with torch.inference_mode(False):
                    cells = coverage(target, target.names, grid[0], grid[1], latent=latent, fit=fit).clone()
                try:
                    require_cells(cells, grid, node)
                except CXRInputError as err:
                    if len(sets) > 1:
                        err = CXRInputError(f"image {i + 1} of the batch: {err.problem}", node=err.node,
                                            input_name=err.input_name, fix=err.fix)
                    raise err from None
                rows.append(cells)
            with torch.inference_mode(False):  # (see above)
                self._cells[key] = torch.stack(rows)
        return self._cells[key]

    def check_batch(self, images: int, node: str = "") -> None:
        """Refuse a batch whose target holds another number of mask sets than it has images."""
        check_mask_count(self.target, images, node=node)

    def energy(self, maps: Sequence[torch.Tensor], batch: int, latent: Grid, node: str = "",
               patch: int = 0) -> torch.Tensor:
        """``[batch]`` energies of the energy layers' pathology maps (``[k·batch, h, w]`` each, for ``k`` chunks of
        the prompt), averaged over the layers and the chunks; each image's map against its own target (``patch``:
        as for :meth:`cells`).

        Raises:
            RuntimeError: no map (the energy layers did not run).
        """
        if not maps:
            raise RuntimeError("no pathology attention map was produced")
        m = torch.stack(list(maps)).mean(0)
        m = m.reshape(-1, batch, *m.shape[-2:]).mean(0)  # several cond chunks: average them
        c = self.config
        grid = (int(m.shape[-2]), int(m.shape[-1]))
        self.check_batch(batch, node)
        return concentration_energy(m, self.cells(grid, latent, node, patch).to(m.device),
                                    smoothing=c.smoothing, extent_weight=c.extent_weight,
                                    extent_threshold=c.extent_threshold, extent_sharpness=c.extent_sharpness)


@dataclass(frozen=True)
class RefineWindow:
    """The sampling steps a refinement acts on, and its early-stop energies by sigma."""

    steps: tuple[int, ...]
    sigma_start: float
    sigma_end: float
    stops: tuple[tuple[float, float], ...] = ()  # (sigma, energy), in the thresholds' order (sigma descending)

    def stop_at(self, sigma: float) -> float | None:
        """The stop energy in force at ``sigma``: the threshold of the latest percent already reached."""
        return next((e for s, e in reversed(self.stops) if sigma <= s), None)


def refine_window(config: RefineConfig, percent_to_sigma: Callable[[float], float],
                  sigmas: Sequence[float]) -> RefineWindow:
    """The steps ``i`` (of the schedule ``sigmas``, last one excluded) whose sigma lies in the config's window of
    percents, converted by the model's ``percent_to_sigma``."""
    hi, lo = float(percent_to_sigma(config.start_percent)), float(percent_to_sigma(config.end_percent))
    steps = tuple(i for i in range(len(sigmas) - 1) if lo <= float(sigmas[i]) <= hi)
    stops = tuple((float(percent_to_sigma(p)), e) for p, e in config.thresholds)
    return RefineWindow(steps, hi, lo, stops)


def _pass(energy: Energy, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``energy(x)`` and, with ``grad``, ``∂E/∂x`` (may be None: unused), on a plain copy of ``x``."""
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        xg = x.detach().clone().requires_grad_(grad)
        e = energy(xg)
        if not grad:
            return e.detach(), None
        (g,) = torch.autograd.grad(e.sum(), xg, allow_unused=True)
        return e.detach(), g


def _evaluate(energy: Energy, x: torch.Tensor, grad: bool, node: str,
              model_input: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``energy(x)`` (``[B]``, detached) and, with ``grad``, ``∂E/∂x``.

    Hosts sample under ``torch.inference_mode()``: the pass runs with it off, on a plain copy of ``x``. Out of
    memory in the pass is the user's to fix (settings that need less), so it becomes a :class:`CXRInputError`
    raised once the pass's tensors are freed: the frames of the failed pass (its activations, its graph) are
    cleared and, on CUDA, the allocator's cache emptied, so the next run starts as a clean one would.
    """
    out_of_memory = None
    try:
        e, g = _pass(energy, x, grad)
    except torch.OutOfMemoryError as err:  # before RuntimeError, its base class
        traceback.clear_frames(err.__traceback__)  # the failed pass's frames hold its activations and graph
        out_of_memory = str(err).splitlines()[0] if str(err) else type(err).__name__
    except RuntimeError as err:  # (CXRInputError is a ValueError: it passes through)
        raise CXRInputError(f"the model cannot be differentiated for refinement ({err}).", node=node,
                            input_name=model_input, fix="Use a float16/32 checkpoint without patches that keep "
                            "inference tensors, or set iterations to 0.") from None
    if out_of_memory is not None:  # raised outside the handler: the error keeps no reference to the failed pass
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
        raise CXRInputError(
            f"the refinement's {'gradient' if grad else 'energy'} pass ran out of memory on {x.device} "
            f"({out_of_memory}).", node=node, input_name="grid_factor",
            fix="Lower the memory one pass needs: a smaller grid_factor (the pass stops at a shallower encoder "
            "layer: fewer weight copies and saved activations), a smaller image or batch; fewer iterations or a "
            "narrower window (start_percent/end_percent) only shorten the run, and iterations 0 turns the "
            "gradient pass off.")
    if grad and (g is None or not torch.isfinite(g).all()):  # e.g. maps that do not depend on the latent
        raise CXRInputError("the energy has no usable gradient with respect to the latent.", node=node,
                            input_name=model_input, fix="Use a float16/32 SD-family UNet checkpoint, or set "
                            "iterations to 0.")
    return e, None if g is None else g.detach()


def refine_step(energy: Energy, x: torch.Tensor, sigma: float, config: RefineConfig, *, step: int,
                stop: float | None = None, edit_mask: torch.Tensor | None = None,
                progress: Callable[[int], None] | None = None, node: str = "",
                model_input: str = "model") -> tuple[torch.Tensor, RefineStep]:
    """One sampling step's refinement: ``config.iterations`` gradient steps (:func:`refinement_step`) down
    ``energy``, each image of the batch stopping early once its energy is at or below ``stop``, and the energy
    after the last step (the record holds the batch's mean).

    Args:
        energy: the host's energy (:data:`Energy`).
        x: the latent the sampler carries at ``sigma``.
        step: the sampling step's index (for the record).
        edit_mask: where the sampler may change the latent (1; soft values allowed), broadcastable to ``x``; the
            step moves only there, by ``step_size·σ`` RMS over it (:func:`refinement_step`; None = all).
        progress: called with the number of iterations done or skipped (a progress bar's update).
        node, model_input: where errors point (the node's title; its model input's name).

    Returns:
        The refined latent (``x``'s dtype) and the step's record.

    Raises:
        CXRInputError: the energy cannot be differentiated, or has no finite gradient.
    """
    x_before = x
    energies: list[float] = []
    done, current = 0, False  # current: energies[-1] was measured at this x
    for _ in range(config.iterations):
        e, grad = _evaluate(energy, x, True, node, model_input)
        assert grad is not None
        energies.append(float(e.mean()))
        # Each image stops at its own threshold: an image of a batch stops where it would alone, and moves no
        # further (a zero gradient leaves its latent bit for bit) while the others go on.
        moving = None if stop is None else e > stop
        if moving is not None and not bool(moving.any()):
            current = True
            break
        if moving is not None and not bool(moving.all()):
            grad = grad * moving.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1)))
        # the step follows the gradient whatever the energy does next: no search, nothing discarded
        x = refinement_step(x, grad, sigma, config.step_size, edit_mask)
        done += 1
        if progress is not None:
            progress(1)
    if progress is not None and done < config.iterations:
        progress(config.iterations - done)
    if not current:  # the energy after the last step (or, at 0 iterations, of the unrefined latent)
        energies.append(float(_evaluate(energy, x, False, node, model_input)[0].mean()))
    logger.debug("CXR refinement step %d (sigma %.3f): energy %.4f → %.4f", step, sigma, energies[0], energies[-1])
    return x, RefineStep(step, sigma, tuple(energies), done, x_before.detach().cpu(), x.detach().cpu())
