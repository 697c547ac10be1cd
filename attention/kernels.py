"""Attention kernels the gating core composes: plain SDPA, SDPA with its log-sum-exp, and layout helpers.

The core works in the *heads layout* ``[B, H, N, D]``. Hosts hand over the *flat layout* ``[B, N, H·D]``
(ComfyUI's replace patches, diffusers' processors); :func:`to_heads` / :func:`to_flat` convert.

A kernel is ``kernel(q, k, v) -> out`` in the heads layout. An LSE kernel also returns the log-sum-exp of
each query's scores, ``[B, H, N]``: soft gating combines two mask-free passes exactly with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H·D]`` → ``[B, H, N, D]`` (a view when possible)."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def to_flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` → ``[B, N, H·D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stock attention: torch's fused scaled-dot-product attention, no mask."""
    return F.scaled_dot_product_attention(q, k, v)


def _lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 1024):
    """Exact attention + log-sum-exp in query chunks (memory ``chunk × N``): the portable fallback."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for s in range(0, q.shape[-2], chunk):
        scores = (q[..., s : s + chunk, :].float() @ k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append((torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and each query's log-sum-exp (float32), from torch's fused kernels where they expose it.

    CPU: the flash kernel for CPU returns it. CUDA: the memory-efficient kernel (any float dtype) does,
    padded to a multiple of 32 queries. Anything else (or a kernel that refuses the inputs) takes the
    exact chunked fallback.
    """
    n = q.shape[-2]
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
            return out, lse.float()
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out, lse[..., :n].float()
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        pass
    return _lse_reference(q, k, v)


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets, from each set's output and log-sum-exp (exact).

    A key set's weight ``w`` enters as ``log w`` added to its log-sum-exp (``-inf``: the set is ignored).
    Returns the float32 output ``(Z_a·out_a + Z_b·out_b) / (Z_a + Z_b)`` and the union's log-sum-exp.
    """
    w_b = torch.sigmoid(lse_b - lse_a)[..., None]  # Z_b / (Z_a + Z_b), computed stably
    return torch.lerp(out_a.float(), out_b.float(), w_b), torch.logaddexp(lse_a, lse_b)


def biased_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an additive ``[N, M]`` bias and each query's log-sum-exp (float32).

    torch's fused kernels take the bias where they expose the log-sum-exp (CPU: the flash kernel for CPU; CUDA: the
    memory-efficient kernel), the bias in q's dtype, as SDPA takes a mask. A query whose keys are all blocked must
    get a zero output and a log-sum-exp of ``-inf`` (so :func:`merge_by_lse` gives its other key set all the
    weight), which fused kernels do not promise: such a bias, or a kernel that refuses the inputs, takes explicit
    float32 scores (``N × M``: meant for few keys, a prompt's tokens). ``-inf`` entries get weight exactly 0 on
    every path (``exp(-inf)``).
    """
    n = q.shape[-2]
    if not torch.isneginf(bias).all(dim=-1).any():
        mask = bias.to(q.device, q.dtype)[None, None]
        try:
            if q.device.type == "cpu":
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                                     attn_mask=mask)
                return out, lse.float()
            if q.device.type == "cuda":
                full = mask.expand(q.shape[0], q.shape[1], -1, -1)
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, full, True)[:2]
                return out, lse[..., :n].float()
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            pass
    return _biased_reference(q, k, v, bias)


def _biased_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`biased_with_lse` from explicit float32 scores (all-blocked rows: zero output, ``-inf``)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias.to(q.device, torch.float32)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # all-blocked rows: -inf - -inf = NaN → 0
    return probs @ v.float(), lse


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention with an additive float bias ``[..., N, M]`` (``-inf`` = blocked): the dense reference."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
