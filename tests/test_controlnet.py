"""ControlNet with every stage, inside the real ComfyUI.

The ControlNet is ``testing/tiny_controlnet.py``'s random-weight one for the tiny checkpoint (zero convolutions drawn
non-zero, as in a trained ControlNet), loaded by ComfyUI's own ``ControlNetLoader`` and attached to both prompts by
``ControlNetApplyAdvanced``; its hint is the real CheXmask radiograph as CXR Fit Radiograph outputs it (128×112, the
image of the 16×14 latent).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cxr_helpers import chexmask_radiograph, fitted_chest, gate, sample
from energy_probe import comfy_energy
from node_run import run

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.testing.tiny_controlnet import ZERO_CONV_STD, build_tiny_controlnet

STEPS, CFG, SEED = 6, 5.0, 3
# The refinement at the node's defaults but for these (as tests/test_refinement.py: energy grid 4×4 at factor 4).
REFINE = dict(iterations=3, step_size=0.5, end_percent=0.5, grid_factor="4", smoothing=0.0)
ROUNDING = 1e-5  # the keep region's float rounding, relative to the latent's largest value (test_keep_inversion.py)


@pytest.fixture(scope="module")
def c(comfy, tiny_model, chexmask_example, tiny_controlnet):
    """The 128 px chest (masks, tokens, schedule) with the ControlNet on both prompts; ``plain`` without it."""
    image, masks = chexmask_radiograph(chexmask_example)
    chest = fitted_chest(comfy, tiny_model, chexmask_example, max_side=128, steps=STEPS)
    with torch.inference_mode():
        chest.image = run(comfy.node("CXRFitToModel"), image=image, max_side=128, organ_masks=masks)[0]
        chest.net = comfy.node("ControlNetLoader")().load_controlnet(tiny_controlnet)[0]
    assert chest.image.shape == (1, 128, 112, 3) and chest.latent["samples"].shape[-2:] == (16, 14)
    chest.plain = (chest.positive, chest.negative)
    chest.positive, chest.negative = controlled(comfy, chest, chest.image)
    return chest


def controlled(comfy, c, hint: torch.Tensor):
    """Positive and negative of ``c`` with the ControlNet applied by ComfyUI's Apply ControlNet, hint ``hint``."""
    with torch.inference_mode():
        return comfy.node("ControlNetApplyAdvanced")().apply_controlnet(*c.plain, c.net, hint, 1.0, 0.0, 1.0)


def plain(c):
    """``c`` without the ControlNet."""
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(c), "positive": c.plain[0], "negative": c.plain[1]})


def refiner(comfy, c, **overrides):
    return run(comfy.node("CXRRefinementSampler"), tokens=c.tokens, organ_masks=c.masks, **{**REFINE, **overrides})[0]


def sample_custom(comfy, model, c, sampler, latent=None, add_noise=True):
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(model, add_noise, SEED, CFG, c.positive, c.negative, sampler,
                                                   c.sigmas, latent or c.latent)[0]["samples"]


def boost(comfy, model, c):
    return run(comfy.node("CXRPathologyBoost"), model=model, tokens=c.tokens, organ_masks=c.masks, end_percent=0.5)[0]


def capture(comfy, model, c, label):
    return run(comfy.node("CXRCaptureAttention"), model=model, tokens=c.tokens, label=label, grid_factor="1",
               organ_masks=c.masks)[0]


def test_the_tiny_controlnet_is_comfyuis_and_seeded(comfy, c, tiny_checkpoint, tiny_controlnet, tmp_path):
    import comfy.controlnet as controlnet  # aliased: the fixture is called comfy
    from comfy.cldm.cldm import ControlNet

    net = c.net.control_model
    assert type(c.net) is controlnet.ControlNet and isinstance(net, ControlNet)
    assert net.input_hint_block[0].weight.shape[1] == 3  # an RGB hint, as Apply ControlNet passes an IMAGE
    zero = [p for n, p in net.named_parameters() if n.startswith(("zero_convs.", "middle_block_out."))
            and n.endswith(".weight")]
    # drawn non-zero (an untrained ControlNet's are zero: a no-op)
    assert len(zero) == len(net.input_blocks) + 1 and all(float(p.detach().std()) > ZERO_CONV_STD / 2 for p in zero)
    again = build_tiny_controlnet(tmp_path / "again.safetensors", seed=0)
    assert again.read_bytes() == (tiny_checkpoint.parent / tiny_controlnet).read_bytes()


def test_the_controlnet_acts_and_its_own_attention_stays_stock(comfy, tiny_model, c):
    """ComfyUI calls the ControlNet without ``transformer_options`` (``ControlNet.get_control`` passes none to
    ``cldm.ControlNet``, whose forward calls each block with ``(h, emb, context)`` only), so our replaces, which live in
    the model's transformer_options, cannot reach its attention: it stays the stock network it was trained as, while
    our organ masks regulate the UNet. Pinned: at the first step (same noise, same sigma) the ControlNet's residuals are
    bit-identical under the stock model and under gate + boost + capture, and our patches run exactly as often with
    the ControlNet as without."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    residuals: list[list[torch.Tensor]] = []

    def hook(module, args, kwargs, out):
        residuals.append([t.clone() for t in out["output"] + out["middle"]])

    regulated = capture(comfy, boost(comfy, gate(comfy, tiny_model.model, c), c), c, "stock-controlnet")
    run_state(regulated).trace_enabled = True
    handle = c.net.control_model.register_forward_hook(hook, with_kwargs=True)
    try:
        stock = sample(comfy, tiny_model.model, c, steps=2)
        first_stock = residuals[0]
        residuals.clear()
        sample(comfy, regulated, c, steps=2)
    finally:
        handle.remove()
    assert len(residuals) == 2  # one ControlNet call per step (cond and uncond batched)
    assert all(torch.equal(a, b) for a, b in zip(first_stock, residuals[0], strict=True))
    assert float((stock - sample(comfy, tiny_model.model, plain(c), steps=2)).abs().mean()) > 1e-3  # it acts
    with_net = len(run_state(regulated).store.latest().trace)
    sample(comfy, regulated, plain(c), steps=2)
    assert with_net == len(run_state(regulated).store.latest().trace) > 0


def test_gate_regulates_every_block_at_every_step_and_grows_with_strength(comfy, tiny_model, c):
    """As tests/test_gating_comfy.py, with the ControlNet on: the gate runs (hard, isolating) at every UNet block at
    every step inside its window only; strength 0 is the model itself; the effect grows with the strength."""
    from cxr_counterfactual.hosts.comfy.patch import run_state
    from cxr_counterfactual.hosts.comfy.unet_layout import transformer_keys

    patched = gate(comfy, tiny_model.model, c, start_percent=0.0, end_percent=0.5)
    run_state(patched).trace_enabled = True
    sample(comfy, patched, c)
    trace = run_state(patched).store.latest().trace
    sigma_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    sigmas = sorted({s for _, _, s, _ in trace}, reverse=True)
    assert len(sigmas) == 4 and {s >= sigma_end for s in sigmas} == {True, False}
    for kind in ("attn1", "attn2"):
        for sigma in sigmas:
            calls = {key: on for k, key, s, on in trace if k == kind and s == sigma}
            assert set(calls) == set(transformer_keys(tiny_model.model)), (kind, sigma)
            assert set(calls.values()) == {sigma >= sigma_end}, (kind, sigma)
    assert gate(comfy, tiny_model.model, c, strength=0.0, token_strength=0.0) is tiny_model.model
    base = sample(comfy, tiny_model.model, c)
    diffs = [float((sample(comfy, gate(comfy, tiny_model.model, c, strength=s, token_strength=s), c) - base)
                   .abs().mean()) for s in (1e-2, 1e-1, 1.0)]
    assert 0 < diffs[0] < diffs[1] < diffs[2], diffs


def test_boost_raises_the_captured_in_target_share_at_every_step(comfy, tiny_model, c):
    """As tests/test_boosting.py, with the ControlNet on: capture records every step, boosting raises the pathology
    word's share inside the target at every step of its window."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    sigma_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    shares = {}
    for label, model in (("stock", tiny_model.model), ("boosted", boost(comfy, tiny_model.model, c))):
        m = capture(comfy, model, c, label)
        sample(comfy, m, c, steps=6)
        steps = run_state(m).store.latest().capture[label].steps
        assert len(steps) == 6
        shares[label] = {s: st.share_sum / st.share_layers for s, st in steps.items() if s >= sigma_end}
    assert len(shares["stock"]) == 3
    for s, stock_share in shares["stock"].items():
        assert shares["boosted"][s] > stock_share + 0.01, (s, stock_share, shares["boosted"][s])


def test_refinement_lowers_the_independently_measured_energy(comfy, tiny_model, c):
    """The refinement sampler on the gated model with the ControlNet on: after each refined step the energy, measured
    by an independent capture pass (ComfyUI's ordinary forward, ControlNet included), is lower."""
    model, sampler = gate(comfy, tiny_model.model, c), refiner(comfy, c)
    out = sample_custom(comfy, model, c, sampler)
    record = sampler.sampler_function.store.for_latent(out).refine
    assert torch.isfinite(out).all() and len(record) >= 2
    for st in record:
        before = comfy_energy(comfy, model, c, st.latent_before, st.sigma, grid_factor=4, smoothing=0.0)
        after = comfy_energy(comfy, model, c, st.latent_after, st.sigma, grid_factor=4, smoothing=0.0)
        assert before == pytest.approx(st.before, abs=1e-3) and after == pytest.approx(st.after, abs=1e-3)
        assert after < before, (st.step, before, after)


def _gradient(energy, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(energy(xg).sum(), xg)
    return g


def test_the_gradient_pass_through_the_controlnet_both_ways(comfy, tiny_model, c):
    """Reproduced first: differentiating through the ControlNet's loaded (inference-tensor) weights fails, as the
    pass did before it knew ControlNets. Then both ways work: through clones of its weights, and with its residuals
    as constants (the default), and give the same gradient: the residuals enter the UNet after the middle block and in
    the decoder only, never the encoder layers the energy reads."""
    import comfy.samplers as samplers

    from cxr_counterfactual.hosts.comfy.refinement_energy import (
        control_parameters,
        energy_function,
        energy_layers,
        path_parameters,
    )

    ref = refiner(comfy, c).sampler_function.refinement
    seen: dict[str, object] = {}

    def probe_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        dm = model_k.inner_model.inner_model.diffusion_model
        path = path_parameters(dm, energy_layers(dm, tuple(x.shape[-2:]), ref.grid_factor)[0])
        clones = control_parameters(model_k)
        seen["clones"] = clones
        for mode, params in (("stale", path), ("differentiate", {**path, **clones}), ("constant", path)):
            energy = energy_function(ref, model_k, sigmas[0], extra_args, params, "differentiate" if mode == "stale"
                                     else mode)
            try:
                seen[mode] = _gradient(energy, x)
            except RuntimeError as err:
                seen[mode] = err
        return x

    sample_custom(comfy, gate(comfy, tiny_model.model, c), c, samplers.KSAMPLER(probe_sampler))
    assert "Inference tensors cannot be saved for backward" in str(seen["stale"])
    names = {f"controls.0.{n}" for n, _ in c.net.control_model.named_parameters()}
    assert set(seen["clones"]) == names  # type: ignore[arg-type]
    a, b = seen["differentiate"], seen["constant"]
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and float(b.abs().max()) > 0
    assert torch.equal(a, b)  # the same UNet ops on the same inputs: the ControlNet's branch adds nothing


def test_keep_region_ends_exactly_at_the_source(comfy, tiny_model, c):
    """As tests/test_keep_inversion.py, with the ControlNet on, for Euler and the refinement sampler (its gradient
    pass then runs the kept region from the source): the kept latent is the source up to rounding, exactly after the
    paste."""
    from cxr_counterfactual.nodes.keep import latent_keep_mask

    edit = run(comfy.node("CXREditKeepRegions"), organ_masks=c.masks, edit_organs="left_lung", margin_px=4,
               feather_px=3, protect="heart")[0]
    latent = run(comfy.node("CXRApplyKeepRegion"), latent=c.latent, edit_region=edit)[0]
    src, keep = latent["samples"], latent_keep_mask(latent["noise_mask"], latent["samples"])
    assert 0 < int(keep.sum()) < keep.numel()
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    for name, sampler in (("euler", euler), ("refined", refiner(comfy, c))):
        out = sample_custom(comfy, gate(comfy, tiny_model.model, c), c, sampler, latent=latent)
        drift = float((out - src)[keep].abs().max())
        assert drift <= ROUNDING * float(src.abs().max()), (name, drift)
        pasted = run(comfy.node("CXRPasteKeepRegion"), samples={"samples": out}, source=latent)[0]["samples"]
        assert torch.equal(pasted[keep], src[keep]) and float((pasted - src)[~keep].abs().mean()) > 0.05, name


def test_inversion_regenerates_the_patient(comfy, tiny_model, c):
    """As tests/test_keep_inversion.py, with the ControlNet on while inverting and regenerating (cfg 1, same prompt):
    the regeneration from the inverted noise is far closer to the patient than img2img noising at the same start."""
    model, src = gate(comfy, tiny_model.model, c), c.latent["samples"]
    with torch.inference_mode():
        inverted, _, sigmas = run(comfy.node("CXRInvertLatent"), model=model, positive=c.positive,
                                  negative=c.negative, latent=c.latent, steps=6, refine=2)
        outs = {name: comfy.node("SamplerCustom")().sample(
            model, add, 1, 1.0, c.positive, c.negative, comfy.node("KSamplerSelect")().get_sampler("euler")[0],
            sigmas, start)[0]["samples"] for name, start, add in (("inversion", inverted, False),
                                                                  ("img2img", c.latent, True))}
    errors = {name: float((out - src).abs().mean()) for name, out in outs.items()}
    assert errors["inversion"] <= 0.5 * errors["img2img"], errors


def test_a_hint_of_another_aspect_is_refused_before_sampling(comfy, tiny_model, c):
    """ComfyUI would centre-crop it to the latent's image, moving the anatomy off the organ masks: refused when a run
    of a model with our stages starts, before any model call. The same aspect at twice the size is only rescaled."""
    from comfy.patcher_extension import WrappersMP

    calls = []
    model = gate(comfy, tiny_model.model, c).clone()
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "cxr_test_calls",
                               lambda executor, *a, **k: calls.append(1) or executor(*a, **k))
    hint = c.image.movedim(-1, 1)
    square = F.interpolate(hint, size=(128, 128), mode="bilinear").movedim(1, -1)
    positive, negative = controlled(comfy, c, square)
    with pytest.raises(CXRInputError) as info:
        sample(comfy, model, type(c)(**{**vars(c), "positive": positive, "negative": negative}))
    text = str(info.value)
    assert text.startswith("[Apply ControlNet] input 'image': the ControlNet's hint image is 128×128 px but the "
                           "latent's image is 112×128 px") and "Fix:" in text, text
    assert not calls
    double = F.interpolate(hint, size=(256, 224), mode="bilinear").movedim(1, -1)
    positive, negative = controlled(comfy, c, double)
    sample(comfy, model, type(c)(**{**vars(c), "positive": positive, "negative": negative}), steps=1)
    assert calls
