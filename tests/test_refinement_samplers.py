"""Latent refinement with the user's sampler: every supported ComfyUI sampler, inside the real ComfyUI, on the tiny
checkpoint and the real radiograph at 64 px (latent 8×7; the energy at the latent's own grid, grid_factor 1, so a
gradient pass runs only the first encoder block), sampled by SamplerCustom as users wire it.

Per sampler: 0 iterations is the stock sampler bit for bit (the stock path); refinement runs once per sampling step
inside the window whatever the sampler's model calls per step; an independent capture (tests/energy_probe.py)
measures the energy lower after each refined step; the keep region still ends at the source; gate and boost still
act at every step of their windows. Multistep samplers restart their history after a refined step: shown by
their equivalence with Euler when every step is refined by a zero move.
"""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import gate
from energy_probe import comfy_energy
from node_run import run

STEPS, CFG, SEED = 6, 3.0, 5
ITERATIONS, STEP_SIZE, GRID = 2, 0.5, "1"
WINDOW = [0, 1, 2]  # the steps whose sigma lies in the default window 0–0.5 of this schedule
ONE_STEP = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
            "dpmpp_sde_gpu", "lcm", "ddim")
MULTISTEP = ("lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2")
# The list: each gets the full check (energy, keep region, stages); the others the bit-identity checks.
NAMED = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "lms", "ddim", "uni_pc",
         "lcm")
# Samplers that feed the model the kept source and land on it (tests/test_keep_inversion.py proves the stock ones);
# uni_pc's last multistep update misses it and lcm jumps to the denoised latent: the paste alone makes those exact.
KEEP_HOLDS = ("euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "ddim")
ROUNDING = 1e-5  # relative to the latent's largest value, as in tests/test_keep_inversion.py


def test_every_supported_sampler_is_tested(comfy):
    from cxr_counterfactual.hosts.comfy.sampler_methods import METHODS

    assert set(METHODS) == set(ONE_STEP) | set(MULTISTEP) and not set(ONE_STEP) & set(MULTISTEP)
    assert {n for n, m in METHODS.items() if m.multistep} == set(MULTISTEP)


@pytest.fixture(scope="module")
def sigmas(comfy, tiny_model):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(tiny_model.model.get_model_object("model_sampling"), "normal", STEPS)


def select(comfy, name: str):
    return comfy.node("KSamplerSelect")().get_sampler(name)[0]


def refiner(comfy, c, name: str | None, **overrides):
    inputs = dict(tokens=c.tokens, organ_masks=c.masks, iterations=ITERATIONS, step_size=STEP_SIZE, grid_factor=GRID,
                  smoothing=0.0, sampler=None if name is None else select(comfy, name))
    return run(comfy.node("CXRRefinementSampler"), **{**inputs, **overrides})[0]


def sample(comfy, model, c, sampler, sigmas, latent=None) -> torch.Tensor:
    # A copy per run: ComfyUI's uni_pc writes 0.001 over the last sigma of the SIGMAS it is given (in place), and
    # the refinement sampler hands the user's sampler the same tensor (its stock path is exactly the stock call).
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(model, True, SEED, CFG, c.positive, c.negative, sampler,
                                                   sigmas.clone(), latent or c.latent)[0]["samples"]


def refine_record(sampler):
    return sampler.sampler_function.store.latest().refine


@pytest.mark.parametrize("name", ONE_STEP + MULTISTEP)
def test_zero_iterations_is_the_stock_sampler_and_a_zero_move_keeps_one_step_samplers_exact(comfy, tiny_model,
                                                                                           chest, sigmas, name):
    c, model = chest, tiny_model.model
    stock = sample(comfy, model, c, select(comfy, name), sigmas)
    zero_iterations = refiner(comfy, c, name, iterations=0)
    assert torch.equal(sample(comfy, model, c, zero_iterations, sigmas), stock)  # one stock call
    assert [s.step for s in refine_record(zero_iterations)] == WINDOW  # its energies, for the preview
    # One refined call per step, the same noise: with a zero move, a one-step sampler is the stock run exactly;
    # a multistep one restarts its history at every refined step, so it differs.
    zero_move = sample(comfy, model, c, refiner(comfy, c, name, step_size=0.0, iterations=1), sigmas)
    assert torch.equal(zero_move, stock) == (name in ONE_STEP), name


@pytest.mark.parametrize("name", ("dpmpp_2m", "lms"))
def test_multistep_samplers_restart_their_history_after_a_refined_step(comfy, tiny_model, chest, sigmas, name):
    """Refined at every step (a zero move), dpmpp_2m and lms take only their first-order start-up step, which is
    Euler's update written another way: the run equals Euler up to float32 rounding, while the stock multistep run
    is far from it."""
    c, model = chest, tiny_model.model
    euler = sample(comfy, model, c, select(comfy, "euler"), sigmas)
    restarted = sample(comfy, model, c, refiner(comfy, c, name, step_size=0.0, iterations=1, end_percent=1.0),
                       sigmas)
    stock = sample(comfy, model, c, select(comfy, name), sigmas)
    scale = float(euler.abs().max())
    # float32: each of the 8 steps rounds its two formulas differently (~1e-7 relative), amplified by the random
    # model's expanding flow (tests/test_keep_inversion.py: violently expanding): 1e-4 of the range bounds it.
    assert float((restarted - euler).abs().max()) <= 1e-4 * scale
    assert float((stock - euler).abs().max()) >= 100 * 1e-4 * scale


@pytest.fixture(scope="module")
def keep_latent(comfy, chest):
    """The left lung (grown 2 px, heart protected) as the edit region; the rest kept."""
    edit, _, _ = run(comfy.node("CXREditKeepRegions"), organ_masks=chest.masks, edit_organs="left_lung",
                     margin_px=2, feather_px=0.0, protect="heart")
    latent, _ = run(comfy.node("CXRApplyKeepRegion"), latent=chest.latent, edit_region=edit)
    return latent


@pytest.mark.parametrize("name", NAMED)
def test_each_sampler_lowers_the_measured_energy_once_per_step_and_keeps_the_kept_region(comfy, tiny_model, chest,
                                                                                        sigmas, keep_latent, name):
    from cxr_counterfactual.nodes.keep import latent_keep_mask

    c, model = chest, tiny_model.model
    refined = refiner(comfy, c, name)
    out = sample(comfy, model, c, refined, sigmas, keep_latent)
    steps = refine_record(refined)
    assert [s.step for s in steps] == WINDOW, name  # once per sampling step in the window (sigma ≥ σ(0.5))
    keep = latent_keep_mask(keep_latent["noise_mask"], keep_latent["samples"])
    for st in steps:
        assert st.iterations == ITERATIONS
        before = comfy_energy(comfy, model, c, st.latent_before, st.sigma, grid_factor=int(GRID), smoothing=0.0)
        after = comfy_energy(comfy, model, c, st.latent_after, st.sigma, grid_factor=int(GRID), smoothing=0.0)
        assert after < before, (name, st.step, before, after)
        assert torch.equal(st.latent_after[keep], st.latent_before[keep])  # the kept cells never move
    src = keep_latent["samples"]
    if name in KEEP_HOLDS:
        assert float((out - src)[keep].abs().max()) <= ROUNDING * float(src.abs().max()), name
    pasted = run(comfy.node("CXRPasteKeepRegion"), samples={"samples": out}, source=keep_latent)[0]["samples"]
    assert torch.equal(pasted[keep], src[keep])


@pytest.mark.parametrize("name", NAMED)
def test_gate_and_boost_act_at_every_step_of_their_windows_under_refinement(comfy, tiny_model, chest, sigmas,
                                                                            name):
    """The trace of a gated model sampled by the refined sampler: every attention call is gated inside the gate's
    window (both kinds), as under the stock sampler, and the refinement's energy passes are probes, not in the
    trace; the boost on top changes the refined result."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    c = chest
    gated = gate(comfy, tiny_model.model, c, start_percent=0.0, end_percent=0.5)
    boosted = run(comfy.node("CXRPathologyBoost"), model=gated, organ_masks=c.masks, tokens=c.tokens,
                  start_percent=0.0, end_percent=0.3)[0]
    state = run_state(gated)
    state.trace_enabled = True
    sample(comfy, gated, c, select(comfy, name), sigmas)
    stock = state.store.latest().trace
    refined = refiner(comfy, c, name)
    out = sample(comfy, gated, c, refined, sigmas)
    trace = state.store.latest().trace
    gate_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    for kind in ("attn1", "attn2"):
        calls = [(s, g) for k, _, s, g in trace if k == kind]
        assert calls and all(g == (s >= gate_end) for s, g in calls), kind
        assert {s for s, g in calls if g} == {s for k, _, s, g in stock if k == kind and g}, kind
    # The sampler's own model calls only; UniPC's single steps evaluate once more each (their corrector's call is
    # not reused: the next step starts from the refined latent).
    per_call = sum(1 for _, _, s, _ in stock if s == stock[0][2])  # sigmas[0] is evaluated once, by step 0
    extra = len(refine_record(refined)) if name == "uni_pc" else 0
    assert len(trace) == len(stock) + extra * per_call
    assert not torch.equal(sample(comfy, boosted, c, refiner(comfy, c, name), sigmas), out)
