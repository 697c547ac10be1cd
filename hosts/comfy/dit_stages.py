"""The CXR stages on a diffusion transformer in ComfyUI (MMDiT/SD3.5, Flux): installing them and what one joint
attention call does with them.

The UNet's stages act on two kinds of layers, self-attention (the gate) and cross-attention (anatomy-token hiding,
the boost, capture). A DiT has one joint call per block over text ‖ image tokens (:mod:`.dit`), so each stage acts
on a part of it (:func:`...attention.joint.joint_attention`): the gate on image → image, the stages' ``[N, T]``
biases on image → text, capture reads image → text; text rows stay stock. The same :class:`...attention.stages.Stage`
objects and the same per-call rule as the UNet's (:mod:`...attention.layer_call`) pick the active stages, the batch
rows (the gate's on both prompts with ``apply_to_uncond``, token biases on the positive prompt only) and each row's
:class:`...attention.field.Field`, whose ``patch`` makes the regions follow the patch grid
(:mod:`...attention.patch_grid`) instead of a UNet layer's.

Not regulated (reported once per run, the call runs stock): a call whose image part is not the latent's patch grid
(Flux Kontext appends reference-image tokens) and Flux's masked calls (``attention_mask``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import comfy.patcher_extension
import torch

from ...attention.field import row_fields
from ...attention.gating import gated_self_attention
from ...attention.joint import JointGate, joint_attention
from ...attention.kernels import sdpa_with_lse
from ...attention.layer_call import (
    active_stages,
    check_images,
    cross_bias,
    per_sample,
    record_capture,
    self_gate,
    wanted_captures,
)
from ...attention.patch_grid import patch_grid
from ...attention.run_state import RunState
from ...attention.stages import Stage
from ...errors import CXRInputError
from . import attention_backend
from .cond_areas import HOLDER_KEY, calc_cond_batch_wrapper, chunk_fields
from .cond_areas import holder as _state
from .dit import CALL_KEY, DitCall, Kernel, dit_family, install, tag_text_length
from .replace import batch_rows
from .sampling_wrappers import DIT_KIND as KIND
from .sampling_wrappers import apply_model_wrapper, outer_sample_wrapper
from .unet_layout import transformer_keys

logger = logging.getLogger("cxr_counterfactual")

#: Our APPLY_MODEL wrapper's key for :func:`.dit.tag_text_length` (the holder's key is the stages' other wrappers').
TAG_KEY = HOLDER_KEY + ".dit"


def dit_model(model) -> torch.nn.Module | None:
    """The diffusion model of ``model`` when it is a diffusion transformer the pack knows (None: a UNet).

    Raises:
        CXRInputError: a model that is neither a UNet nor a supported DiT family (naming it and the supported ones).
    """
    dm = model.get_model_object("diffusion_model")
    if hasattr(dm, "input_blocks") or hasattr(dm, "middle_block"):
        return None
    dit_family(dm)
    return dm


def block_counts(dm) -> tuple[int, int]:
    """(double/joint blocks, single blocks) of a supported DiT."""
    if dit_family(dm) == "mmdit":
        return len(dm.joint_blocks), 0
    return len(dm.double_blocks), len(dm.single_blocks)


def check_stage_on_dit(dm, title: str, *, blocks: str = "all", tokens=None, grid_factor: int | None = None,
                       isolation: str = "tokens") -> None:
    """Refuse, at node time, settings that have no meaning on this DiT.

    Raises:
        CXRInputError: ``blocks`` other than "all" (they name UNet parts), a token map made for another model
            family's context, a capture grid that is not the patch grid, prompt isolation.
    """
    family = dit_family(dm)
    if blocks != "all":
        raise CXRInputError(f"blocks '{blocks}' names UNet parts; a diffusion transformer ({family}) has none.",
                            node=title, input_name="blocks", fix="Use blocks 'all' on this model.")
    layout = getattr(tokens, "layout", None)
    want = {"mmdit": "sd3", "flux": "flux"}[family]
    if tokens is not None and layout != want:
        raise CXRInputError(
            f"the token map was made for a '{layout or 'clip'}' context, but this model ({family}) reads a "
            f"'{want}' context: its word positions would be wrong.", node=title, input_name="tokens",
            fix="Encode the prompt with CXR Text Encode on this model's own text encoder (its CLIP output).")
    patch = int(dm.patch_size)
    if grid_factor is not None and grid_factor != patch:
        raise CXRInputError(
            f"a diffusion transformer's attention has one grid, the latent in {patch}×{patch} patches; "
            f"grid_factor {grid_factor} names another.", node=title, input_name="grid_factor",
            fix=f"Use grid_factor {patch} on this model.")
    if isolation != "tokens":
        raise CXRInputError(
            "anatomy_isolation 'prompt' re-encodes the prompt for a UNet's fixed cross-attention context; a "
            "diffusion transformer updates its text tokens in every block.", node=title,
            input_name="anatomy_isolation", fix="Use anatomy_isolation 'tokens' on this model.")


def install_dit_stage(model, stage: Stage):
    """A clone of ``model`` (a supported DiT) with ``stage`` on every joint block (and Flux's single blocks): our
    block replaces and attention override wrap what was there (:func:`.dit.install`); the per-run wrappers are the
    UNet's (fresh state per run, conditioning areas) plus :func:`.dit.tag_text_length`."""
    dm = model.get_model_object("diffusion_model")
    blocks, singles = block_counts(dm)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    state: RunState = to.get(HOLDER_KEY) or RunState()
    m.model_options = install(m.model_options, blocks, regulate, singles, stage=stage, patch=int(dm.patch_size),
                              masked=report_masked)
    to = m.model_options["transformer_options"]
    installed = state.installed.setdefault(KIND, set())
    installed.update([("double_block", i, 0) for i in range(blocks)] + [("single_block", i, 0) for i in range(singles)])
    to[HOLDER_KEY] = state
    wrappers = to.get("wrappers", {})
    kinds = comfy.patcher_extension.WrappersMP
    for kind, key, fn in ((kinds.OUTER_SAMPLE, HOLDER_KEY, outer_sample_wrapper),
                          (kinds.APPLY_MODEL, HOLDER_KEY, apply_model_wrapper),
                          (kinds.APPLY_MODEL, TAG_KEY, tag_text_length),
                          (kinds.CALC_COND_BATCH, HOLDER_KEY, calc_cond_batch_wrapper)):
        if key not in wrappers.get(kind, {}):
            m.add_wrapper_with_key(kind, key, fn)
    return m


def regulate(call: DitCall, options: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image_only: bool,
             kernel: Kernel, func=None) -> torch.Tensor | None:
    """One joint (or MMDiT-X image-only) call of a block carrying stages: their regulated rows grouped by field and
    by what acts on them, each group through :func:`...attention.joint.joint_attention`, the other rows stock.
    None: nothing acts in this call, so the stock call itself runs (neutral = stock by construction)."""
    key = (*call.block, 0)
    state = _state(options)
    if state is not None:
        state.reach(KIND, key)
    sigmas = options.get("sigmas")
    sigma = float(sigmas.max()) if sigmas is not None else 0.0
    active = active_stages(call.stages, key, sigma)
    if not active or "original_shape" not in options:
        return _untouched(state, key, sigma)
    batch = q.shape[0]
    gate = self_gate(active)
    chunks = chunk_fields(options)
    if per_sample(active):
        check_images(active, batch // len(chunks))
    fields = row_fields(chunks, batch, per_sample(active))
    h, w = patch_grid(fields[0].size, call.patch)
    if h * w != call.image_len:
        if state is not None:
            state.report("dit-tokens", key, f"{call.image_len} image tokens at {call.block} are not the "
                         f"{h}×{w} patch grid (reference-image tokens, as Flux Kontext adds?): that call runs stock.")
        return _untouched(state, key, sigma)
    gate_rows = _all_or(batch_rows(options, batch, gate is not None and gate.apply_to_uncond), batch)
    text_rows = set(_all_or(batch_rows(options, batch, False), batch))
    groups: dict[tuple, list[int]] = {}
    for r in range(batch):
        gated, texted = gate is not None and r in gate_rows, not image_only and r in text_rows
        if gated or texted:
            groups.setdefault((replace(fields[r], patch=call.patch), gated, texted), []).append(r)
    plans, captured = [], []
    for (field, gated, texted), rows in groups.items():
        joint_gate = None
        if gated:
            part = gate.partition(h, w, field, q.device)
            if len(part.slices) > 1:  # one region covers every token: nothing to confine
                joint_gate = JointGate(part, gate.self_leak, gate.background)
        bias = cross_bias(active, h, w, field, call.text_len, q.device) if texted else None
        if texted:
            captured.extend((cap, rows, bias, field) for cap in wanted_captures(active, h, w, field))
        if joint_gate is not None or bias is not None:
            plans.append((rows, joint_gate, bias))
    if captured and state is not None:
        _record(captured, q, k, call, h, w, sigma, state)
    if not plans:
        return _untouched(state, key, sigma)
    if state is not None:
        state.trace(KIND, key, sigma, True)
    needs_lse = any(bias is not None or (g is not None and g.leak > 0.0) for _, g, bias in plans)
    lse_kernel = attention_backend.joint_lse_kernel(func, state, q.device) if needs_lse else None
    out = torch.empty_like(q)
    done: set[int] = set()
    for rows, joint_gate, bias in plans:
        r = torch.tensor(rows, dtype=torch.long, device=q.device)
        qq, kk, vv = q.index_select(0, r), k.index_select(0, r), v.index_select(0, r)
        if image_only:
            result = gated_self_attention(qq, kk, vv, joint_gate.part, joint_gate.leak, joint_gate.background,
                                          kernel, lse_kernel or sdpa_with_lse)
        else:
            result = joint_attention(qq, kk, vv, call.layout, joint_gate, bias, kernel, lse_kernel or sdpa_with_lse)
        out[r] = result.to(out.dtype)
        done.update(rows)
    others = [i for i in range(batch) if i not in done]
    if others:
        o = torch.tensor(others, dtype=torch.long, device=q.device)
        out[o] = kernel(q.index_select(0, o), k.index_select(0, o), v.index_select(0, o)).to(out.dtype)
    return out


def report_masked(call: DitCall, options: dict) -> None:
    """A masked joint call of a block carrying stages (Flux's ``attention_mask``, e.g. Redux's attention bias) runs
    stock: said once per run and block, so a user sees why the stages did not act there."""
    state = _state(options)
    if state is None or not call.stages:
        return
    key = (*call.block, 0)
    state.reach(KIND, key)
    state.report("dit-mask", key, f"the joint attention at {call.block} carries an attention mask (Flux's "
                 "attention_mask, e.g. a Redux style model's attention bias): that call runs stock, unregulated.")


def _all_or(rows: torch.Tensor | None, batch: int) -> list[int]:
    return list(range(batch)) if rows is None else rows.tolist()


def _untouched(state: RunState | None, key, sigma: float) -> None:
    if state is not None:
        state.trace(KIND, key, sigma, False)
    return None


def _record(captured: list, q: torch.Tensor, k: torch.Tensor, call: DitCall, h: int, w: int, sigma: float,
            state: RunState) -> None:
    """Per-word maps from the image → text part of the positive rows (their softmax over the text keys, with the
    biases they attend with), one record per capture stage over all its groups."""
    t, i = call.layout.text, call.layout.image
    by_stage: dict = {}
    for cap, rows, bias, field in captured:
        r = torch.tensor(rows, dtype=torch.long, device=q.device)
        by_stage.setdefault(cap, []).append((q.index_select(0, r)[:, :, i], k.index_select(0, r)[:, :, t], bias,
                                             field))
    for cap, parts in by_stage.items():
        record_capture(cap, parts, h, w, sigma, state)


__all__ = ["CALL_KEY", "KIND", "block_counts", "check_model", "check_stage_on_dit", "dit_model", "install_dit_stage",
           "regulate", "report_masked"]


def check_model(model, title: str, **settings) -> torch.nn.Module | None:
    """A stage node's model check, before anything long runs: a UNet with transformer blocks (None), or a supported
    DiT whose ``settings`` (:func:`check_stage_on_dit`'s keywords) make sense there (its diffusion model).

    Raises:
        CXRInputError: naming the node and the input: an unsupported model, or a setting with no meaning on a DiT.
    """
    try:
        dm = dit_model(model)
        if dm is None:
            transformer_keys(model)
    except CXRInputError as err:
        raise err.located(title, "model") from None
    if dm is not None:
        check_stage_on_dit(dm, title, **settings)
    return dm
