"""Pathology boosting and attention capture: the core formula, and the nodes inside the real ComfyUI."""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import gate, sample
from node_run import run

from conftest import DEVICES
from cxr_counterfactual.attention.boosting import boosted_share, pathology_boost_bias, token_probabilities


@pytest.mark.parametrize("device", DEVICES)
def test_boosted_share_follows_the_documented_formula(device):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 12, 8, generator=g).to(device), torch.randn(1, 2, 16, 8, generator=g).to(device)
    inside = torch.tensor([True] * 6 + [False] * 6)  # the stage builds its bias from CPU masks, then moves it
    cols = torch.tensor([3, 4, 11, 12], device=device)  # a two-token word, the context repeated twice (cond_len 8)
    before = token_probabilities(q, k, None, cols).sum(-1)
    for f, d in ((1.0, 1.0), (2.0, 1.0), (5.0, 0.5), (0.5, 0.0)):
        bias = pathology_boost_bias(inside, {"effusion": (3, 4)}, {"effusion": f}, 8, 16, damping=d).to(device)
        after = token_probabilities(q, k, bias, cols).sum(-1)
        on = inside.to(device)
        torch.testing.assert_close(after[..., on], boosted_share(before[..., on], f))
        torch.testing.assert_close(after[..., ~on], boosted_share(before[..., ~on], d))
    with pytest.raises(ValueError, match="multiple"):
        pathology_boost_bias(inside, {"e": (1,)}, {"e": 2.0}, 8, 12)


def boost(comfy, model, chest, **overrides):
    inputs = dict(model=model, tokens=chest.tokens, organ_masks=chest.masks, end_percent=0.5)
    return run(comfy.node("CXRPathologyBoost"), **{**inputs, **overrides})[0]


def capture(comfy, model, chest, label="run", grid_factor="1", **overrides):
    inputs = dict(model=model, tokens=chest.tokens, label=label, grid_factor=grid_factor, organ_masks=chest.masks)
    return run(comfy.node("CXRCaptureAttention"), **{**inputs, **overrides})[0]


def test_factor_one_is_the_unpatched_model_and_effect_grows(comfy, tiny_model, chest):
    assert boost(comfy, tiny_model.model, chest, factor=1.0) is tiny_model.model
    # switched off by its factor, a boost needs no target (saved graphs with the masks unplugged keep loading)
    assert boost(comfy, tiny_model.model, chest, factor=1.0, organ_masks=None) is tiny_model.model
    base = sample(comfy, tiny_model.model, chest)
    diffs = [float((sample(comfy, boost(comfy, tiny_model.model, chest, factor=f), chest) - base).abs().mean())
             for f in (1.5, 3.0, 10.0)]
    assert 0 < diffs[0] < diffs[1] < diffs[2], diffs


def test_probe_boost_runs_inside_its_window_only(comfy, tiny_model, chest):
    from cxr_counterfactual.hosts.comfy.patch import run_state

    # Damping outside the target keeps the stage active at every layer inside the window: without it the coarse
    # grids of an SD1.5-shaped UNet at this 64 px size (2×2, 1×1), where the left lung covers no token, are
    # stock by design, and the window would not be all that decides.
    patched = boost(comfy, tiny_model.model, chest, end_percent=0.5, outside_damping=0.5)
    run_state(patched).trace_enabled = True
    sample(comfy, patched, chest, steps=6)
    trace = [t for t in run_state(patched).store.latest().trace if t[0] == "attn2"]
    sigma_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    by_sigma: dict[float, set] = {}
    for _, _, s, on in trace:
        by_sigma.setdefault(s, set()).add(on)
    assert len(by_sigma) == 6
    assert all(v == {s >= sigma_end} for s, v in by_sigma.items())


def test_capture_never_changes_the_result(comfy, tiny_model, chest):
    base = sample(comfy, tiny_model.model, chest)
    assert torch.equal(sample(comfy, capture(comfy, tiny_model.model, chest), chest), base)


def test_boost_raises_the_captured_in_target_share_at_every_step(comfy, tiny_model, chest):
    from cxr_counterfactual.hosts.comfy.patch import run_state

    sigma_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    shares = {}
    for label, model in (("stock", tiny_model.model), ("boosted", boost(comfy, tiny_model.model, chest))):
        m = capture(comfy, model, chest, label=label)
        sample(comfy, m, chest, steps=6)
        steps = run_state(m).store.latest().capture[label].steps
        shares[label] = {s: st.share_sum / st.share_layers for s, st in steps.items() if s >= sigma_end}
    assert len(shares["stock"]) == 3
    for s, stock_share in shares["stock"].items():
        assert shares["boosted"][s] > stock_share + 0.01, (s, stock_share, shares["boosted"][s])


def test_gate_and_boost_compose_in_either_order(comfy, tiny_model, chest):
    a = boost(comfy, gate(comfy, tiny_model.model, chest), chest)
    b = gate(comfy, boost(comfy, tiny_model.model, chest), chest)
    out_a, out_b = sample(comfy, a, chest), sample(comfy, b, chest)
    torch.testing.assert_close(out_a, out_b)
    assert not torch.equal(out_a, sample(comfy, gate(comfy, tiny_model.model, chest), chest))


def test_preview_shows_the_run_that_made_the_latent(comfy, tiny_model, chest):
    m = capture(comfy, boost(comfy, tiny_model.model, chest), chest, label="boosted")
    preview = comfy.node("CXRAttentionPreview")
    image = torch.rand(1, 64, 56, 3)

    def latent(seed):
        return {"samples": sample(comfy, m, chest, seed=seed)}

    first, second, third = latent(5), latent(6), latent(5)
    assert torch.equal(first["samples"], third["samples"])
    grids = [run(preview, image=image, model_1=m, latent_1=x)[0] for x in (first, second, third)]
    assert torch.equal(grids[0], grids[2]) and not torch.equal(grids[0], grids[1])
    assert grids[0].shape[0] == 1 and grids[0].shape[-1] == 3
    stock_latent = {"samples": sample(comfy, tiny_model.model, chest)}
    with pytest.raises(ValueError, match=r"\[CXR Attention Preview\].*captured nothing"):
        run(preview, image=image, model_1=tiny_model.model, latent_1=stock_latent)
    stock = capture(comfy, tiny_model.model, chest, label="stock")
    two = run(preview, image=image, model_1=m, latent_1=first, model_2=stock,
              latent_2={"samples": sample(comfy, stock, chest)})
    assert two[0].shape[1] > grids[0].shape[1]  # two rows
    assert two[1].shape[1:] == (360, 640, 3)


def test_bad_inputs(comfy, tiny_model, chest):
    with pytest.raises(ValueError, match=r"\[CXR Pathology Boost\].*'pneumothorax'"):
        boost(comfy, tiny_model.model, chest, words="pneumothorax=3")
    with pytest.raises(ValueError, match=r"\[CXR Pathology Boost\].*'target_mask'.*empty"):
        boost(comfy, tiny_model.model, chest, target_mask=torch.zeros(1, 64, 56))
    tiny_target = torch.zeros(1, 64, 56)
    tiny_target[0, 30, 30] = 1
    m = capture(comfy, tiny_model.model, chest, grid_factor="2", organ_masks=None)
    assert m is not None
    from cxr_counterfactual.attention.organs import OrganMasks

    small = OrganMasks.from_dict({"left_lung": tiny_target[0], "right_lung": tiny_target[0], "heart": tiny_target[0]})
    m = capture(comfy, tiny_model.model, chest, grid_factor="2", organ_masks=small)
    with pytest.raises(ValueError, match=r"\[CXR Capture Attention\].*covers no token.*grid_factor"):
        sample(comfy, m, chest)
