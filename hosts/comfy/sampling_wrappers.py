"""Sampling-time wrappers of a patched model: a fresh per-run state for every run (OUTER_SAMPLE, with the checks that
must refuse a run before anything is sampled), and composition with replaces other packs install only at sampling
time (APPLY_MODEL). :func:`.patch.install_stage` adds them with the replaces."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import comfy.model_patcher
import torch

from ...attention.run_state import RunState, latent_fingerprint
from ...attention.stages import Stage
from . import audit
from .cond_areas import HOLDER_KEY, check_areas
from .cond_areas import holder as _state
from .control_checks import check_controls
from .dit import BlockReplace
from .replace import CXRReplace

#: Our replaces: a UNet attention layer's, a DiT block's.
OURS = (CXRReplace, BlockReplace)
#: The run state's kind for DiT blocks (``RunState.installed``, ``reach``, ``trace``).
DIT_KIND = "dit"

logger = logging.getLogger("cxr_counterfactual")

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
        if HOLDER_KEY in guider.model_options.get("transformer_options", {}):
            check_batch(guider.model_options, getattr(guider, "conds", None), latent_image.shape)
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    to = guider.model_options["transformer_options"]
    state = None
    if HOLDER_KEY in to:
        state = to[HOLDER_KEY] = to[HOLDER_KEY].clone().reset()
        conds = getattr(guider, "conds", None) or {}
        if "positive" in conds:  # CFGGuider and ours; other guiders fall back to cond_or_uncond
            state.positive = frozenset(c["uuid"] for c in conds["positive"] if "uuid" in c)
            state.guider = guider  # its conds["positive"] is the list its model calls pass
    try:
        out = executor(*args, **kwargs)
        if state is not None:
            _check_ownership(state, to)
            if isinstance(out, torch.Tensor):
                state.record.latent = latent_fingerprint(out)  # nodes after the sampler find their run by it
            audit.note("run", state.record.audit())  # the sampler node's measurements, for the audit trail
        return out
    finally:
        guider.model_options = original


def our_stages(model_options: dict) -> list[Stage]:
    """Every stage our replaces in ``model_options`` carry (each once): the UNet's attention replaces and the DiT's
    block replaces."""
    stages: list[Stage] = []
    for table in model_options.get("transformer_options", {}).get("patches_replace", {}).values():
        for fn in table.values():
            for stage in getattr(fn, "stages", ()) if isinstance(fn, OURS) else ():
                if all(stage is not s for s in stages):
                    stages.append(stage)
    return stages


def check_batch(model_options: dict, conds: dict | None, shape: Sequence[int]) -> None:
    """Before sampling: refuse per-image masks that do not match the latent batch, and a conditioning area outside
    the latent (ComfyUI would fail mid-sampling, or give that prompt nothing to act on).

    Raises:
        CXRInputError: naming the stage's node and masks input, or the area's node and its position inputs.
    """
    if len(shape) != 4:
        return
    for stage in our_stages(model_options):
        stage.check_batch(int(shape[0]))
    check_areas(conds, (int(shape[-2]), int(shape[-1])))


def _check_ownership(state: RunState, to: dict) -> None:
    """After a run: report keys where a node applied after ours replaced our patch (as SAG does).

    A replace that wraps ours and calls it (a cooperative pack) is no conflict: only keys where ours never
    ran are reported.
    """
    replace = to.get("patches_replace", {})
    for kind, keys in state.installed.items():
        for key in sorted(keys):
            if (kind, key) in state.reached:
                continue
            fn = replace.get(kind, {}).get(key[:2] if kind == DIT_KIND else key)  # DiT replaces: 2-part keys
            if not isinstance(fn, OURS):
                name = getattr(fn, "__qualname__", type(fn).__name__)
                state.report("overwritten", key, f"{kind} {key} was replaced by a later node ({name}); anatomy "
                             "gating is off in that layer. Apply the CXR nodes after that node to compose them.")
            elif kind == DIT_KIND:  # our block replace ran but our attention override did not: another took its place
                fn = to.get("optimized_attention_override")
                name = getattr(fn, "__qualname__", type(fn).__name__)
                state.report("overwritten", key, f"the attention override of {key[:2]} is another node's ({name}) and "
                             "does not call ours; the CXR stages are off in that block. Apply the CXR nodes after that "
                             "node to compose them.")


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
