"""The attention replace ComfyUI calls for one regulated layer (:class:`CXRReplace`); it is installed on a model clone
and wrapped at sampling time by :mod:`.patch` (the overview of how the pack binds to ComfyUI is there).

Per call it reads ``extra_options`` (the layer's token grid ``activations_shape``, ``cond_or_uncond``, ``uuids``,
``sigmas``, ``n_heads``), picks the rows to regulate, groups them by their :class:`...attention.field.Field` and
calls the core once per group; everything else attends exactly as without us (:meth:`CXRReplace._stock`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.ldm.modules.attention as comfy_attention
import torch

from ...attention.field import Field, group_rows, row_fields
from ...attention.gating import gated_self_attention, self_attention_bias, token_masked_cross_attention
from ...attention.kernels import to_flat, to_heads
from ...attention.layer_call import (
    COND,
    UNCOND,
    active_stages,
    check_images,
    cross_bias,
    per_sample,
    record_capture,
    regulated_rows,
    self_gate,
    wanted_captures,
)
from ...attention.run_state import RunState
from ...attention.stages import CaptureStage, GateStage, Key, Stage
from . import attention_backend
from .cond_areas import chunk_fields
from .cond_areas import holder as _state
from .prompt_isolation import isolated, isolating_gate

logger = logging.getLogger("cxr_counterfactual")

# --------------------------------------------------------------------------------------------------
# the layer's grid and rows
def _grid(extra: dict) -> tuple[int, int]:
    """This layer's token grid ``h, w`` (from its activations, never guessed)."""
    h, w = (int(n) for n in extra["activations_shape"][-2:])
    return h, w


# --------------------------------------------------------------------------------------------------
# the replace patch
def batch_rows(extra: dict, batch: int, include_uncond: bool) -> torch.Tensor | None:
    """Batch rows to regulate (None = all): the chunks of the positive prompt (all chunks with
    ``include_uncond``), by the rule both hosts share (:func:`.layer_call.regulated_rows`).

    ``cond_or_uncond`` numbers the conditionings by their place in the call, not by what they are: SAG's
    extra pass on the negative prompt alone is labelled 0 ("cond"). So where the run knows the positive
    prompt's conditioning ids (``uuids``, one per chunk), they decide.
    """
    labels = list(extra.get("cond_or_uncond") or [])
    state = _state(extra)
    uuids = extra.get("uuids")
    call = state.call if state is not None else None
    if call is not None and call.positive is not None and all(0 <= c < len(call.positive) for c in labels):
        # ComfyUI gives the negative prompt a copy of an area-conditioned positive one (same id, same area,
        # the negative's text): the call's lists, not the ids alone, say which chunks are positive.
        labels = [COND if call.positive[c] else UNCOND for c in labels]
    elif state is not None and state.positive is not None and uuids is not None and len(uuids) == len(labels):
        labels = [COND if u in state.positive else UNCOND for u in uuids]
    return regulated_rows(labels, batch, include_uncond)


def _sub_options(extra: dict, rows: torch.Tensor | None, batch: int) -> dict:
    """extra_options for a sub-batch (a wrapped kernel may read cond_or_uncond)."""
    if rows is None:
        return extra
    cou = extra.get("cond_or_uncond") or []
    per = batch // max(1, len(cou))
    chunks = sorted({int(r) // per for r in rows})
    sub = dict(extra)
    sub["cond_or_uncond"] = [cou[c] for c in chunks]
    uuids = extra.get("uuids")
    if uuids is not None and len(uuids) == len(cou):
        sub["uuids"] = [uuids[c] for c in chunks]
    return sub


class _NotAttention(Exception):
    """Another pack's replace returned one row per key, not per query (PAG's identity): it cannot be gated."""


class CXRReplace:
    """Our attention replace for one key: runs the active stages, or stock attention outside them.

    ``inner`` is another pack's replace found at this key (or the block's 2-part key): it then serves as
    the attention kernel, so its effect and ours compose.
    """

    def __init__(self, kind: str, key: Key, stages: tuple[Stage, ...], inner: Callable | None = None):
        self.kind, self.key, self.stages, self.inner = kind, key, stages, inner

    def with_inner(self, inner: Callable | None) -> CXRReplace:
        return CXRReplace(self.kind, self.key, self.stages, inner)

    def with_stage(self, stage: Stage) -> CXRReplace:
        return CXRReplace(self.kind, self.key, (*self.stages, stage), self.inner)

    # stock path: exactly what ComfyUI would have run without us
    def _stock(self, q, k, v, extra: dict, mask: torch.Tensor | None = None):
        if self.inner is not None:
            return self.inner(q, k, v, extra)
        return comfy_attention.optimized_attention(
            q, k, v, extra["n_heads"], mask=mask, attn_precision=extra.get("attn_precision"), transformer_options=extra
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        state = _state(extra)
        if state is not None:
            state.reach(self.kind, self.key)
        sigmas = extra.get("sigmas")
        sigma = float(sigmas.max()) if sigmas is not None else 0.0
        active = active_stages(self.stages, self.key, sigma)
        h, w = _grid(extra)
        gate = None
        if self.kind == "attn1":
            gate = self_gate(active)
            include_uncond = gate is not None and gate.apply_to_uncond
            if gate is not None and include_uncond and self.inner is not None:
                # Region-by-region calls would show another pack pieces of the negative prompt's attention, and
                # SAG reads that attention whole: the negative rows keep the other pack's full-layer call.
                if state is not None:
                    state.report("uncond-kernel", self.key, f"{gate.title}: another pack's replace at {self.key} "
                                 "gets the negative prompt's rows ungated (apply_to_uncond is off in this layer).")
                include_uncond = False
        else:
            include_uncond = False  # token indices belong to the positive prompt
        groups = self._groups(q.shape[0], extra, active, include_uncond) if active else []
        if self.kind == "attn1":
            plans = [] if gate is None else [
                (rows, field, lambda qq, kk, vv, sub, f=field: self._gate(gate, qq, kk, vv, sub, state, f))
                for field, rows in groups]
        else:
            plans = [(rows, field, work) for field, rows in groups
                     if (work := self._cross_work(active, h, w, field, k.shape[1], q.device, sigma, state)) is not None]
        if not plans:
            if state is not None:
                state.trace(self.kind, self.key, sigma, False)
            return self._stock(q, k, v, extra)
        if state is not None:
            state.trace(self.kind, self.key, sigma, True)
        if len(groups) == 1 and len(plans) == 1:  # one region source (no area, one mask set): the one-field path
            work = plans[0][2]
            if getattr(work, "whole_batch", False):
                return work(q, k, v, extra)
            return self._on_rows(q, k, v, extra, include_uncond, work)
        return self._on_groups(q, k, v, extra, plans, h, w, sigma, state)

    def _groups(self, batch: int, extra: dict, active, include_uncond: bool) -> list[tuple[Field, list[int]]]:
        """The regulated rows grouped by their field (one group: all share it)."""
        rows = batch_rows(extra, batch, include_uncond)
        chunks = chunk_fields(extra)
        if per_sample(active):
            check_images(active, batch // len(chunks))
        fields = row_fields(chunks, batch, per_sample(active))
        if rows is not None and rows.numel() == 0:  # nothing to regulate in this call (e.g. the negative alone)
            return [(fields[0], [])]
        return group_rows(range(batch) if rows is None else rows.tolist(), fields)

    def _on_rows(self, q, k, v, extra: dict, include_uncond: bool, work) -> torch.Tensor:
        """Run ``work`` on the regulated rows and stock attention (once) on the others."""
        rows = batch_rows(extra, q.shape[0], include_uncond)
        if rows is None:
            return work(q, k, v, extra)
        if rows.numel() == 0:
            return self._stock(q, k, v, extra)
        others = torch.tensor(sorted(set(range(q.shape[0])) - set(rows.tolist())), dtype=torch.long)
        r, o = rows.to(q.device), others.to(q.device)
        regulated = work(q.index_select(0, r), k.index_select(0, r), v.index_select(0, r),
                         _sub_options(extra, rows, q.shape[0]))
        stock = self._stock(q.index_select(0, o), k.index_select(0, o), v.index_select(0, o),
                            _sub_options(extra, others, q.shape[0]))
        out = torch.empty(q.shape[0], *stock.shape[1:], dtype=stock.dtype, device=stock.device)
        out[o] = stock
        out[r] = regulated.to(stock.dtype)
        return out

    def _on_groups(self, q, k, v, extra: dict, plans, h: int, w: int, sigma: float, state) -> torch.Tensor:
        """Several region sources: each group's work on its rows, stock attention (once) on the rest.

        A capture records every group's rows together (one :func:`record_capture` per capture stage); a group
        that is only observed (captured, no bias) attends with the stock rows.
        """
        batch = q.shape[0]
        captured: dict[CaptureStage, list] = {}
        done: list[tuple[list[int], torch.Tensor]] = []
        for rows, field, work in plans:
            r = torch.tensor(rows, dtype=torch.long, device=q.device)
            sub = _sub_options(extra, r, batch)
            qq, kk, vv = q.index_select(0, r), k.index_select(0, r), v.index_select(0, r)
            if self.kind == "attn1":
                done.append((rows, work(qq, kk, vv, sub)))
                continue
            bias, captures = work.bias, work.captures
            if captures:
                qh, kh = to_heads(qq, extra["n_heads"]), to_heads(kk, extra["n_heads"])
                for cap in captures:
                    captured.setdefault(cap, []).append((qh, kh, bias, field))
            if bias is not None:
                done.append((rows, work.attend(qq, kk, vv, sub)))
        if state is not None:
            for cap, parts in captured.items():
                record_capture(cap, parts, h, w, sigma, state)
        if not done:  # captures only: the whole batch attends exactly as without us
            return self._stock(q, k, v, extra)
        regulated_rows_ = sorted(r for rows, _ in done for r in rows)
        others = sorted(set(range(batch)) - set(regulated_rows_))
        dtype = q.dtype
        out = None
        if others:
            o = torch.tensor(others, dtype=torch.long, device=q.device)
            stock = self._stock(q.index_select(0, o), k.index_select(0, o), v.index_select(0, o),
                                _sub_options(extra, o, batch))
            out = torch.empty(batch, *stock.shape[1:], dtype=stock.dtype, device=stock.device)
            out[o] = stock
        for rows, result in done:
            if out is None:
                out = torch.empty(batch, *result.shape[1:], dtype=dtype, device=result.device)
            out[torch.tensor(rows, dtype=torch.long, device=q.device)] = result.to(out.dtype)
        return out

    def _cross_work(self, active, h, w, field: Field, context_len, device, sigma, state):
        """Cross-attention for rows of ``field``: the sum of the active stages' biases, plus any captures; None =
        stock."""
        bias = cross_bias(active, h, w, field, context_len, device)
        captures = wanted_captures(active, h, w, field)
        if bias is None and not captures:
            return None
        if bias is not None and (self.inner is not None) and state is not None:
            state.report("token-mask", self.key, f"another attention patch at {self.key} cannot take a token bias; "
                         "the CXR stages use torch attention for the positive prompt there.")

        def capture(q, k, extra):
            heads = extra["n_heads"]
            qh, kh = to_heads(q, heads), to_heads(k, heads)
            if state is not None:
                for cap in captures:
                    record_capture(cap, [(qh, kh, bias, field)], h, w, sigma, state)
            return qh, kh

        # Token biases stay on torch SDPA with their small N×T float mask, not the user's backend: with a mask,
        # ComfyUI's own sage and flash backends fall back to PyTorch attention too, and sub-quad / split would
        # take a bool mask as 0/1 (DESIGN.md); an N×T mask costs little next to self-attention's N².
        def attend(q, k, v, extra):
            heads = extra["n_heads"]
            return to_flat(token_masked_cross_attention(to_heads(q, heads), to_heads(k, heads), to_heads(v, heads),
                                                        bias)).to(q.dtype)

        if bias is None:
            def observe(q, k, v, extra):
                # Capture alone must not change the result: the positive rows are only observed, and the whole
                # batch runs through the stock kernel exactly as without us (a sub-batch can round differently).
                rows = batch_rows(extra, q.shape[0], False)
                if rows is None:
                    capture(q, k, extra)
                elif rows.numel():
                    r = rows.to(q.device)
                    capture(q.index_select(0, r), k.index_select(0, r), _sub_options(extra, rows, q.shape[0]))
                return self._stock(q, k, v, extra)
            observe.whole_batch = True  # type: ignore[attr-defined]
            work = observe
        else:
            def work(q, k, v, extra):
                qh, kh = capture(q, k, extra)
                return to_flat(token_masked_cross_attention(qh, kh, to_heads(v, extra["n_heads"]), bias)).to(q.dtype)
            gate = isolating_gate(active)
            if gate is not None:  # anatomy_isolation "prompt": outside queries attend over the prompt without them
                work = isolated(work, gate, active, self.key, h, w, field)
                attend = isolated(attend, gate, active, self.key, h, w, field)
        work.bias, work.captures, work.attend = bias, captures, attend  # type: ignore[attr-defined]
        return work

    def _gate(self, stage: GateStage, q, k, v, extra: dict, state: RunState | None, field: Field):
        heads = extra["n_heads"]
        h, w = _grid(extra)
        dtype = q.dtype
        # honour the model's attention precision where our own arithmetic runs (a log-sum-exp, another pack's
        # kernel); ComfyUI's backends get the model's dtype and attn_precision, as in a stock layer
        upcast = extra.get("attn_precision") == torch.float32 and dtype != torch.float32
        part = stage.partition(h, w, field, q.device)
        if len(part.slices) == 1:
            # One region covers every token: gating confines nothing, so the layer runs the stock call itself
            # (same kernel, same inputs: bit-identical to a stock layer by construction).
            return self._stock(q, k, v, extra)
        if self.inner is not None:
            if upcast:
                q, k, v = q.float(), k.float(), v.float()
            qh, kh, vh = to_heads(q, heads), to_heads(k, heads), to_heads(v, heads)
            if stage.self_leak == 0.0:
                try:
                    return to_flat(gated_self_attention(qh, kh, vh, part, 0.0, stage.background,
                                                        self._via_inner(heads, extra))).to(dtype)
                except _NotAttention:
                    # PAG's perturbation (self-attention → identity) returns the values it is given: no attention
                    # to confine, each token already sees only itself. It replaces this layer ungated, as without us.
                    logger.debug("%s: the replace at %s is not an attention over its keys; it runs ungated",
                                 stage.title, self.key)
            elif state is not None:
                state.report("soft-gate", self.key, f"{stage.title}: soft gating (leak {stage.self_leak}) cannot "
                             f"compose with another pack's replace at {self.key}; that layer runs it ungated.")
            return self.inner(to_flat(qh).to(dtype), to_flat(kh).to(dtype), to_flat(vh).to(dtype), extra)
        qh, kh, vh = to_heads(q, heads), to_heads(k, heads), to_heads(v, heads)
        if stage.self_leak == 0.0:  # hard gating: each region through the backend ComfyUI chose, no mask
            kernel = attention_backend.hard_kernel(heads, extra, state)
            return to_flat(gated_self_attention(qh, kh, vh, part, 0.0, stage.background, kernel)).to(dtype)
        kernel, lse_kernel = attention_backend.soft_kernels(heads, extra, state, q.device)
        if lse_kernel is None:  # an attention override: it gets the layer whole, with a dense float mask
            bias = self_attention_bias(part, stage.self_leak, stage.background).to(q.device, q.dtype)
            return comfy_attention.optimized_attention(q, k, v, heads, mask=bias, attn_precision=extra.get(
                "attn_precision"), transformer_options=extra).to(dtype)
        if upcast:
            lse_kernel = _upcast(lse_kernel)
        out = gated_self_attention(qh, kh, vh, part, stage.self_leak, stage.background, kernel, lse_kernel)
        return to_flat(out).to(dtype)

    def _via_inner(self, heads: int, extra: dict):
        """Another pack's replace at this key as our mask-free kernel (heads layout): their effect and ours compose."""
        inner = self.inner

        def via_inner(q, k, v):
            out = inner(to_flat(q), to_flat(k), to_flat(v), extra)
            if out.shape[1] != q.shape[2]:  # one output per key, not per query: not an attention
                raise _NotAttention
            return to_heads(out, heads)
        return via_inner


def _upcast(lse_kernel):
    """``lse_kernel`` on float32 inputs (the model asks for float32 attention; outputs come back in its dtype)."""
    def kernel(q, k, v):
        out, lse = lse_kernel(q.float(), k.float(), v.float())
        return out.to(q.dtype), lse
    return kernel
