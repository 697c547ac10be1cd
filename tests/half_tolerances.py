"""Half precision in the tests (tests/test_half_precision_*.py): the dtypes, and how far a result computed in a half
dtype may lie from float32 (:func:`rounding_tol` for one attention call, :func:`network_tol` for a quantity read from a
whole UNet), each bound derived from the dtype's machine epsilon.
"""

from __future__ import annotations

import math

import torch

DTYPES = (torch.float16, torch.bfloat16)
# A margin of 2 over each bound below: the bounds are first order (products of two rounding errors are dropped).
MARGIN = 2.0


def rounding_tol(dtype: torch.dtype, scale: float, roundings: int, bias: float = 0.0) -> float:
    """How far an attention output computed in ``dtype`` may lie from float32 on the same (rounded) inputs.

    An attention output is a convex combination of value rows, so every error is relative to ``scale = max|v|``.
    Each rounding to ``dtype`` (round to nearest) moves a value by at most ``eps/2`` of it: the kernels keep scores,
    maxima and sums in float32 (products of two half numbers are exact in float32) and round the probabilities
    before ``P·V`` and the output once each (2 roundings per pass); soft gating merges two such passes (a convex
    combination: at most the larger of their errors) and rounds the merge (3). An additive bias ``b`` rounded to
    ``dtype`` shifts a score by ``|b|·eps/2``, scaling a weight by ``exp(±|b|·eps/2)``; re-normalised, that moves the
    combination by at most ``|b|·eps·scale``.
    """
    return MARGIN * (roundings / 2 + bias) * torch.finfo(dtype).eps * scale


def network_tol(dtype: torch.dtype, ops: int, confidence: float = 4.0) -> float:
    """Relative difference allowed between a quantity read from the UNet in ``dtype`` and in float32, same input.

    Each of the ``ops`` operations from the latent to a layer (at most one per weight tensor of the UNet, whose
    normalisations keep activations at unit scale) rounds once, a relative error of at most ``u = eps/2``. Rounding
    errors of independent operations add up like a random walk: ``|error| ≤ λ·sqrt(ops)·u`` with probability at least
    ``1 − 2·exp(−λ²/2)`` (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
    Comput. 41(5), 2019); ``λ = 4``: 0.9993. A share of attention (a ratio of sums of probabilities) inherits it.
    """
    return confidence * math.sqrt(ops) * torch.finfo(dtype).eps / 2


def ids(value) -> str:
    return str(value).replace("torch.", "")
