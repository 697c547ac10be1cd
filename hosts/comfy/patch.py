"""The ComfyUI attention patch: binds the core to ComfyUI's attention patches (the UNet walk is :mod:`.unet_layout`).

What it does:
- finds every SpatialTransformer of the model (never a hard-coded block list) and registers one replace
  per attention on a **clone** of the ModelPatcher, under the 3-part key ``(block, number, index)``;
- reads ``extra_options`` at run time (the layer's token grid ``activations_shape``, ``cond_or_uncond``,
  ``sigmas``, ``n_heads``), picks the rows to regulate and calls the core;
- composes with other packs: a replace already under our key (or under the block's 2-part key, at node
  time or, like PAG's, at sampling time) becomes the attention *kernel* our gating calls (per region
  group for hard gating); a replace that overwrites ours after we installed it (SAG does) is detected when
  sampling starts and reported in the log and the run's record; ``optimized_attention_override`` is
  honoured (hard gating calls it per group; soft gating gives it a dense float mask).
- keeps per-run state in one holder under ``transformer_options["cxr_counterfactual"]``, replaced by a
  fresh copy at the start of every run by an OUTER_SAMPLE wrapper; what a run produces for nodes after
  the sampler goes to a :class:`ResultStore` that model copies share (both in :mod:`.run_state`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ...attention.gating import gated_self_attention, self_attention_bias, token_masked_cross_attention
from ...attention.kernels import sdpa, sdpa_with_lse, to_flat, to_heads
from ...attention.layer_call import (
    COND,
    UNCOND,
    active_stages,
    cross_bias,
    record_capture,
    regulated_rows,
    self_gate,
    wanted_captures,
)
from ...attention.run_state import ResultStore, RunState, latent_fingerprint
from ...attention.stages import CaptureStage, GateStage, Key, Stage
from .control_checks import check_controls
from .prompt_isolation import isolated, isolating_gate
from .unet_layout import transformer_keys

logger = logging.getLogger("cxr_counterfactual")

HOLDER_KEY = "cxr_counterfactual"


# --------------------------------------------------------------------------------------------------
# per-run state and results
def _state(options: dict) -> RunState | None:
    return options.get(HOLDER_KEY)


def _grids(extra: dict) -> tuple[int, int, tuple[int, int]]:
    """This layer's token grid ``h, w`` (from its activations, never guessed) and the latent's ``(H, W)``."""
    h, w = (int(n) for n in extra["activations_shape"][-2:])
    lh, lw = (int(n) for n in extra["original_shape"][-2:])
    return h, w, (lh, lw)


# --------------------------------------------------------------------------------------------------
# the replace patch
def _rows(extra: dict, batch: int, include_uncond: bool) -> torch.Tensor | None:
    """Batch rows to regulate (None = all): the chunks of the positive prompt (all chunks with
    ``include_uncond``), by the rule both hosts share (:func:`.layer_call.regulated_rows`).

    ``cond_or_uncond`` numbers the conditionings by their place in the call, not by what they are: SAG's
    extra pass on the negative prompt alone is labelled 0 ("cond"). So where the run knows the positive
    prompt's conditioning ids (``uuids``, one per chunk), they decide.
    """
    labels = list(extra.get("cond_or_uncond") or [])
    state = _state(extra)
    uuids = extra.get("uuids")
    if state is not None and state.positive is not None and uuids is not None and len(uuids) == len(labels):
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
        h, w, latent = _grids(extra)
        if self.kind == "attn1":
            gate = self_gate(active)
            work = None if gate is None else (lambda qq, kk, vv, sub: self._gate(gate, qq, kk, vv, sub, state))
            include_uncond = gate is not None and gate.apply_to_uncond
            if gate is not None and include_uncond and self.inner is not None:
                # Region-by-region calls would show another pack pieces of the negative prompt's attention, and
                # SAG reads that attention whole: the negative rows keep the other pack's full-layer call.
                if state is not None:
                    state.report("uncond-kernel", self.key, f"{gate.title}: another pack's replace at {self.key} "
                                 "gets the negative prompt's rows ungated (apply_to_uncond is off in this layer).")
                include_uncond = False
        else:
            work = self._cross_work(active, h, w, latent, k.shape[1], q.device, sigma, state)
            include_uncond = False  # token indices belong to the positive prompt
        if work is None:
            if state is not None:
                state.trace(self.kind, self.key, sigma, False)
            return self._stock(q, k, v, extra)
        if state is not None:
            state.trace(self.kind, self.key, sigma, True)
        if getattr(work, "whole_batch", False):
            return work(q, k, v, extra)
        return self._on_rows(q, k, v, extra, include_uncond, work)

    def _on_rows(self, q, k, v, extra: dict, include_uncond: bool, work) -> torch.Tensor:
        """Run ``work`` on the regulated rows and stock attention (once) on the others."""
        rows = _rows(extra, q.shape[0], include_uncond)
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

    def _cross_work(self, active, h, w, latent, context_len, device, sigma, state):
        """Cross-attention: the sum of the active stages' biases, plus any captures; None = stock."""
        bias = cross_bias(active, h, w, latent, context_len, device)
        captures = wanted_captures(active, h, w, latent)
        if bias is None and not captures:
            return None
        if bias is not None and (self.inner is not None) and state is not None:
            state.report("token-mask", self.key, f"another attention patch at {self.key} cannot take a token bias; "
                         "the CXR stages use torch attention for the positive prompt there.")

        def capture(q, k, extra):
            heads = extra["n_heads"]
            qh, kh = to_heads(q, heads), to_heads(k, heads)
            for cap in captures:
                self._capture(cap, qh, kh, bias, h, w, latent, sigma, state)
            return qh, kh

        if bias is None:
            def observe(q, k, v, extra):
                # Capture alone must not change the result: the positive rows are only observed, and the whole
                # batch runs through the stock kernel exactly as without us (a sub-batch can round differently).
                rows = _rows(extra, q.shape[0], False)
                if rows is None:
                    capture(q, k, extra)
                elif rows.numel():
                    r = rows.to(q.device)
                    capture(q.index_select(0, r), k.index_select(0, r), _sub_options(extra, rows, q.shape[0]))
                return self._stock(q, k, v, extra)
            observe.whole_batch = True  # type: ignore[attr-defined]
            return observe

        def work(q, k, v, extra):
            qh, kh = capture(q, k, extra)
            return to_flat(token_masked_cross_attention(qh, kh, to_heads(v, extra["n_heads"]), bias)).to(q.dtype)
        gate = isolating_gate(active)
        return work if gate is None else isolated(work, gate, active, self.key, h, w, latent)

    def _capture(self, cap: CaptureStage, qh, kh, bias, h, w, latent, sigma, state) -> None:
        if state is not None:
            record_capture(cap, qh, kh, bias, h, w, latent, sigma, state)

    def _gate(self, stage: GateStage, q, k, v, extra: dict, state: RunState | None):
        heads = extra["n_heads"]
        h, w, latent = _grids(extra)
        precision = extra.get("attn_precision")
        dtype = q.dtype
        if precision == torch.float32 and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()  # honour the model's attention precision
        qh, kh, vh = to_heads(q, heads), to_heads(k, heads), to_heads(v, heads)
        part = stage.partition(h, w, latent, q.device)
        kernel, lse_kernel = self._kernels(heads, extra)
        if self.inner is not None and stage.self_leak == 0.0:
            try:
                return to_flat(gated_self_attention(qh, kh, vh, part, 0.0, stage.background, kernel)).to(dtype)
            except _NotAttention:
                # PAG's perturbation (self-attention → identity) returns the values it is given: no attention to
                # confine, each token already sees only itself. It replaces this layer ungated, as without us.
                logger.debug("%s: the replace at %s is not an attention over its keys; it runs ungated",
                             stage.title, self.key)
                return self.inner(to_flat(qh).to(dtype), to_flat(kh).to(dtype), to_flat(vh).to(dtype), extra)
        if lse_kernel is None and 0.0 < stage.self_leak < 1.0:
            if self.inner is not None:
                if state is not None:
                    state.report("soft-gate", self.key, f"{stage.title}: soft gating (leak {stage.self_leak}) cannot "
                                 f"compose with another pack's replace at {self.key}; that layer runs it ungated.")
                return self.inner(to_flat(qh).to(dtype), to_flat(kh).to(dtype), to_flat(vh).to(dtype), extra)
            # an attention override gives no log-sum-exp: the documented dense-mask fallback
            bias = self_attention_bias(part, stage.self_leak, stage.background).to(q.device, q.dtype)
            out = comfy_attention.optimized_attention(
                to_flat(qh), to_flat(kh), to_flat(vh), heads, mask=bias, transformer_options=extra
            )
            return out.to(dtype)
        out = gated_self_attention(qh, kh, vh, part, stage.self_leak, stage.background, kernel,
                                   lse_kernel or sdpa_with_lse)
        return to_flat(out).to(dtype)

    def _kernels(self, heads: int, extra: dict):
        """Attention kernels in the heads layout: another pack's replace or override, else torch SDPA."""
        if self.inner is not None:
            inner = self.inner

            def via_inner(q, k, v):
                out = inner(to_flat(q), to_flat(k), to_flat(v), extra)
                if out.shape[1] != q.shape[2]:  # one output per key, not per query: not an attention
                    raise _NotAttention
                return to_heads(out, heads)
            return via_inner, None
        if "optimized_attention_override" in extra:
            def via_override(q, k, v):
                out = comfy_attention.optimized_attention(
                    to_flat(q), to_flat(k), to_flat(v), heads, transformer_options=extra
                )
                return to_heads(out, heads)
            return via_override, None
        return sdpa, sdpa_with_lse


# --------------------------------------------------------------------------------------------------
# wrappers: fresh state per run, and composition resolved at sampling time
def outer_sample_wrapper(executor, *args, **kwargs):
    """Give every run a fresh per-run state (so queued runs never share step state); refuse controls that cannot work
    with our stages (:func:`.control_checks.check_controls`) before anything is sampled."""
    guider = executor.class_obj
    latent_image = args[1] if len(args) > 1 else kwargs.get("latent_image")
    if latent_image is not None:
        check_controls(getattr(guider, "conds", None), latent_image.shape,
                       guider.model_patcher.get_model_object("diffusion_model"))
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    to = guider.model_options["transformer_options"]
    state = None
    if HOLDER_KEY in to:
        state = to[HOLDER_KEY] = to[HOLDER_KEY].clone().reset()
        conds = getattr(guider, "conds", None) or {}
        if "positive" in conds:  # CFGGuider and ours; other guiders fall back to cond_or_uncond
            state.positive = frozenset(c["uuid"] for c in conds["positive"] if "uuid" in c)
    try:
        out = executor(*args, **kwargs)
        if state is not None:
            _check_ownership(state, to)
            if isinstance(out, torch.Tensor):
                state.record.latent = latent_fingerprint(out)  # nodes after the sampler find their run by it
        return out
    finally:
        guider.model_options = original


def _check_ownership(state: RunState, to: dict) -> None:
    """After a run: report keys where a node applied after ours replaced our patch (as SAG does).

    A replace that wraps ours and calls it (a cooperative pack) is no conflict: only keys where ours never
    ran are reported.
    """
    replace = to.get("patches_replace", {})
    for kind, keys in state.installed.items():
        for key in sorted(keys):
            fn = replace.get(kind, {}).get(key)
            if not isinstance(fn, CXRReplace) and (kind, key) not in state.reached:
                name = getattr(fn, "__qualname__", type(fn).__name__)
                state.report("overwritten", key, f"{kind} {key} was replaced by a later node ({name}); anatomy "
                             "gating is off in that layer. Apply the CXR nodes after that node to compose them.")


def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """Wrap replaces installed at sampling time under a block's 2-part key (PAG does this), which our
    3-part keys would otherwise silently shadow."""
    state = _state(transformer_options)
    replace = transformer_options.get("patches_replace")
    if state is not None and replace:
        changed = {}
        for kind, keys in state.installed.items():
            table = replace.get(kind, {})
            for key in keys:
                ours, foreign = table.get(key), table.get(key[:2])
                if isinstance(ours, CXRReplace) and ours.inner is None and foreign is not None:
                    changed.setdefault(kind, dict(table))[key] = ours.with_inner(foreign)
        if changed:
            transformer_options = {**transformer_options, "patches_replace": {**replace, **changed}}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


# --------------------------------------------------------------------------------------------------
# installing
def install_stage(model, stage: Stage, kinds: Sequence[str] | None = None):
    """A clone of ``model`` with ``stage`` on the attention kinds it acts on (``stage.kinds``; ``kinds``
    overrides them, e.g. for a test that patches more layers than the stage needs) of every transformer block
    it covers.

    A key already holding our replace gains the stage; a key holding another pack's replace (3-part, or
    the block's 2-part key) has it wrapped as our kernel, never overwritten.
    """
    keys = [k for k in transformer_keys(model) if stage.covers(k)]
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    # clone() deep-copied the options, so an existing holder is already this clone's own copy.
    state: RunState = to.get(HOLDER_KEY) or RunState()
    table = to.get("patches_replace", {})
    for kind in stage.kinds if kinds is None else kinds:
        current = table.get(kind, {})
        for key in keys:
            existing = current.get(key)
            if isinstance(existing, CXRReplace):
                patch = existing.with_stage(stage)
            else:
                patch = CXRReplace(kind, key, (stage,), inner=existing or current.get(key[:2]))
            setter = m.set_model_attn1_replace if kind == "attn1" else m.set_model_attn2_replace
            setter(patch, key[0], key[1], key[2])
            state.installed[kind].add(key)
    to = m.model_options["transformer_options"]
    to[HOLDER_KEY] = state
    wrappers = to.get("wrappers", {})
    if HOLDER_KEY not in wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {}):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, HOLDER_KEY, outer_sample_wrapper)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, HOLDER_KEY, apply_model_wrapper)
    return m


def percent_to_sigma(model) -> Callable[[float], float]:
    """ComfyUI's convention: a percent of the model's noise range (not of steps) → its sigma (the stage
    builders' ``to_sigma``)."""
    sampling = model.get_model_object("model_sampling")
    return lambda percent: float(sampling.percent_to_sigma(percent))


def run_state(model) -> RunState | None:
    """The holder of a patched model (tests and preview nodes read its result store)."""
    return model.model_options.get("transformer_options", {}).get(HOLDER_KEY)


def result_store(model) -> ResultStore | None:
    """The result store of a patched model (None: no CXR stage on it, so no run of it is recorded)."""
    state = run_state(model)
    return state.store if state is not None else None


