"""The ComfyUI attention patch: binds the core to ComfyUI's attention patches (the UNet walk is :mod:`.unet_layout`).

What it does:
- finds every SpatialTransformer of the model (never a hard-coded block list) and registers one replace
  per attention on a **clone** of the ModelPatcher, under the 3-part key ``(block, number, index)``;
- reads ``extra_options`` at run time (the layer's token grid ``activations_shape``, ``cond_or_uncond``,
  ``uuids``, ``sigmas``, ``n_heads``), picks the rows to regulate, groups them by their region source (a
  :class:`...attention.field.Field`: the image of the batch, and the area of its conditioning, which a
  CALC_COND_BATCH wrapper records per conditioning id because ComfyUI narrows the input to it before the model
  runs) and calls the core once per group;
- composes with other packs: a replace already under our key (or under the block's 2-part key, at node
  time or, like PAG's, at sampling time) becomes the attention *kernel* our gating calls (per region
  group for hard gating); a replace that overwrites ours after we installed it (SAG does) is detected when
  sampling starts and reported in the log and the run's record;
- runs gated self-attention on the backend ComfyUI chose for the layer, ``optimized_attention_override``
  included (:mod:`.attention_backend`: hard gating calls it per region; soft gating takes a log-sum-exp).
- keeps per-run state in one holder under ``transformer_options["cxr_counterfactual"]``, replaced by a
  fresh copy at the start of every run by an OUTER_SAMPLE wrapper; what a run produces for nodes after
  the sampler goes to a :class:`ResultStore` that model copies share (both in :mod:`.run_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import comfy.patcher_extension

from ...attention.run_state import ResultStore, RunState
from ...attention.stages import Stage
from .cond_areas import HOLDER_KEY, calc_cond_batch_wrapper
from .dit_stages import dit_model, install_dit_stage
from .replace import CXRReplace
from .sampling_wrappers import apply_model_wrapper, check_batch, our_stages, outer_sample_wrapper
from .unet_layout import transformer_keys

# The replace and the wrappers live in their own modules; these names stay importable from here (nodes, the refinement
# sampler and user scripts import them from patch).
__all__ = ["HOLDER_KEY", "CXRReplace", "apply_model_wrapper", "check_batch", "install_stage", "our_stages",
           "outer_sample_wrapper", "percent_to_sigma", "result_store", "run_state"]

# --------------------------------------------------------------------------------------------------
# installing
def install_stage(model, stage: Stage, kinds: Sequence[str] | None = None):
    """A clone of ``model`` with ``stage`` on the attention kinds it acts on (``stage.kinds``; ``kinds``
    overrides them, e.g. for a test that patches more layers than the stage needs) of every transformer block
    it covers.

    A key already holding our replace gains the stage; a key holding another pack's replace (3-part, or
    the block's 2-part key) has it wrapped as our kernel, never overwritten. A diffusion transformer gets the
    stage on its blocks instead (:func:`.dit_stages.install_dit_stage`).
    """
    if dit_model(model) is not None:
        return install_dit_stage(model, stage)
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
    kinds = comfy.patcher_extension.WrappersMP
    for kind, fn in ((kinds.OUTER_SAMPLE, outer_sample_wrapper), (kinds.APPLY_MODEL, apply_model_wrapper),
                     (kinds.CALC_COND_BATCH, calc_cond_batch_wrapper)):
        if HOLDER_KEY not in wrappers.get(kind, {}):
            m.add_wrapper_with_key(kind, HOLDER_KEY, fn)
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
