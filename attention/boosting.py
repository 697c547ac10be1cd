"""Pathology-guided boosting of cross-attention, and the maps and shares that show it.

Boosting multiplies the attention weight of chosen pathology tokens by ``f`` for image tokens inside the
target region and by ``d`` (damping, ≤ 1) outside it, then renormalises (an additive ``log f`` /
``log d`` bias on those token columns before the softmax). For a query whose pathology tokens held a
share ``P`` of its attention, the share becomes::

    P' = f·P / (f·P + 1 − P)          (inside the target; d in place of f outside)

so ``f = 1`` changes nothing, and the share grows monotonically with ``f`` without ever reaching 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .tokens import token_columns


def boosted_share(share: torch.Tensor | float, factor: float) -> torch.Tensor | float:
    """The pathology share after boosting by ``factor`` (the formula in the module docstring)."""
    return factor * share / (factor * share + 1 - share)


def pathology_boost_bias(
    inside: torch.Tensor,
    positions: Mapping[str, Sequence[int]],
    factors: Mapping[str, float],
    cond_len: int,
    context_len: int,
    damping: float = 1.0,
) -> torch.Tensor:
    """Additive ``[N, T]`` bias that boosts pathology tokens inside the target and damps them outside.

    Args:
        inside: ``[N]`` bool, image tokens inside the target region.
        positions: pathology word → its context indices (in a prompt of length ``cond_len``).
        factors: word → boost factor ``f`` (≥ 1 strengthens; 1 = no change).
        cond_len: the prompt's conditioning length; index ``i`` also sits at ``i + cond_len·j`` when the
            host repeats the context up to ``context_len``.
        context_len: key length seen by the attention.
        damping: multiplier ``d ∈ [0, 1]`` for the same tokens outside the target (1 = leave them).
    """
    if context_len % cond_len:
        raise ValueError(f"context length {context_len} is not a multiple of the prompt's length {cond_len}")
    if not 0.0 <= damping <= 1.0:
        raise ValueError(f"damping must be in [0, 1], got {damping}")
    bias = torch.zeros(inside.shape[0], context_len)
    off = -math.inf if damping == 0.0 else math.log(damping)
    for word, idx in positions.items():
        f = factors.get(word, 1.0)
        if f <= 0:
            raise ValueError(f"boost factor for '{word}' must be positive, got {f}")
        cols = token_columns(idx, cond_len, context_len)
        bias[inside.nonzero().flatten()[:, None], cols[None, :]] = math.log(f)
        bias[(~inside).nonzero().flatten()[:, None], cols[None, :]] = off
    return bias


def token_probabilities(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor):
    """Attention probabilities of some key columns, ``[B, H, N, len(columns)]`` (float32).

    Cross-attention has few keys (77 per prompt chunk), so the full ``N × T`` scores are cheap: this is
    how capture reads the maps without a second attention pass.
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.device)
    return torch.softmax(scores, dim=-1)[..., columns]
