"""Latent refinement by attention-concentration energy: the core energy, and the sampler inside ComfyUI.

Host tests run everything under ``torch.inference_mode()`` (as ComfyUI runs nodes) on the tiny checkpoint
and the real CheXmask radiograph fitted to 128 px (latent 16×14; the energy grid at factor 4, the node's default
and A&E's 16×16 at 512 px, is 4×4).
The energy is checked by an independent capture pass: CXR's own CaptureStage on the encoder layers,
run by a separate 1-step SamplerCustom at the recorded latent and sigma.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import fitted_chest
from energy_probe import comfy_energy
from node_run import run

from conftest import DEVICES
from cxr_counterfactual.attention.refinement import (
    concentration_energy,
    parse_thresholds,
    refinement_step,
    smooth_maps,
)
from cxr_counterfactual.demo.tiny_checkpoint import TWO_LEVEL_UNET_CONFIG, random_unet_model
from cxr_counterfactual.errors import CXRInputError

# Fixed benchmark settings of the proof (constants of the test, not tunable defaults).
STEPS, CFG, SEED = 8, 5.0, 3
# The grid is the node's default (A&E's): the first tiny checkpoint had no cross-attention at latent ÷ 4, which
# forced ÷ 2 here.
ITERATIONS, STEP_SIZE, END_PERCENT, GRID, SMOOTHING = 5, 0.5, 0.5, "4", 0.0


# ------------------------------------------------------------------------------------------------
# core, tiny tensors
def _target() -> torch.Tensor:
    inside = torch.zeros(6, 5, dtype=torch.bool)
    inside[1:5, 1:4] = True
    return inside


def test_energy_is_zero_when_all_mass_is_inside_and_one_when_outside():
    inside = _target()
    m = torch.zeros(1, 6, 5)
    m[0, 2:4, 2] = 1.0  # one cell inside the border: smoothing keeps it inside
    assert float(concentration_energy(m, inside)) == pytest.approx(0.0, abs=1e-7)
    assert float(concentration_energy(m, inside, smoothing=0)) == 0.0
    out = torch.zeros(1, 6, 5)
    out[0, 0, 0] = 1.0
    assert float(concentration_energy(out, inside, smoothing=0)) == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_energy_range_and_extent_term(device):
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(16, 6, 5, generator=g) ** 3).to(device)
    for lam in (0.0, 0.5, 1.0):
        e = concentration_energy(maps, _target(), extent_weight=lam)  # a CPU target meets maps on the device
        assert e.shape == (16,) and bool((e >= 0).all() and (e <= 1).all())
    # a map covering exactly the target has no extent mismatch; a single spike has a large one
    exact = _target().float()[None].to(device)
    spike = torch.zeros(1, 6, 5, device=device)
    spike[0, 2, 2] = 1.0
    e_exact = concentration_energy(exact, _target(), smoothing=0, extent_weight=1.0)
    e_spike = concentration_energy(spike, _target(), smoothing=0, extent_weight=1.0)
    assert float(e_exact) < 0.05 < float(e_spike)


@pytest.mark.parametrize("device", DEVICES)
def test_energy_gradient_points_mass_into_the_target(device):
    maps = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
    e = concentration_energy(maps, _target(), smoothing=0)
    (grad,) = torch.autograd.grad(e.sum(), maps)
    inside = _target().to(device)
    assert bool((grad[:, inside] < 0).all()) and bool((grad[:, ~inside] > 0).all())
    stepped = (maps - 0.01 * grad.sign()).detach()
    assert bool((concentration_energy(stepped, inside, smoothing=0) < e.detach()).all())


def test_smoothing_keeps_mass_roughly_and_refinement_step_is_normalised():
    m = torch.rand(3, 7, 5)
    s = smooth_maps(m, 0.5)
    assert s.shape == m.shape and torch.allclose(s.sum(), m.sum(), rtol=0.1)
    x, g = torch.zeros(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    g[1] = 0
    moved = refinement_step(x, g, 2.0, 0.5)
    assert float(moved[0].pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-5)  # step·σ RMS
    assert torch.equal(moved[1], x[1])


# float32: the RMS comes from sums of a few hundred squares (pairwise summation, relative error ~ log2(n)·2⁻²⁴
# ≈ 1e-6), a division and a square root; 1e-5 leaves a margin and still fails the old whole-latent normalisation
# (off by 1/sqrt(edit fraction)) by orders of magnitude.
RMS_TOLERANCE = 1e-5


def masked_rms(move: torch.Tensor, mask: torch.Tensor) -> float:
    """``sqrt(Σ move² / Σ m)``, the mask expanded to the move's shape (a binary mask: the RMS over its cells)."""
    m = mask.expand_as(move)
    return float((move.pow(2).sum() / m.sum()).sqrt())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [20, 5, 2])  # edit fractions 100 %, 25 %, 10 % of a 20×20 latent
def test_refinement_step_moves_the_editable_cells_by_step_sigma(rows, device):
    g = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(rows)).to(device)
    x = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(100 + rows)).to(device)
    mask = torch.zeros(1, 1, 20, 20)  # on the CPU, as a LATENT's noise mask may be: the step moves it to x's device
    mask[..., :rows, :] = 1
    moved = refinement_step(x, g, 2.0, 0.5, mask)  # step·σ = 1
    assert moved.device == x.device
    edit = mask.to(device).expand_as(x).bool()
    assert masked_rms((moved - x)[edit], torch.ones((), device=device)) == pytest.approx(1.0, rel=RMS_TOLERANCE)
    assert torch.equal(moved[~edit], x[~edit])  # kept cells: the move is masked to exactly 0
    if rows == 20:  # a full mask is no mask
        assert torch.equal(moved, refinement_step(x, g, 2.0, 0.5))


def test_refinement_step_under_soft_batched_and_one_channel_masks():
    gen = torch.Generator().manual_seed(7)
    x, g = torch.randn(3, 4, 8, 6, generator=gen), torch.randn(3, 4, 8, 6, generator=gen)
    # per item: a feathered mask (0, ramp, 1), a binary quarter, and all zero; one channel broadcast over four
    mask = torch.zeros(3, 1, 8, 6)
    mask[0, 0, :, 2:] = torch.tensor([0.25, 0.5, 0.75, 1.0])
    mask[1, 0, :4, :3] = 1
    moved = refinement_step(x, g, 0.4, 0.25, mask)  # step·σ = 0.1
    move = moved - x
    for i in (0, 1):  # each item normalised over its own mask
        assert masked_rms(move[i], mask[i]) == pytest.approx(0.1, rel=RMS_TOLERANCE), i
    kept = (mask == 0).expand_as(x)
    assert torch.equal(moved[kept], x[kept]) and torch.equal(moved[2], x[2])  # a zero mask leaves the item alone
    # a feathered cell moves in proportion to mask × gradient, downhill (least-squares factor of the move on m·g)
    mg = mask[0] * g[0]
    c = float((move[0] * mg).sum() / mg.pow(2).sum())
    assert c < 0 and torch.allclose(move[0], c * mg, rtol=0, atol=1e-6)  # float32 rounding of moves ~0.1
    # the same mask given per channel (ComfyUI's denoise_mask is [B, C, h, w]) is the same rule
    assert torch.equal(moved, refinement_step(x, g, 0.4, 0.25, mask.expand(3, 4, 8, 6)))
    # a zero gradient under a non-zero mask leaves the item unchanged too
    g[1] = 0
    assert torch.equal(refinement_step(x, g, 0.4, 0.25, mask)[1], x[1])


def test_thresholds_parse_and_reject_bad_pairs():
    assert parse_thresholds(" 0.2:0.5, 0:0.95;0.4:0.2") == ((0.0, 0.95), (0.2, 0.5), (0.4, 0.2))
    assert parse_thresholds("") == ()
    for bad in ("0.2", "a:b", "0.2:1.5"):
        with pytest.raises(CXRInputError, match="thresholds"):
            parse_thresholds(bad)
    with pytest.raises(CXRInputError, match="target_organs"):
        concentration_energy(torch.rand(1, 3, 3), torch.zeros(3, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# inside ComfyUI
@pytest.fixture(scope="module")
def chest128(comfy, tiny_model, chexmask_example) -> SimpleNamespace:
    """The radiograph fitted to 128 px (latent 16×14), masks, conditioning (as the ``chest`` fixture)."""
    chest = fitted_chest(comfy, tiny_model, chexmask_example, max_side=128, steps=STEPS)
    assert chest.latent["samples"].shape[-2:] == (16, 14)
    return chest


def refiner(comfy, c, **overrides):
    inputs = dict(tokens=c.tokens, organ_masks=c.masks, iterations=ITERATIONS, step_size=STEP_SIZE,
                  end_percent=END_PERCENT, grid_factor=GRID, smoothing=SMOOTHING)
    return run(comfy.node("CXRRefinementSampler"), **{**inputs, **overrides})[0]


def sample(comfy, model, c, sampler, sigmas=None, add_noise=True, latent=None, cfg=CFG):
    with torch.inference_mode():
        out = comfy.node("SamplerCustom")().sample(model, add_noise, SEED, cfg, c.positive, c.negative, sampler,
                                                   c.sigmas if sigmas is None else sigmas, latent or c.latent)[0]
    return out


def trajectory(comfy, model, c, sampler) -> list[torch.Tensor]:
    """The latent the sampler carries at each step (as its callback sees it)."""
    import latent_preview

    seen: list[torch.Tensor] = []
    original = latent_preview.prepare_callback

    def prepare(*args, **kwargs):
        inner = original(*args, **kwargs)

        def cb(step, x0, x, total):
            seen.append(x.detach().clone())
            return inner(step, x0, x, total)
        return cb
    latent_preview.prepare_callback = prepare
    try:
        sample(comfy, model, c, sampler)
    finally:
        latent_preview.prepare_callback = original
    return seen


def record_of(sampler, out):
    return sampler.sampler_function.store.for_latent(out["samples"])


def capture_energy(comfy, model, c, x: torch.Tensor, sigma: float) -> float:
    """An independent pass: CaptureStage on the encoder layers of the energy grid, one SamplerCustom step."""
    return comfy_energy(comfy, model, c, x, sigma, grid_factor=int(GRID), smoothing=SMOOTHING)


def test_zero_iterations_is_plain_euler(comfy, tiny_model, chest128):
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    plain = sample(comfy, tiny_model.model, chest128, euler)["samples"]
    ours = sample(comfy, tiny_model.model, chest128, refiner(comfy, chest128, iterations=0))["samples"]
    assert torch.equal(plain, ours)


def test_refinement_lowers_the_independently_measured_energy(comfy, tiny_model, chest128):
    c, model = chest128, tiny_model.model
    refined_s, plain_s = refiner(comfy, c), refiner(comfy, c, iterations=0)
    out = sample(comfy, model, c, refined_s)
    refined, plain = record_of(refined_s, out).refine, record_of(plain_s, sample(comfy, model, c, plain_s)).refine
    assert len(refined) == len(plain) >= 2
    for st in refined:
        assert st.iterations == ITERATIONS
        before = capture_energy(comfy, model, c, st.latent_before, st.sigma)
        after = capture_energy(comfy, model, c, st.latent_after, st.sigma)
        assert before == pytest.approx(st.before, abs=1e-3) and after == pytest.approx(st.after, abs=1e-3)
        assert after < before, (st.step, before, after)
    last_refined = capture_energy(comfy, model, c, refined[-1].latent_after, refined[-1].sigma)
    last_plain = capture_energy(comfy, model, c, plain[-1].latent_before, plain[-1].sigma)
    assert last_refined <= 0.9 * last_plain, (last_refined, last_plain)
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    assert not torch.equal(out["samples"], sample(comfy, model, c, euler)["samples"])


def test_trajectory_changes_only_from_the_first_refined_step(comfy, tiny_model, chest128):
    c, model = chest128, tiny_model.model
    late = refiner(comfy, c, iterations=1, start_percent=0.3, end_percent=0.6)
    ref = trajectory(comfy, model, c, refiner(comfy, c, iterations=0))
    seen = trajectory(comfy, model, c, late)
    steps = [st.step for st in late.sampler_function.store.latest().refine]
    k = steps[0]
    assert k > 0 and steps == list(range(k, steps[-1] + 1)) and steps[-1] < STEPS - 1
    for i in range(k):
        assert torch.equal(seen[i], ref[i]), i
    assert not torch.equal(seen[k], ref[k]) and not torch.equal(seen[-1], ref[-1])


def test_preview_plots_the_run_that_made_the_latent(comfy, tiny_model, chest128):
    refined_s, plain_s = refiner(comfy, chest128, iterations=1), refiner(comfy, chest128, iterations=0)
    out = sample(comfy, tiny_model.model, chest128, refined_s)
    ref = sample(comfy, tiny_model.model, chest128, plain_s)
    preview = comfy.node("CXRRefinementPreview")
    plot = run(preview, sampler=refined_s, latent=out, reference_sampler=plain_s, reference_latent=ref)[0]
    assert plot.shape == (1, 360, 640, 3)
    with pytest.raises(ValueError, match=r"\[CXR Refinement Preview\].*'latent'"):
        run(preview, sampler=refined_s, latent=ref)


@pytest.fixture(scope="module")
def two_level(comfy):
    """A UNet of the first recipe's two-level layout (cross-attention at latent ÷ 1 and ÷ 2 only, also detected
    as SD1.5): grid factors 4 and 8 cannot work with it."""
    return random_unet_model(TWO_LEVEL_UNET_CONFIG)


def test_settings_are_checked_against_the_model_when_the_node_runs(comfy, tiny_model, chest128, two_level):
    c = chest128
    capture = dict(tokens=c.tokens, label="run", target_organs="left_lung", start_percent=0.0, end_percent=1.0)
    for factor in ("1", "2", "4", "8"):  # the tiny checkpoint has every grid SD1.5 has
        refiner(comfy, c, grid_factor=factor, model=tiny_model.model)
        run(comfy.node("CXRCaptureAttention"), model=tiny_model.model, grid_factor=factor, **capture)
    with pytest.raises(ValueError, match=r"\[CXR Capture Attention\].*'grid_factor'.*÷ 8.*÷ 1, 2\)"):
        run(comfy.node("CXRCaptureAttention"), model=two_level, grid_factor="8", **capture)
    # A window that holds none of the steps is refused when sampling starts, before the first model call.
    calls = []
    late = c.sigmas[-3:]  # low-noise steps only; the window 0–0.1 is the high-noise end
    model = tiny_model.model.clone()
    model.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
    with pytest.raises(ValueError, match=r"'end_percent'.*holds none of the sampler's 2 steps"):
        sample(comfy, model, c, refiner(comfy, c, end_percent=0.1), sigmas=late)
    assert not calls
    sample(comfy, model, c, refiner(comfy, c, end_percent=0.1, iterations=0), sigmas=late)  # 0 = plain Euler
    assert len(calls) == 2


def test_bad_inputs(comfy, tiny_model, chest128, two_level):
    from cxr_counterfactual.attention.organs import OrganMasks

    c = chest128
    dot = torch.zeros(128, 112)
    dot[60, 50] = 1
    small = OrganMasks.from_dict({"left_lung": dot, "right_lung": dot, "heart": dot})
    with pytest.raises(ValueError, match=r"\[CXR Refinement Sampler\].*'target_organs'.*covers no cell"):
        sample(comfy, tiny_model.model, c, refiner(comfy, c, organ_masks=small))
    # The tiny checkpoint has every grid SD1.5 has (latent ÷ 8 in the middle block): a UNet of the first recipe's
    # two-level layout has cross-attention at ÷ 1 and ÷ 2 only, so ÷ 8 cannot work with it.
    with pytest.raises(ValueError, match=r"'grid_factor'.*no cross-attention"):
        sample(comfy, two_level, c, refiner(comfy, c, grid_factor="8"))
    # with the model connected the node itself refuses it when it runs, before anything samples
    with pytest.raises(ValueError, match=r"\[CXR Refinement Sampler\].*'grid_factor'.*÷ 4.*÷ 1, 2\)"):
        refiner(comfy, c, grid_factor="4", model=two_level)
    with pytest.raises(ValueError, match=r"'thresholds'"):
        refiner(comfy, c, thresholds="half:0.5")
    # another pack's patch that feeds an inference tensor into the graph: the weights cannot be differentiated
    with torch.inference_mode():
        frozen = torch.ones(1)

    def patch(h, transformer_options):
        return h * frozen
    m = tiny_model.model.clone()
    m.set_model_input_block_patch(patch)
    with pytest.raises(ValueError, match=r"\[CXR Refinement Sampler\].*'model'.*cannot be differentiated"):
        sample(comfy, m, c, refiner(comfy, c))


def test_refinement_probe_passes_leave_capture_and_trace_alone(comfy, tiny_model, chest128):
    """The energy passes are probes, not model calls of the run: a capture on a layer they run through (the 16×14
    one, before the 4×4 energy layer) records the same layers per step as under plain Euler and keeps no autograd
    graph (which would hold the weight clones after sampling); the trace sees only the run's model calls."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    c = chest128
    model = run(comfy.node("CXRCaptureAttention"), model=tiny_model.model, tokens=c.tokens, label="probe",
                grid_factor="1", organ_masks=c.masks, target_organs="left_lung", start_percent=0.0,
                end_percent=1.0)[0]
    run_state(model).trace_enabled = True
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    records = {}
    for name, sampler in (("euler", euler), ("refined", refiner(comfy, c, iterations=2))):
        sample(comfy, model, c, sampler)
        records[name] = run_state(model).store.latest()
    assert len(records["refined"].refine) >= 2
    steps = {name: r.capture["probe"].steps for name, r in records.items()}
    assert {s: st.layers for s, st in steps["refined"].items()} == {s: st.layers for s, st in
                                                                    steps["euler"].items()}
    assert len(records["refined"].trace) == len(records["euler"].trace)
    for st in steps["refined"].values():
        assert all(m.grad_fn is None and not m.requires_grad for m in st.maps.values())


@pytest.mark.parametrize("iterations", [1, 3])
def test_step_size_is_the_rms_move_over_the_keep_regions_editable_cells(comfy, tiny_model, chest128, iterations):
    """Through the real keep-region path (Edit / Keep Regions → Apply Keep Region → SamplerCustom): each refined
    step moves the cells ComfyUI's denoise mask lets move by step·σ RMS (the mask's weighted RMS, module docstring
    of attention/refinement.py), and the kept cells not at all."""
    from comfy.utils import reshape_mask

    c = chest128
    edit = run(comfy.node("CXREditKeepRegions"), organ_masks=c.masks, edit_organs="left_lung", margin_px=2,
               feather_px=1.0, protect="heart")[0]
    latent = run(comfy.node("CXRApplyKeepRegion"), latent=c.latent, edit_region=edit)[0]
    mask = reshape_mask(latent["noise_mask"], latent["samples"].shape)  # the sampler's denoise_mask (prepare_mask)
    fraction = float(mask.mean())  # 0.21 (0.30 of the cells have m > 0: the feather)
    assert 0.15 < fraction < 0.35, fraction
    sampler = refiner(comfy, c, iterations=iterations)
    steps = record_of(sampler, sample(comfy, tiny_model.model, c, sampler, latent=latent)).refine
    assert len(steps) >= 2
    kept = (mask == 0).expand_as(latent["samples"])
    ratios = []
    for st in steps:
        assert st.iterations == iterations
        move = st.latent_after - st.latent_before
        assert torch.equal(st.latent_after[kept], st.latent_before[kept])
        rms, step = masked_rms(move, mask), STEP_SIZE * st.sigma
        ratios.append(round(rms / step, 6))
        if iterations == 1:
            assert rms == pytest.approx(step, rel=RMS_TOLERANCE), (st.step, rms, step)
        else:  # k moves of step·σ each sum to at most k·step·σ (triangle inequality in that weighted norm); here
            # they mostly agree (measured 2.7–3.0 × step·σ), so more than one step's move shows all k were taken
            assert step < rms <= iterations * step * (1 + RMS_TOLERANCE), (st.step, rms, step)
    print(f"edit fraction {fraction:.3f}, {iterations} iteration(s): RMS move / (step·σ) per step", ratios)
