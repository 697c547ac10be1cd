"""Prompt isolation in ComfyUI: outside queries attend over the prompt encoded without their anatomy words.

The stage holds the prompt encoded without each subset of anatomy words (:class:`...attention.gating.PromptIsolation`);
at a cross-attention call the replace only has the layer's keys and values of the prompt as typed, so
:func:`projector` projects the other contexts by the layer's own ``to_k``/``to_v`` (ComfyUI's modules: weight
patches such as LoRAs and low-VRAM casting apply as to the layer's own context). :func:`isolated` wraps a layer's
regulated work: every query outside some word's organ gets its output over the matching context instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from comfy.ldm.modules.attention import SpatialTransformer

from ...attention.field import Field
from ...attention.gating import isolated_cross_attention
from ...attention.kernels import to_flat, to_heads
from ...attention.layer_call import cross_bias
from ...attention.stages import GateStage, Key, Stage


def attn2_module(dm: torch.nn.Module, key: Key) -> torch.nn.Module:
    """The cross-attention module of the transformer block at ``key`` (``(block, number, index)``)."""
    kind, number, index = key
    block = dm.middle_block if kind == "middle" else getattr(dm, f"{kind}_blocks")[number]
    for module in block.modules():
        if isinstance(module, SpatialTransformer):
            return module.transformer_blocks[index].attn2
    raise KeyError(f"no transformer block at {key}")


def projector(model) -> Callable[[Key, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``project(key, context, like)``: ``context`` ``[1, T, C]`` through the layer's ``to_k``/``to_v``, on ``like``'s
    device and in its dtype (the dtype ComfyUI runs the layer's context in)."""
    dm = model.get_model_object("diffusion_model")
    modules: dict[Key, torch.nn.Module] = {}

    def project(key: Key, context: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in modules:
            modules[key] = attn2_module(dm, key)
        attn = modules[key]
        ctx = context.to(like.device, like.dtype)
        return attn.to_k(ctx), attn.to_v(ctx)
    return project


def isolating_gate(active: Sequence[Stage]) -> GateStage | None:
    """The first active gate with prompt isolation (None: none here)."""
    return next((s for s in active if isinstance(s, GateStage) and s.isolation is not None), None)


def isolated(work: Callable, gate: GateStage, active: Sequence[Stage], key: Key, h: int, w: int, field: Field):
    """``work`` (the layer's regulated rows → flat output) with the outside queries' rows recomputed over the
    prompt without their words; other stages' biases (a boost) follow their words' columns there."""
    iso = gate.isolation
    assert iso is not None
    others = [s for s in active if s is not gate]

    def run(q, k, v, extra):
        out = work(q, k, v, extra)
        groups = gate.isolation_groups(h, w, field, q.device)
        if not groups:
            return out
        heads, b = extra["n_heads"], q.shape[0]
        qh = to_heads(q, heads)
        bias = cross_bias(others, h, w, field, k.shape[1], q.device)
        out = out.clone()
        for subset, rows in groups:
            ks, vs = iso.project(key, iso.contexts[subset], q)
            sub = None if bias is None else bias.index_select(0, rows)[:, iso.columns[subset].to(q.device)]
            o = isolated_cross_attention(qh.index_select(2, rows), to_heads(ks.expand(b, -1, -1), heads),
                                         to_heads(vs.expand(b, -1, -1), heads), sub)
            out[:, rows] = to_flat(o).to(out.dtype)
        return out
    return run
