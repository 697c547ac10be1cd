"""Area and masked conditioning: each conditioning's region labels are the organ masks cropped to its area.

ComfyUI narrows the model's input to a conditioning's area before the UNet runs (``comfy.samplers.get_area_and_mult``)
and batches conditionings by input shape alone. The gate must label each chunk's tokens from the masks under that
chunk's area. A recorder on the gate's per-group call keeps the partition the pass really used, with the rows'
conditioning labels; each is compared, exactly (same labels), with an independent computation: the fitted masks
(8 px per latent cell) sliced to the area's pixels, then partitioned on the layer's grid as a whole latent of the
area's size. Real ComfyUI in-process, the tiny SD1.5 checkpoint, the CheXmask radiograph at 128 px (latent 16×14).
"""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import gate
from node_run import run

from cxr_counterfactual.attention.regions import partition
from cxr_counterfactual.errors import CXRInputError

ORGANS = ("right_lung", "left_lung", "heart")
STEPS = 2


@pytest.fixture
def recorder(monkeypatch):
    """Every gated group of every layer call: (call number, field, labels, cond_or_uncond of its rows)."""
    from cxr_counterfactual.hosts.comfy.patch import CXRReplace

    seen: list[tuple[int, object, torch.Tensor, tuple[int, ...]]] = []
    calls = [0]
    original_call, original_gate = CXRReplace.__call__, CXRReplace._gate

    def call(self, q, k, v, extra):
        calls[0] += 1
        return original_call(self, q, k, v, extra)

    def gated(self, stage, q, k, v, extra, state, field):
        h, w = (int(n) for n in extra["activations_shape"][-2:])
        part = stage.partition(h, w, field, q.device)
        seen.append((calls[0], field, part.labels.cpu().clone(), tuple(extra.get("cond_or_uncond") or ())))
        return original_gate(self, stage, q, k, v, extra, state, field)

    monkeypatch.setattr(CXRReplace, "__call__", call)
    monkeypatch.setattr(CXRReplace, "_gate", gated)
    return seen


def expected_labels(masks, area, grid):
    """The independent labels: the masks' pixels under ``area`` (latent cells, 8 px each), partitioned on ``grid``
    as a latent of the area's size (None: the whole latent)."""
    if area is not None:
        h, w, y, x = area
        scale = masks.height // 16
        assert scale * 16 == masks.height and scale * 14 == masks.width  # Fit Radiograph to Model: 8 px per cell
        cropped = masks.data[:, y * scale:(y + h) * scale, x * scale:(x + w) * scale]
        masks = type(masks)(masks.names, cropped)
        latent = (h, w)
    else:
        latent = (16, 14)
    return partition(masks, ORGANS, *grid, latent=latent).labels


def sample(comfy, model, positive, negative, latent, seed=3):
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, seed, STEPS, 5.0, "euler", "normal", positive, negative,
                                              latent, denoise=1.0)[0]
    return out["samples"]


def check(seen, masks, areas: set, *, uncond: bool = False):
    """Every recorded group's labels equal the independent ones; the areas seen are ``areas`` (None: whole latent);
    with ``uncond``, the negative prompt's rows were gated under an area too."""
    assert seen, "the gate never ran"
    found = set()
    for _, field, labels, _ in seen:
        assert field.latent == (16, 14)
        grid = _grid_of(labels, field)
        assert torch.equal(labels, expected_labels(masks, field.area, grid)), (field, grid)
        found.add(field.area)
    assert found == areas
    if uncond:
        assert any(1 in cou and field.area is not None for _, field, _, cou in seen)
    return found


def _grid_of(labels, field):
    """The h×w of a recorded partition: the grids of the field's size, level by level."""
    h, w = field.size
    while h * w != labels.numel():
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def area_cond(comfy, cond, width, height, x, y):
    return comfy.nodes.ConditioningSetArea().append(cond, width, height, x, y, 1.0)[0]


def test_odd_offsets_non_square_area_and_the_negative_given_the_same_area(comfy, tiny_model, chest128, recorder):
    """Area 64×72 px at x 24, y 40: (h, w, y, x) = (9, 8, 5, 3) cells, odd offsets and sides, not square; the
    negative prompt gets the same area and the gate applies to it."""
    patched = gate(comfy, tiny_model.model, chest128, apply_to_uncond=True)
    positive = area_cond(comfy, chest128.positive, 64, 72, 24, 40)
    negative = area_cond(comfy, chest128.negative, 64, 72, 24, 40)
    sample(comfy, patched, positive, negative, chest128.latent)
    check(recorder, chest128.masks, {(9, 8, 5, 3)}, uncond=True)
    sizes = {labels.numel() for _, _, labels, _ in recorder}
    assert sizes == {72, 20, 6, 2}  # 9×8, 5×4, 3×2, 2×1: every gated level of the crop


def test_two_same_size_areas_batched_together_each_get_their_own_labels(comfy, tiny_model, chest128, recorder):
    patched = gate(comfy, tiny_model.model, chest128, apply_to_uncond=False)  # positive rows only: their areas
    a = area_cond(comfy, chest128.positive, 64, 64, 8, 16)  # (8, 8, 2, 1)
    b = area_cond(comfy, chest128.positive, 64, 64, 48, 56)  # (8, 8, 7, 6)
    both = comfy.nodes.ConditioningCombine().combine(a, b)[0]
    sample(comfy, patched, both, chest128.negative, chest128.latent)
    # the negative prompt has no area: ComfyUI gives it a copy under each positive area (with the positive's id and
    # the negative's text); the gate is off for the negative, so only positive rows are gated, under their areas
    check(recorder, chest128.masks, {(8, 8, 2, 1), (8, 8, 7, 6)})
    assert all(cou and set(cou) == {0} for *_, cou in recorder)
    per_call: dict[int, set] = {}
    for n, field, _, _ in recorder:
        per_call.setdefault(n, set()).add(field.area)
    assert any(len(areas) == 2 for areas in per_call.values()), "the two areas never ran in one batch"


def test_area_percentage(comfy, tiny_model, chest128, recorder):
    patched = gate(comfy, tiny_model.model, chest128, apply_to_uncond=False)  # positive rows only: their areas
    width, height, x, y = 0.5, 0.6, 0.3, 0.2
    positive = comfy.nodes.ConditioningSetAreaPercentage().append(chest128.positive, width, height, x, y, 1.0)[0]
    sample(comfy, patched, positive, chest128.negative, chest128.latent)
    # ComfyUI's rule (resolve_areas_and_cond_masks_multidim): sizes max(1, round(f·n)), offsets round(f·n)
    area = (max(1, round(height * 16)), max(1, round(width * 14)), round(y * 16), round(x * 14))
    assert area == (10, 7, 3, 4)
    check(recorder, chest128.masks, {area})


def test_set_mask_with_mask_bounds_and_without(comfy, tiny_model, chest128, recorder):
    patched = gate(comfy, tiny_model.model, chest128, apply_to_uncond=False)  # positive rows only: their areas
    mask = torch.zeros(1, 16, 14)
    mask[:, 3:12, 5:13] = 1.0  # 9×8 cells at y 3, x 5 (on the latent's grid, so ComfyUI's resize keeps it)
    bounded = comfy.nodes.ConditioningSetMask().append(chest128.positive, mask, "mask bounds", 1.0)[0]
    sample(comfy, patched, bounded, chest128.negative, chest128.latent)
    check(recorder, chest128.masks, {(9, 8, 3, 5)})
    recorder.clear()
    plain = comfy.nodes.ConditioningSetMask().append(chest128.positive, mask, "default", 1.0)[0]
    sample(comfy, patched, plain, chest128.negative, chest128.latent)
    check(recorder, chest128.masks, {None})  # no bounds: the whole latent, as before


def test_area_outside_the_latent_is_refused_before_sampling(comfy, tiny_model, chest128):
    patched = gate(comfy, tiny_model.model, chest128)
    outside = area_cond(comfy, chest128.positive, 64, 64, 112, 0)  # x 112 px = cell 14 of a 14-cell-wide latent
    with pytest.raises(CXRInputError, match=r"\[ConditioningSetArea\] input 'x / y.*outside the 16×14-cell"):
        sample(comfy, patched, outside, chest128.negative, chest128.latent)
    late = comfy.nodes.ConditioningSetAreaPercentage().append(chest128.positive, 0.5, 0.5, 0.0, 1.0, 1.0)[0]
    with pytest.raises(CXRInputError, match=r"\[ConditioningSetAreaPercentage\].*y=16"):
        sample(comfy, patched, late, chest128.negative, chest128.latent)


def test_boost_under_an_area_uses_the_target_cropped_to_it(comfy, tiny_model, chest128):
    """The boost's target under an area is the target cropped to it: a target that lies outside the area gives
    no boost inside it (the result equals the unboosted model's), one inside it changes the result."""
    from cxr_counterfactual.attention.stage_builders import target_region

    boost = comfy.node("CXRPathologyBoost")
    positive = area_cond(comfy, chest128.positive, 112, 64, 0, 0)  # (8, 14, 0, 0): the top half
    target = target_region(chest128.masks, "left_lung")
    bottom = target.data[0].clone()
    bottom[:64] = 0  # only the latent's bottom half: outside the area
    plain = sample(comfy, tiny_model.model, positive, chest128.negative, chest128.latent)
    away = run(boost, model=tiny_model.model, tokens=chest128.tokens, target_mask=bottom[None], factor=5.0)[0]
    assert torch.equal(sample(comfy, away, positive, chest128.negative, chest128.latent), plain)
    inside = run(boost, model=tiny_model.model, tokens=chest128.tokens, target_mask=target.data, factor=5.0)[0]
    assert not torch.equal(sample(comfy, inside, positive, chest128.negative, chest128.latent), plain)
