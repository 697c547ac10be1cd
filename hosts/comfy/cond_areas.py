"""Which part of the latent each conditioning's rows see, recorded per sampler call (ComfyUI host).

ComfyUI narrows the model's input to an area-conditioned prompt's area before the UNet runs
(``comfy.samplers._calc_cond_batch``) and hands the attention only the conditionings' ids (``uuids``): a
``CALC_COND_BATCH`` wrapper (:func:`calc_cond_batch_wrapper`) records the full latent and each id's area in the
run's state, and :func:`chunk_fields` turns a layer call's ids back into one :class:`.Field` per chunk. Areas
outside the latent are refused before any model call (:func:`check_areas`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ...attention.field import Field, check_area, clip_area
from ...attention.run_state import CondCall, RunState

HOLDER_KEY = "cxr_counterfactual"


def holder(options: dict) -> RunState | None:
    """The run's state in ``transformer_options`` (None: no CXR stage on this model)."""
    return options.get(HOLDER_KEY)


def chunk_fields(extra: dict) -> list[Field]:
    """One :class:`Field` per chunk of this model call (``uuids``: one conditioning id per chunk).

    ``original_shape`` is the input the UNet got: the area of an area-conditioned chunk, not the latent. The
    full latent and each conditioning's area come from the run's :class:`CondCall` (recorded by
    :func:`calc_cond_batch_wrapper`); without it (a probe pass with no per-run holder, another caller of the
    model) the input is its own latent.
    """
    shape = (int(extra["original_shape"][-2]), int(extra["original_shape"][-1]))
    own = Field(shape)
    labels = extra.get("cond_or_uncond") or [0]
    state = holder(extra)
    call = state.call if state is not None else None
    uuids = extra.get("uuids")
    if call is None or uuids is None or len(uuids) != len(labels):
        return [own] * len(labels)
    out = []
    for u in uuids:
        area = call.areas.get(u)
        if area is not None and area[:2] == shape:
            out.append(Field(call.latent, area))
        else:  # no area (or not the one this input was narrowed to): the input is the whole latent
            out.append(Field(call.latent) if shape == call.latent else own)
    return out


def _raw_area(cond: dict, latent: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A conditioning's area in latent cells as ComfyUI will resolve it (``resolve_areas_and_cond_masks_multidim``;
    a "mask bounds" area lies within its mask, so inside the latent: None)."""
    area = cond.get("area")
    if area is None or len(area) < 4:
        return None
    if area[0] == "percentage":
        a = area[1:]
        n = len(a) // 2
        return (max(1, round(a[0] * latent[0])), max(1, round(a[1] * latent[1])), round(a[n] * latent[0]),
                round(a[n + 1] * latent[1]))
    if len(area) != 4:  # areas of latents with more dimensions (video): not ours to check
        return None
    return tuple(int(v) for v in area)  # type: ignore[return-value]


def area_node(cond: dict) -> str:
    area = cond.get("area")
    if area is not None and area[0] == "percentage":
        return "ConditioningSetAreaPercentage"
    return "ConditioningSetMask" if "mask" in cond else "ConditioningSetArea"


def check_areas(conds: Mapping | None, latent: tuple[int, int]) -> None:
    """Refuse any conditioning whose area lies outside a ``latent``-sized input (before sampling).

    Raises:
        CXRInputError: naming the area's node and its position inputs.
    """
    for group in (conds or {}).values():
        for cond in group or ():
            area = _raw_area(cond, latent)
            if area is not None:
                check_area(area, latent, node=area_node(cond))


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """Record, for this call of the conditionings, the full latent, each conditioning's resolved area by its id
    (ComfyUI narrows the model's input to it; ``transformer_options`` carries only the ids) and which of the
    call's lists are the positive prompt's; refuse an area outside the latent before the model runs."""
    state = holder(model_options.get("transformer_options", {}))
    if state is None or x_in.ndim != 4:
        return executor(model, conds, x_in, timestep, model_options)
    latent = (int(x_in.shape[-2]), int(x_in.shape[-1]))
    call = CondCall(latent)
    positive = (getattr(state.guider, "conds", None) or {}).get("positive")
    lists = []
    for group in conds:
        ids = []
        for cond in group or ():
            if "area" in cond and len(cond["area"]) == 4 and cond["area"][0] != "percentage":
                check_area(cond["area"], latent, node=area_node(cond))
                if "uuid" in cond:
                    call.areas[cond["uuid"]] = clip_area(cond["area"], latent)
            if "uuid" in cond:
                ids.append(cond["uuid"])
        # The guider's positive list itself (ComfyUI may add the negative's area copies to it), or a list of positive
        # conditionings only (a pack's filtered copy); never a list holding the negative prompt's own ids.
        lists.append(group is not None and (group is positive or (
            bool(ids) and state.positive is not None and all(u in state.positive for u in ids))))
    if positive is not None or (state.positive is not None and all(any("uuid" in c for c in g) for g in conds if g)):
        call.positive = tuple(lists)
    state.call = call
    try:
        return executor(model, conds, x_in, timestep, model_options)
    finally:
        state.call = None
