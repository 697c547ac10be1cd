"""Anatomy-aware attention gating: organ-confined self-attention and anatomy-token cross-attention.

All functions take the heads layout ``[B, H, N, D]`` (see :mod:`.kernels`) and return it.

Self-attention with leak ``λ ∈ [0, 1]``: a query in region ``r`` weighs keys of other regions by ``λ``::

    p_ij ∝ exp(s_ij) · (1 if region(i) = region(j) else λ)

``λ = 1`` is stock attention; ``λ = 0`` (hard) confines each query to its own region. Hard gating runs
one mask-free attention per region on tokens sorted by region, so its cost follows Σ nᵣ² and no N×N mask
exists. Soft gating composes exactly from two mask-free passes per region, over its own keys and over the
other regions' keys, with their log-sum-exps ``L_in``, ``L_out``::

    out = (exp(L_in)·out_in + λ·exp(L_out)·out_out) / (exp(L_in) + λ·exp(L_out))

so its work is Σ nᵣ·N = N², the same as stock attention, cut into pieces (no N×N mask either).

Background policy: ``"confined"`` treats background as one more region; ``"free"`` lets background
queries see every key (stock attention for them).

Anatomy-token cross-attention: each anatomy token is tied to an organ; queries outside that organ see the
token's weight scaled by ``λ_tok`` (0 = not at all), renormalised by the softmax (an additive ``log λ``
bias on a ``N × T`` score matrix: T is the prompt length, so this mask is small).

Prompt isolation (``anatomy_isolation="prompt"``): CLIP's text encoder is causal, so a hidden word has already been
mixed into every later token (later words, end, padding), which outside queries still see: measured on the test
models, masking leaves ≈ 97 % of the word's effect on outside queries (``benchmarks/anatomy_leakage.py``). With
prompt isolation a query outside the organs of the anatomy words ``S`` attends instead over the prompt encoded
without the words of ``S`` (:class:`PromptIsolation`): nothing of those words reaches it, by construction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .kernels import Kernel, LseKernel, masked_reference, merge_by_lse, sdpa, sdpa_with_lse
from .regions import RegionPartition
from .tokens import TokenMap, token_columns

#: The background policies, in the order the gate node lists them (saved workflows store the value).
BACKGROUNDS = ("free", "confined")
#: How anatomy words are kept from queries outside their organ (the gate node's ``anatomy_isolation``, in order):
#: "tokens" hides the words' own tokens; "prompt" attends over the prompt encoded without them.
ISOLATIONS = ("tokens", "prompt")
#: Prompt isolation encodes the prompt once per non-empty subset of anatomy words (2^M − 1 encodes).
ISOLATION_MAX_WORDS = 4
#: Tokens per prompt chunk (start, 75 text tokens, end/padding).
CHUNK = 77


def _check_leak(leak: float) -> None:
    if not 0.0 <= leak <= 1.0:
        raise ValueError(f"leak must be in [0, 1], got {leak}")


def _check_gate(q: torch.Tensor, k: torch.Tensor, part: RegionPartition, leak: float, background: str) -> None:
    _check_leak(leak)
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    n = q.shape[2]
    if n != part.height * part.width or k.shape[2] != n:
        raise ValueError(f"self-attention over {n} tokens does not match the {part.height}×{part.width} grid")


def _grouped(q, k, v, part: RegionPartition, background: str, kernel) -> torch.Tensor:
    """Hard gating: one attention per region over tokens sorted by region; returns the sorted outputs."""
    return torch.cat([out for out, _ in _hard_parts(q, k, v, part, background, kernel, None)], dim=2)


def _hard_parts(q, k, v, part: RegionPartition, background: str, kernel, lse_kernel):
    """Per region (sorted order): ``(out, lse)`` of its queries under hard gating; with ``lse_kernel`` None the
    mask-free ``kernel`` runs and ``lse`` is None."""
    perm = part.perm
    qs, ks, vs = q.index_select(2, perm), k.index_select(2, perm), v.index_select(2, perm)
    for label, s, e in part.slices:
        if label == 0 and background == "free":
            kk, vv = k, v  # background queries see every key
        else:
            kk, vv = ks[:, :, s:e], vs[:, :, s:e]
        if lse_kernel is None:
            yield kernel(qs[:, :, s:e], kk, vv), None
        else:
            yield lse_kernel(qs[:, :, s:e], kk, vv)


def gated_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    part: RegionPartition,
    leak: float = 0.0,
    background: str = "confined",
    kernel: Kernel = sdpa,
    lse_kernel: LseKernel = sdpa_with_lse,
) -> torch.Tensor:
    """Self-attention where cross-region key weights are scaled by ``leak``.

    Args:
        q, k, v: ``[B, H, N, D]`` with ``N = part.height · part.width`` (row-major tokens).
        part: the token grid's regions (:func:`.regions.partition`).
        leak: ``λ``; 0 = hard confinement, 1 = stock attention.
        background: ``"confined"`` or ``"free"`` (see the module docstring).
        kernel: mask-free attention used by hard gating (any backend: no LSE needed).
        lse_kernel: mask-free attention returning the log-sum-exp, used by soft gating.

    Returns:
        ``[B, H, N, D]`` in q's dtype.
    """
    _check_gate(q, k, part, leak, background)
    if leak == 1.0:
        return kernel(q, k, v)
    if leak == 0.0:
        return _grouped(q, k, v, part, background, kernel).index_select(2, part.inv)
    return _soft_grouped(q, k, v, part, leak, background, kernel, lse_kernel).index_select(2, part.inv)


def _soft_grouped(q, k, v, part: RegionPartition, leak: float, background: str, kernel, lse_kernel) -> torch.Tensor:
    """Soft gating per region on sorted tokens: own keys and the other keys in two passes, merged by their LSEs.

    (An earlier form ran the full attention plus the in-region one: N² + Σ nᵣ² work, 1.33–1.65× stock.)
    """
    parts = _soft_parts(q, k, v, part, leak, background, kernel, lse_kernel, want_lse=False)
    return torch.cat([out for out, _ in parts], dim=2)


def _soft_parts(q, k, v, part: RegionPartition, leak: float, background: str, kernel, lse_kernel, want_lse: bool):
    """Per region (sorted order): ``(out, lse)`` of its queries under soft gating. ``lse`` is the log of the
    gated softmax's normaliser, so a caller can merge more keys into the same softmax
    (:func:`gated_self_attention_lse`); free background queries run ``kernel`` over every key and have no
    ``lse`` (None) unless ``want_lse``."""
    perm, n = part.perm, q.shape[2]
    # Keys sorted by region, twice over: the other regions' keys of region [s, e) are then the one contiguous
    # slice [e, s + n), a view, instead of a copy per region.
    twice = torch.cat((perm, perm))
    qs, ks, vs = q.index_select(2, perm), k.index_select(2, twice), v.index_select(2, twice)
    log_leak = math.log(leak)
    for label, s, e in part.slices:
        qr = qs[:, :, s:e]
        if label == 0 and background == "free":
            # background queries see every key at full weight
            yield lse_kernel(qr, k, v) if want_lse else (kernel(qr, k, v), None)
            continue
        out_in, lse_in = lse_kernel(qr, ks[:, :, s:e], vs[:, :, s:e])
        if s == 0 and e == n:  # a single region: nothing to leak from
            yield out_in, lse_in
            continue
        out_out, lse_out = lse_kernel(qr, ks[:, :, e:s + n], vs[:, :, e:s + n])
        # Softmax over the two parts with weights 1 and λ, computed stably from the log-sum-exps.
        out, lse = merge_by_lse(out_in, lse_in, out_out, lse_out + log_leak)
        yield out.to(q.dtype), lse


def gated_self_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    part: RegionPartition,
    leak: float = 0.0,
    background: str = "confined",
    lse_kernel: LseKernel = sdpa_with_lse,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gated_self_attention` and each query's log-sum-exp over the keys it sees (``log Σ_j g_ij·exp(s_ij)``,
    ``g`` the gate's weights): a joint text+image call merges its text keys into the same softmax with it.

    Returns:
        ``[B, H, N, D]`` in q's dtype and ``[B, H, N]`` float32, in the original token order.
    """
    _check_gate(q, k, part, leak, background)
    if leak == 1.0:
        return lse_kernel(q, k, v)
    if leak == 0.0:
        parts = list(_hard_parts(q, k, v, part, background, None, lse_kernel))
    else:
        parts = list(_soft_parts(q, k, v, part, leak, background, None, lse_kernel, want_lse=True))
    out = torch.cat([o for o, _ in parts], dim=2).index_select(2, part.inv)
    lse = torch.cat([m for _, m in parts], dim=2).index_select(2, part.inv)
    return out, lse


def self_attention_bias(part: RegionPartition, leak: float, background: str = "confined") -> torch.Tensor:
    """The dense ``[N, N]`` additive bias equivalent to :func:`gated_self_attention` (reference, fallback).

    Memory is N² floats (1 GiB at 16384 tokens): use it only for tests and for attention backends that
    give no log-sum-exp.
    """
    _check_leak(leak)
    labels = part.labels
    same = labels[:, None] == labels[None, :]
    off = -math.inf if leak == 0.0 else math.log(leak)
    bias = torch.where(same, 0.0, off)
    if background == "free":
        bias[labels == 0] = 0.0
    return bias


def gated_self_attention_dense(q, k, v, part: RegionPartition, leak: float, background: str = "confined"):
    """Reference implementation with a dense float mask (tests, and the documented fallback)."""
    return masked_reference(q, k, v, self_attention_bias(part, leak, background).to(q.device))


def anatomy_token_bias(
    inside: torch.Tensor,
    positions: Sequence[Sequence[int]],
    cond_len: int,
    context_len: int,
    leak: float,
) -> torch.Tensor:
    """Additive ``[N, T]`` bias that hides anatomy tokens from queries outside their organ.

    Args:
        inside: ``[M, N]`` bool, for each anatomy word ``m`` the tokens inside its organ(s).
        positions: for each word, its token indices in the conditioning (length ``cond_len``).
        cond_len: the conditioning's own length (77 per prompt chunk).
        context_len: the key length seen by attention: the host may repeat a context up to the least
            common multiple of the positive and negative lengths, so index ``i`` also sits at
            ``i + cond_len·j``.
        leak: ``λ_tok``: 0 hides the token, 1 leaves attention unchanged.
    """
    _check_leak(leak)
    n = inside.shape[1]
    bias = torch.zeros(n, context_len)
    if leak == 1.0:
        return bias
    if context_len % cond_len:
        raise ValueError(f"context length {context_len} is not a multiple of the prompt's length {cond_len}")
    off = -math.inf if leak == 0.0 else math.log(leak)
    for word_inside, word_positions in zip(inside, positions, strict=True):
        cols = token_columns(word_positions, cond_len, context_len)
        outside_rows = (~word_inside).nonzero().flatten()
        if cols.numel() and outside_rows.numel():
            bias[outside_rows[:, None], cols[None, :]] = off
    return bias


def token_masked_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Cross-attention with the anatomy-token bias (``[N, T]``) added to the scores, then softmax.

    Rows never lose all their keys: only anatomy tokens are hidden, the start token always remains.
    """
    return masked_reference(q, k, v, bias.to(q.device))


@dataclass(frozen=True)
class PromptTokenMap(TokenMap):
    """A :class:`.tokens.TokenMap` that can also encode its prompt with some tokens removed (CXR Text Encode's):
    ``encode_without(positions)`` → ``[1, cond_len, C]``, the positions removed within their 77-token chunk and
    the chunk padded back at its end, as the tokenizer pads."""

    encode_without: Callable[[tuple[int, ...]], torch.Tensor] | None = field(default=None, compare=False, repr=False)


def removal_columns(removed: Sequence[int], cond_len: int) -> torch.Tensor:
    """``[cond_len]``: for each column of the prompt encoded without the ``removed`` positions (removed within their
    chunk, the chunk padded back at its end), the column of the full prompt holding the same token (a new padding
    column: the chunk's last column). Other stages' biases (a boost on 'effusion') follow their word this way."""
    gone = set(removed)
    cols: list[int] = []
    for start in range(0, cond_len, CHUNK):
        kept = [p for p in range(start, start + CHUNK) if p not in gone]
        cols.extend(kept + [start + CHUNK - 1] * (CHUNK - len(kept)))
    return torch.tensor(cols, dtype=torch.long)


@dataclass(frozen=True, eq=False)
class PromptIsolation:
    """What prompt isolation needs: per non-empty subset of anatomy words (indices into the gate's words), the
    prompt encoded without them and its :func:`removal_columns`; and the host's projection of a context by one
    layer's ``to_k``/``to_v`` (``project(key, context, like)`` → ``(k, v)``, flat layout, ``like``'s dtype, device)."""

    contexts: Mapping[frozenset[int], torch.Tensor]
    columns: Mapping[frozenset[int], torch.Tensor]
    project: Callable[[tuple, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def build(words: Sequence[Sequence[int]], cond_len: int, encode_without: Callable[[tuple[int, ...]], torch.Tensor],
              project: Callable) -> PromptIsolation:
        """Encode the prompt without every non-empty subset of ``words`` (each word's positions)."""
        contexts, columns = {}, {}
        for size in range(1, len(words) + 1):
            for subset in itertools.combinations(range(len(words)), size):
                removed = tuple(sorted({p for i in subset for p in words[i]}))
                contexts[frozenset(subset)] = encode_without(removed).detach().cpu()
                columns[frozenset(subset)] = removal_columns(removed, cond_len)
        return PromptIsolation(contexts, columns, project)


def isolation_groups(inside: torch.Tensor) -> list[tuple[frozenset[int], torch.Tensor]]:
    """``inside``: ``[M, N]`` bool, each anatomy word's organ coverage. Returns, for each non-empty set ``S`` of words
    some query is outside of, ``(S, the query indices outside exactly the words of S)``."""
    groups: dict[frozenset[int], list[int]] = {}
    for n, column in enumerate((~inside).t().tolist()):
        subset = frozenset(i for i, out in enumerate(column) if out)
        if subset:
            groups.setdefault(subset, []).append(n)
    return [(s, torch.tensor(rows, dtype=torch.long)) for s, rows in sorted(groups.items(), key=lambda g: g[1][0])]


def isolated_cross_attention(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, bias: torch.Tensor | None):
    """Queries ``[B, H, n, D]`` over one isolated context's keys/values (``bias`` ``[n, T]``: other stages' bias,
    remapped by :func:`removal_columns`; None = plain attention)."""
    return sdpa(qh, kh, vh) if bias is None else masked_reference(qh, kh, vh, bias.to(qh.device))
