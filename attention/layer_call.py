"""What one regulated attention layer does at one call, for any host (pure torch, no host import).

Both hosts (``hosts.comfy.patch``: ComfyUI replace patches; ``hosts.diffusers.processors``: diffusers attention
processors) call these functions, so the two hosts pick the same stages, the same batch rows, the same
biases and record the same captures:

- :func:`active_stages`: the stages acting at this layer and sigma;
- :func:`self_gate`: the gate that confines self-attention (the first active stage whose ``self_gate`` hook
  answers one);
- :func:`cross_bias` / :func:`wanted_captures`: the summed ``[N, T]`` cross-attention bias and the captures
  (the stages' ``cross_bias`` and ``capture_at`` hooks);
- :func:`regulated_rows`: the batch rows to regulate (the positive prompt's, and the negative's for a gate
  with ``apply_to_uncond``);
- :func:`record_capture`: per-word maps and the in-target share of one layer into the run's record;
- :func:`probe_map` / :func:`pathology_maps`: one layer's map of the refinement energy;
- :func:`layer_grid`: a layer's exact token grid from the latent and the token count (hosts that do not
  hand over the layer's activation shape, as diffusers does not);
- :func:`per_sample` / :func:`check_images`: whether the active stages hold one mask set per image, and that
  they match the call's images.

Region hooks take a :class:`.field.Field` (full latent, area of the rows' conditioning, image of the batch);
a host groups its regulated rows by field (:func:`.field.group_rows`) and calls these once per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .boosting import token_probabilities
from .field import Field, group_rows
from .refinement import grid_at
from .run_state import RunState
from .stages import CaptureStage, GateStage, Grid, Key, Stage

COND, UNCOND = 0, 1


def active_stages(stages: Sequence[Stage], key: Key, sigma: float) -> list[Stage]:
    """The stages whose sigma window holds ``sigma``, whose UNet parts include ``key`` and that can change
    something (a neutral stage is never active, so the host runs the layer's original path)."""
    return [s for s in stages if s.active(sigma) and s.covers(key) and not s.neutral]


def self_gate(active: Sequence[Stage]) -> GateStage | None:
    """The gate that confines self-attention at this call (None: stock self-attention)."""
    return next((g for g in (s.self_gate() for s in active) if g is not None), None)


def cross_bias(active: Sequence[Stage], h: int, w: int, field: Field, context_len: int,
               device: torch.device) -> torch.Tensor | None:
    """The sum of the active stages' ``[N, T]`` cross-attention biases for rows of ``field`` (None: no stage
    biases them)."""
    biases = [b for b in (s.cross_bias(h, w, field, context_len, device) for s in active) if b is not None]
    return torch.stack(biases).sum(0) if biases else None


def wanted_captures(active: Sequence[Stage], h: int, w: int, field: Field) -> list[CaptureStage]:
    """The active capture stages that record this layer's grid for rows of ``field``."""
    return [c for c in (s.capture_at(h, w, field) for s in active) if c is not None]


def per_sample(active: Sequence[Stage]) -> bool:
    """True when an active stage holds one mask set per image: rows then take their image's field."""
    return any(s.mask_count > 1 for s in active)


def check_images(active: Sequence[Stage], images: int) -> None:
    """Refuse a call whose images per chunk do not match an active stage's mask sets (a host that knows the
    batch before sampling refuses it there already: this guards every call).

    Raises:
        CXRInputError: naming the stage's node and its masks input.
    """
    for s in active:
        s.check_batch(images)


def regulated_rows(cond_or_uncond: Sequence[int], batch: int, include_uncond: bool) -> torch.Tensor | None:
    """Batch rows to regulate (None = all rows). Each entry of ``cond_or_uncond`` is one chunk of equal size,
    in batch order (``COND`` = 0 the positive prompt, ``UNCOND`` = 1 the negative one)."""
    if not cond_or_uncond:
        return None
    per = batch // len(cond_or_uncond)
    chosen = [i for i, c in enumerate(cond_or_uncond) if c == COND or include_uncond]
    if len(chosen) == len(cond_or_uncond):
        return None
    return torch.tensor([c * per + r for c in chosen for r in range(per)], dtype=torch.long)


def layer_grid(tokens: int, latent: Grid) -> Grid:
    """The ``h×w`` grid of a layer with ``tokens`` image tokens in a UNet run on a ``latent``-sized input.

    A UNet halves its grid with stride-2 convolutions that round up (padding 1), so the grids of a latent
    are ``grid_at(latent, level)`` for level 0, 1, 2, ...; their token counts strictly fall until 1×1, so
    the count names the level exactly (never a square root: odd and non-square latents included).

    Raises:
        ValueError: no level of this latent has ``tokens`` tokens (the latent given is not this call's).
    """
    level = 0
    while True:
        h, w = grid_at(latent, level)
        if h * w == tokens:
            return h, w
        if h * w < tokens or (h, w) == (1, 1):
            raise ValueError(f"{tokens} image tokens match no grid of a {latent[0]}×{latent[1]} latent")
        level += 1


def record_capture(cap: CaptureStage, groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Field]],
                   h: int, w: int, sigma: float, state: RunState) -> None:
    """Record one layer's per-word maps (mean over batch rows and heads) and the pathology words' share of
    attention inside the capture's target into ``state``.

    Args:
        groups: per group of rows that share a field: their queries and keys in the heads layout
            ``[B, H, N, D]`` / ``[B, H, T, D]``, the ``[N, T]`` bias they attend with (so the maps are the ones
            the model really uses) and their field (its image's target). One group: the maps and share of its
            rows; several: their means weighted by rows (the share of each image in its own target).
    """
    parts = [(qh.shape[0], *_capture_maps(cap, qh, kh, bias, h, w, field)) for qh, kh, bias, field in groups]
    if len(parts) == 1:
        _, maps, share = parts[0]
    else:
        total = sum(n for n, _, _ in parts)
        maps = {wd: torch.stack([n * m[wd] for n, m, _ in parts]).sum(0) / total for wd in parts[0][1]}
        shares = [(n, s) for n, _, s in parts if s is not None]
        share = sum(n * s for n, s in shares) / sum(n for n, _ in shares) if shares else None
    state.capture(cap.label, (h, w), sigma, maps, share)


def _capture_maps(cap: CaptureStage, qh: torch.Tensor, kh: torch.Tensor, bias: torch.Tensor | None, h: int, w: int,
                  field: Field) -> tuple[dict[str, torch.Tensor], float | None]:
    cols = cap.columns(kh.shape[2])
    order = list(cols)
    probs = token_probabilities(qh, kh, bias, torch.cat([cols[wd] for wd in order]).to(qh.device))
    probs = probs.mean(dim=(0, 1))  # over batch and heads: [N, columns]
    maps, start = {}, 0
    for word in order:
        n = cols[word].numel()
        maps[word] = probs[:, start : start + n].sum(-1).reshape(h, w).cpu()
        start += n
    share = None
    inside = cap.target_tokens(h, w, field, qh.device)
    if inside is not None and inside.any() and cap.pathology:
        path = sum(maps[wd] for wd in cap.pathology if wd in maps).reshape(-1)
        share = float(path[inside.cpu()].sum() / path.sum().clamp_min(1e-12))
    return maps, share


def pathology_maps(qh: torch.Tensor, kh: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor, h: int,
                   w: int) -> torch.Tensor:
    """``[B, h, w]``: each row's attention on ``columns`` (summed), averaged over heads: the refinement
    energy's map of one layer (differentiable in ``qh``)."""
    probs = token_probabilities(qh, kh, bias, columns.to(qh.device))
    return probs.sum(-1).mean(1).reshape(-1, h, w)


def probe_map(stages: Sequence[Stage], key: Key, sigma: float, qh: torch.Tensor, kh: torch.Tensor, h: int, w: int,
              fields: Sequence[Field], columns: torch.Tensor) -> torch.Tensor:
    """:func:`pathology_maps` of a layer that attends with the biases of ``stages`` active at ``key`` and ``sigma``
    (the maps the regulated model really uses), ``fields`` holding each row's field.

    Raises:
        CXRInputError: an active stage's mask sets do not match the images.
    """
    active = active_stages(stages, key, sigma)
    groups = group_rows(range(qh.shape[0]), fields)
    if len(groups) == 1:  # every row shares one field: the one bias, as for a single image
        bias = cross_bias(active, h, w, groups[0][0], kh.shape[2], qh.device)
        return pathology_maps(qh, kh, bias, columns, h, w)
    # float32 as the one-field path's maps (token_probabilities): the energy and its gradient stay in float32 for a
    # half-precision model
    out = torch.empty(qh.shape[0], h, w, dtype=torch.float32, device=qh.device)
    for field, rows in groups:
        r = torch.tensor(rows, dtype=torch.long, device=qh.device)
        bias = cross_bias(active, h, w, field, kh.shape[2], qh.device)
        out = out.index_copy(0, r, pathology_maps(qh.index_select(0, r), kh.index_select(0, r), bias, columns, h, w)
                             .to(out.dtype))
    return out
