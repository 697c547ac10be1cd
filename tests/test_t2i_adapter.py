"""Every CXR stage with a T2I-Adapter applied through ComfyUI's own nodes (ControlNetLoader + Apply ControlNet),
and the refusal of an adapter that does not fit the model.

The adapter and the SD1.5-detected UNet it fits are the random-weight pair of ``testing/tiny_t2i_adapter.py``
(the repo's tiny SD1.5 UNet, 320 channels at every level, does not fit a 320-channel adapter); the hint is the real
CheXmask radiograph at the latent's image size (64 px, latent 8×7). Few steps at 64 px: the fitting UNet has
SD1.5's 1280-channel levels (654 M parameters), which make each model call cost about 10× the tiny SD1.5's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import chexmask_radiograph, fitted_chest, gate
from energy_probe import comfy_energy
from host_fixtures import load_checkpoint
from node_run import run

from cxr_counterfactual.errors import CXRInputError

STEPS, CFG, SEED = 3, 5.0, 3
# tests/test_refinement.py's settings but the grid: factor 1 (the 8×7 latent's own grid), as at 64 px in
# tests/test_keep_inversion.py.
ITERATIONS, STEP_SIZE, END_PERCENT, GRID, SMOOTHING = 5, 0.5, 0.7, "1", 0.0
SIDE = 64  # px: latent 8×7; the model's 1280-channel levels make each model call cost most of a test's time
ROUNDING = 1e-5  # relative to the latent's largest value, as in tests/test_keep_inversion.py


@pytest.fixture(scope="module")
def t2i_files(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(checkpoint, adapter)``: built once per module (≈ 1.6 GB, deleted afterwards)."""
    from cxr_counterfactual.hosts.comfy.standalone import prepare_comfy_import
    from cxr_counterfactual.testing.tiny_t2i_adapter import ensure_tiny_t2i

    prepare_comfy_import(comfyui_path)
    folder = tmp_path_factory.mktemp("tiny-t2i")
    files = ensure_tiny_t2i(folder)
    yield files
    for built in folder.glob("*.safetensors"):
        built.unlink(missing_ok=True)


def load_adapter(comfy, path: Path):
    """The adapter by name through ComfyUI's ``ControlNetLoader`` (which loads T2I-Adapters too)."""
    import folder_paths

    folder_paths.add_model_folder_path("controlnet", str(path.parent))
    with torch.inference_mode():
        return comfy.node("ControlNetLoader")().load_controlnet(path.name)[0]


def hint_image(comfy, chexmask_example: Path, max_side: int) -> torch.Tensor:
    """The radiograph as CXRFitToModel gives it for the latent: the image size the latent stands for."""
    image, masks = chexmask_radiograph(chexmask_example)
    with torch.inference_mode():
        return run(comfy.node("CXRFitToModel"), image=image, max_side=max_side, organ_masks=masks)[0]


def with_control(comfy, chest: SimpleNamespace, control_net, hint: torch.Tensor, strength: float = 1.0):
    """``chest`` with its positive and negative through ComfyUI's Apply ControlNet (ControlNetApplyAdvanced)."""
    with torch.inference_mode():
        positive, negative = comfy.node("ControlNetApplyAdvanced")().apply_controlnet(
            chest.positive, chest.negative, control_net, hint, strength, 0.0, 1.0)
    return SimpleNamespace(**{**vars(chest), "positive": positive, "negative": negative})


@pytest.fixture(scope="module")
def t2i(comfy, t2i_files, chexmask_example):
    """The fitting checkpoint, the adapter, the 64 px chest without (``plain``) and with (``c``) the adapter."""
    checkpoint, adapter_path = t2i_files
    loaded = load_checkpoint(comfy, checkpoint)
    adapter = load_adapter(comfy, adapter_path)
    plain = fitted_chest(comfy, loaded, chexmask_example, max_side=SIDE, steps=STEPS)
    assert plain.latent["samples"].shape[-2:] == (8, 7)
    hint = hint_image(comfy, chexmask_example, SIDE)
    assert hint.shape[1:3] == (64, 56)  # the latent's image size
    return SimpleNamespace(model=loaded.model, adapter=adapter, hint=hint, plain=plain,
                           c=with_control(comfy, plain, adapter, hint))


def sample(comfy, model, c, sampler=None, latent=None):
    sampler = sampler or comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(model, True, SEED, CFG, c.positive, c.negative, sampler,
                                                   c.sigmas, latent or c.latent)[0]["samples"].clone()


def _no_misfit_warning(caplog) -> None:
    # ComfyUI's apply_control logs this (and skips the addition) when a feature does not fit its block.
    assert not [r for r in caplog.records if "control could not be applied" in r.getMessage()]


# ------------------------------------------------------------------------------------------------
def test_the_adapter_is_loaded_as_a_t2i_adapter_and_changes_the_result(comfy, t2i, caplog):
    import comfy.controlnet as controlnet  # aliases: the fixture is called comfy
    import comfy.t2i_adapter.adapter as adapter_module

    assert isinstance(t2i.adapter, controlnet.T2IAdapter)
    assert isinstance(t2i.adapter.t2i_model, adapter_module.Adapter) and not t2i.adapter.t2i_model.xl
    with caplog.at_level(logging.WARNING):
        out = sample(comfy, t2i.model, t2i.c)
    _no_misfit_warning(caplog)
    base = sample(comfy, t2i.model, t2i.plain)
    assert torch.isfinite(out).all() and float((out - base).abs().mean()) > 1e-3


def test_the_adapter_reads_the_hint_only_never_the_latent(comfy, t2i):
    """Its features are computed from the hint alone (once per hint size, cached): the latent only sets their size
    and dtype, so the refinement's gradient pass has nothing to differentiate through them."""
    control = t2i.c.positive[0][1]["control"].copy()  # the same hint (copy_to), the runs' own cache untouched
    t = torch.tensor([500.0])
    outs = []
    for seed in (0, 1):
        control.control_input = None  # recompute from the hint for each latent
        x = torch.randn(1, 4, 8, 7, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():  # as ComfyUI samples: the features are computed on the first model call
            outs.append(control.get_control(x, t, {}, [1], {})["input"])
    # apply_control pops the list from its end: these reach input blocks 11, 8, 5 and 2
    assert [i for i, f in enumerate(outs[0]) if f is not None] == [0, 3, 6, 9]
    for a, b in zip(outs[0], outs[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # the same hint, different latents: same features
    x = torch.randn(1, 4, 8, 7).requires_grad_(True)
    with torch.enable_grad():  # later calls (a gradient pass among them) get copies of the cached features
        again = control.get_control(x, t, {}, [1], {})["input"]
    assert not any(f is not None and f.requires_grad for f in again)


def test_gate_applies_in_every_layer_inside_its_window_with_the_adapter(comfy, t2i, caplog):
    from cxr_counterfactual.hosts.comfy.patch import run_state
    from cxr_counterfactual.hosts.comfy.unet_layout import transformer_keys

    patched = gate(comfy, t2i.model, t2i.c, start_percent=0.0, end_percent=0.5)
    state = run_state(patched)
    state.trace_enabled = True
    with caplog.at_level(logging.WARNING):
        out = sample(comfy, patched, t2i.c)
    _no_misfit_warning(caplog)
    trace = state.store.latest().trace
    keys = transformer_keys(t2i.model)
    sigma_end = float(t2i.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    sigmas = sorted({s for _, _, s, _ in trace}, reverse=True)
    assert len(sigmas) == STEPS and {s >= sigma_end for s in sigmas} == {True, False}
    for kind in ("attn1", "attn2"):
        for sigma in sigmas:
            calls = {key: gated for k, key, s, gated in trace if k == kind and s == sigma}
            assert set(calls) == set(keys) and set(calls.values()) == {sigma >= sigma_end}, (kind, sigma)
    assert torch.isfinite(out).all() and not torch.equal(out, sample(comfy, t2i.model, t2i.c))


def test_boost_raises_the_captured_share_with_the_adapter(comfy, t2i):
    from cxr_counterfactual.hosts.comfy.patch import run_state

    c = t2i.c
    boosted = run(comfy.node("CXRPathologyBoost"), model=t2i.model, tokens=c.tokens, organ_masks=c.masks,
                  end_percent=1.0)[0]
    shares = {}
    for label, model in (("stock", t2i.model), ("boosted", boosted)):
        m = run(comfy.node("CXRCaptureAttention"), model=model, tokens=c.tokens, label=label, grid_factor="1",
                organ_masks=c.masks)[0]
        out = sample(comfy, m, c)
        steps = run_state(m).store.latest().capture[label].steps
        shares[label] = {s: st.share_sum / st.share_layers for s, st in steps.items()}
        if label == "stock":  # capture alone never changes the result
            assert torch.equal(out, sample(comfy, t2i.model, c))
    assert len(shares["stock"]) == STEPS
    for s, stock in shares["stock"].items():
        assert shares["boosted"][s] > stock + 0.01, (s, stock, shares["boosted"][s])


def test_refinement_lowers_the_independently_measured_energy_with_the_adapter(comfy, t2i):
    c, model = t2i.c, t2i.model
    inputs = dict(tokens=c.tokens, organ_masks=c.masks, iterations=ITERATIONS, step_size=STEP_SIZE,
                  end_percent=END_PERCENT, grid_factor=GRID, smoothing=SMOOTHING)
    refiner = run(comfy.node("CXRRefinementSampler"), **inputs)[0]
    stock = run(comfy.node("CXRRefinementSampler"), **{**inputs, "iterations": 0})[0]
    out = sample(comfy, model, c, refiner)
    refined = refiner.sampler_function.store.for_latent(out).refine
    assert len(refined) >= 1
    for st in refined:
        before = comfy_energy(comfy, model, c, st.latent_before, st.sigma, grid_factor=int(GRID), smoothing=SMOOTHING)
        after = comfy_energy(comfy, model, c, st.latent_after, st.sigma, grid_factor=int(GRID), smoothing=SMOOTHING)
        assert before == pytest.approx(st.before, abs=1e-3) and after == pytest.approx(st.after, abs=1e-3)
        print(f"T2I-Adapter refined step {st.step}: energy {before:.4f} -> {after:.4f}")
        assert after < before, (st.step, before, after)
    # 0 iterations is the stock sampler: the adapter acts the same in both
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    assert torch.equal(sample(comfy, model, c, stock), sample(comfy, model, c, euler))


def test_keep_region_ends_exactly_at_the_source_with_the_adapter(comfy, t2i):
    from cxr_counterfactual.nodes.keep import latent_keep_mask

    c = t2i.c
    edit = run(comfy.node("CXREditKeepRegions"), organ_masks=c.masks, edit_organs="left_lung", margin_px=2,
               feather_px=1.5, protect="heart")[0]
    latent = run(comfy.node("CXRApplyKeepRegion"), latent=c.latent, edit_region=edit)[0]
    src, keep = latent["samples"], latent_keep_mask(latent["noise_mask"], latent["samples"])
    assert 0 < int(keep.sum()) < keep.numel()
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(t2i.model, 7, STEPS, 2.0, "euler", "normal", c.positive, c.negative,
                                              latent)[0]
    drift = float((out["samples"] - src)[keep].abs().max())
    assert drift <= ROUNDING * float(src.abs().max()), drift
    pasted = run(comfy.node("CXRPasteKeepRegion"), samples=out, source=latent)[0]["samples"]
    assert torch.equal(pasted[keep], src[keep]) and torch.equal(pasted[~keep], out["samples"][~keep])
    assert float((pasted - src)[~keep].abs().mean()) > 0.05  # the edit region changed


def test_inversion_regenerates_the_patient_with_the_adapter(comfy, t2i):
    """Inverted and regenerated with the adapter on both passes: the regeneration stays far closer to the source
    than img2img or a no-op inversion (as tests/test_keep_inversion.py shows without it)."""
    c, model, src = t2i.c, t2i.model, t2i.c.latent["samples"]
    # 8 steps from 0.5, 2 refinements each (the defaults 20 and 4 cost minutes here). Measured: mean |latent error|
    # 0.41 against img2img 8.5 and no-op 2.3; with 6 steps and 1 refinement 1.03, too close to the bound.
    with torch.inference_mode():
        inverted, _noise, sigmas = run(comfy.node("CXRInvertLatent"), model=model, positive=c.positive,
                                       negative=c.negative, latent=c.latent, steps=8, refine=2)
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    outs = {}
    for name, start, add in (("inversion", inverted, False), ("img2img", c.latent, True), ("no-op", c.latent, False)):
        with torch.inference_mode():
            outs[name] = comfy.node("SamplerCustom")().sample(model, add, 1, 1.0, c.positive, c.negative, euler,
                                                              sigmas, start)[0]["samples"]
    errors = {k: float((v - src).abs().mean()) for k, v in outs.items()}
    print("T2I-Adapter reconstruction, mean |latent error|:", {k: round(v, 4) for k, v in errors.items()})
    assert errors["inversion"] <= 0.5 * min(errors["img2img"], errors["no-op"]), errors


@pytest.mark.parametrize("xl", [False, True])
def test_feature_points_match_what_the_adapter_returns(comfy, xl):
    """adapter_feature_points against ComfyUI's own Adapter.forward, on a narrow adapter (8 channels) and a
    64 px hint (latent 8×8): which input block (list position as apply_control pops it) gets which channels
    at which grid, and the SDXL form's middle-block feature."""
    import comfy.t2i_adapter.adapter as t2i_module

    from cxr_counterfactual.hosts.comfy.control_checks import adapter_feature_points

    cin = 256 if xl else 192  # 1 grey channel unshuffled by 16 (SDXL form) or 3 RGB ones by 8
    adapter = t2i_module.Adapter(channels=[8, 16, 32, 32], nums_rb=2, cin=cin, ksize=1, sk=True, use_conv=False,
                                 xl=xl)
    with torch.no_grad():
        out = adapter(torch.rand(1, cin // adapter.unshuffle_amount ** 2, 64, 64))
    popped = out["input"][::-1]  # apply_control pops from the end: block k gets popped[k]
    seen = [(k, f.shape[1], 8 // f.shape[-1]) for k, f in enumerate(popped) if f is not None]
    points, middle = adapter_feature_points(adapter)
    assert points == seen
    if xl:
        (feature,) = out["middle"]
        assert middle == (feature.shape[1], 8 // feature.shape[-1]) and [b for b, _, _ in points] == [3, 5, 8]
    else:
        assert middle is None and "middle" not in out and [b for b, _, _ in points] == [2, 5, 8, 11]


# ------------------------------------------------------------------------------------------------
# bad input: an adapter on a model it does not fit
def test_an_adapter_on_a_model_it_does_not_fit_is_refused_before_any_model_call(comfy, t2i, tiny_model, chest,
                                                                                caplog):
    from comfy.patcher_extension import WrappersMP

    misfit = with_control(comfy, chest, t2i.adapter, t2i.hint)

    def ksampler(model, c):
        with torch.inference_mode():
            return comfy.node("KSampler")().sample(model, 1, 2, CFG, "euler", "normal", c.positive, c.negative,
                                                   c.latent)[0]["samples"]

    # Why the check: without it ComfyUI skips every misfit feature with a warning, so the adapter does nothing at
    # all (exactly: the additions are skipped, nothing else differs).
    with caplog.at_level(logging.WARNING):
        unchecked = ksampler(tiny_model.model, misfit)
    assert any("control could not be applied" in r.getMessage() for r in caplog.records)
    assert torch.equal(unchecked, ksampler(tiny_model.model, chest))
    gated = gate(comfy, tiny_model.model, misfit)
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    gated.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "cxr_test_count", count)
    with pytest.raises(CXRInputError) as info:
        ksampler(gated, misfit)
    assert calls == []
    text = str(info.value)
    assert text.startswith("[Apply ControlNet] input 'control_net': ")
    assert "input block 5: adapter 640 channels at latent ÷ 2, model 320 at ÷ 4" in text
    assert "Fix: load a T2I-Adapter made for this model's family" in text
    # the fitting model with the same adapter passes the same check
    from cxr_counterfactual.hosts.comfy.control_checks import check_controls

    check_controls({"positive": [t2i.c.positive[0][1]]}, (1, 4, 8, 7),
                   t2i.model.model.diffusion_model)

