"""Latent refinement (CXR Refinement Sampler) on a diffusion transformer: the tiny SD3.5-family checkpoint (MMDiT-X,
two joint blocks) loaded by ComfyUI's own loader, the real radiograph and its organ masks fitted at 64 px (latent
8×7 → a 4×4 patch grid), sampled by ComfyUI's SamplerCustom on the CPU.

The energy blocks are the first half of the joint blocks (here block 0 of 2), so the gradient pass must stop there:
block 1 and the final layer get no weight clone and do not change the energy. Neutral settings (0 iterations, step
size 0) give the stock sampler's output exactly (the same sampler function on the same latent, by construction).

Word positions: CXR Text Encode on the checkpoint's SD3 CLIP (layout "sd3": CLIP-L ‖ G's 77 positions, no T5 here).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from node_run import run

from cxr_counterfactual.attention.refinement import RefineConfig, Refinement, refine_step
from cxr_counterfactual.attention.stage_builders import target_region
from cxr_counterfactual.errors import CXRInputError

pytestmark = pytest.mark.slow
SEED, CFG, STEPS, DENOISE = 3, 4.0, 3, 0.8
TEXT, WORD, TARGET = "chest x-ray, left pleural effusion", "effusion", "left_lung"


@pytest.fixture(scope="module")
def sd35(comfy, sd35_loaded, chexmask_example):
    """The tiny SD3.5 model (loaded once per session), the radiograph fitted to 64 px, its masks, prompts (the
    positive one with CXR Text Encode's SD3 token map of the pathology word) and the sigmas of an img2img run."""
    from cxr_helpers import chexmask_radiograph

    loaded = sd35_loaded
    image, masks = chexmask_radiograph(chexmask_example)
    with torch.inference_mode():
        fitted, fitted_masks, _ = run(comfy.node("CXRFitToModel"), image=image, max_side=64, organ_masks=masks)
        latent = comfy.node("VAEEncode")().encode(loaded.vae, fitted)[0]
        positive, tokens = run(comfy.node("CXRTextEncode"), clip=loaded.clip, text=TEXT, anatomy="", pathology=WORD)
        negative = comfy.node("CLIPTextEncode")().encode(loaded.clip, "")[0]
        sigmas = comfy.node("BasicScheduler")().get_sigmas(loaded.model, "simple", STEPS, DENOISE)[0]
    assert latent["samples"].shape[-2:] == (8, 7)
    assert tokens.layout == "sd3" and tokens.cond_len == int(positive[0][0].shape[1]) == 77
    assert all(p < 77 for p in tokens.indices(WORD))
    return SimpleNamespace(model=loaded.model, masks=fitted_masks, latent=latent, positive=positive,
                           negative=negative, sigmas=sigmas, tokens=tokens)


def sample(comfy, model, f, sampler) -> torch.Tensor:
    with torch.inference_mode():
        out = comfy.node("SamplerCustom")().sample(model, True, SEED, CFG, f.positive, f.negative, sampler, f.sigmas,
                                                   f.latent)[0]
    return out["samples"].clone()


def refiner(comfy, f, **settings):
    inputs = dict(tokens=f.tokens, organ_masks=f.masks, target_organs=TARGET, iterations=2, step_size=0.5,
                  end_percent=1.0, grid_factor="2", smoothing=0.0)
    return run(comfy.node("CXRRefinementSampler"), **{**inputs, **settings})[0]


def probe(comfy, f, model, check) -> None:
    """Run ``check(model_k, x, sigma, extra_args)`` inside ComfyUI's sampling of ``model`` (the sampler function's
    own arguments: the guider with its conditionings, the noised latent, the model options), then stop."""
    from comfy.samplers import KSAMPLER

    def fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        check(model_k, x, sigmas[0], extra_args)
        return x

    sample(comfy, model, f, KSAMPLER(fn))


def test_a_refinement_step_lowers_the_energy_through_the_first_half_of_the_blocks(comfy, sd35):
    from cxr_counterfactual.hosts.comfy import dit_refinement as dr

    target = target_region(sd35.masks, TARGET)
    ref = Refinement(RefineConfig(iterations=3, step_size=0.5, smoothing=0.0), target,
                     {WORD: sd35.tokens.indices(WORD)}, sd35.tokens.cond_len, 2)
    seen = {}

    def check(model_k, x, sigma, extra_args):
        dm = model_k.inner_model.inner_model.diffusion_model
        assert dr.energy_pass(dm) is dr
        keys, grid = dr.energy_layers(dm, tuple(x.shape[-2:]), 2)
        assert keys == [("double_block", 0)] and grid == (4, 4)
        params = dr.path_parameters(dm, keys)
        # the embedders and block 0 are cloned; block 1 and the final layer are not (their weights stay ComfyUI's
        # inference tensors, which a gradient pass through them could not save)
        assert any(n.startswith("dm.joint_blocks.0.") for n in params)
        assert any(n.startswith("dm.x_embedder.") for n in params)
        assert not any(n.startswith(("dm.joint_blocks.1.", "dm.final_layer.")) for n in params)
        energy = dr.energy_function(ref, model_k, sigma, extra_args, params)
        def at(p):  # the energy (and its gradient pass) with weight clones p
            with torch.inference_mode(False):
                xg = x.detach().clone().requires_grad_(True)
                e = dr.energy_function(ref, model_k, sigma, extra_args, p)(xg)
                (g,) = torch.autograd.grad(e.sum(), xg)
            return e.detach(), g

        e0, g0 = at(params)
        seen["moved"], seen["step"] = refine_step(energy, x, float(sigma), ref.config, step=0)
        name = "dm.joint_blocks.0.x_block.attn.qkv.weight"
        with torch.inference_mode(False):  # plain tensors, as path_parameters makes them
            later = {f"dm.{n}": p.detach().clone() + 1.0 for n, p in dm.named_parameters()
                     if n.startswith(("joint_blocks.1.", "final_layer."))}
            shifted = params[name] + 0.5  # (a scale alone would not do: q and k are RMS-normed)
        e1, g1 = at({**params, **later})  # never run: the pass stops after block 0's joint attention
        assert torch.equal(e0, e1) and torch.equal(g0, g1)
        e2, _ = at({**params, name: shifted})  # on the path: the energy changes
        assert not torch.equal(e0, e2)
        # and the gradient needs block 0's clones: without them autograd meets ComfyUI's inference tensors
        with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
            at({n: p for n, p in params.items() if not n.startswith("dm.joint_blocks.0.")})
        seen["energy"] = float(e0.mean())

    probe(comfy, sd35, sd35.model, check)
    step = seen["step"]
    assert step.iterations == 3 and len(step.energies) == 4
    assert step.energies[0] == pytest.approx(seen["energy"], abs=1e-6)  # the same function, the same latent
    assert step.after < step.before, step.energies
    print(f"DiT refinement energy {step.before:.4f} -> {step.after:.4f} ({step.energies})")


def test_the_sampler_node_refines_a_gated_dit_and_neutral_settings_are_the_stock_sampler(comfy, sd35):
    gated = run(comfy.node("CXRAnatomyAttentionGate"), model=sd35.model, organ_masks=sd35.masks,
                organs="right_lung, left_lung, heart", background="confined")[0]
    euler = comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    stock = sample(comfy, gated, sd35, euler)
    refined_s = refiner(comfy, sd35)
    refined = sample(comfy, gated, sd35, refined_s)
    steps = refined_s.sampler_function.store.for_latent(refined).refine
    assert [s.step for s in steps] == list(range(STEPS))  # end_percent 1: every step of the run
    assert all(s.iterations == 2 and s.after < s.before for s in steps), [s.energies for s in steps]
    assert torch.isfinite(refined).all() and not torch.equal(refined, stock)
    print("DiT sampler node energies", [tuple(round(e, 4) for e in s.energies) for s in steps])
    assert torch.equal(sample(comfy, gated, sd35, refiner(comfy, sd35, iterations=0)), stock)
    assert torch.equal(sample(comfy, gated, sd35, refiner(comfy, sd35, step_size=0.0)), stock)


def test_window_and_step_are_in_the_flow_models_own_sigma(comfy, sd35):
    """SD3's flow schedule: σ ∈ [0, 1], percent → σ through the model's shift (percent 0.5 is σ 0.75 at shift 3, not
    0.5); one iteration moves the latent by exactly ``step_size``·σ RMS in that σ."""
    sampling = sd35.model.get_model_object("model_sampling")
    edge = float(sampling.percent_to_sigma(0.5))
    assert float(sd35.sigmas[0]) <= 1.0 and edge == pytest.approx(0.75)  # SD3.5's shift 3
    s = refiner(comfy, sd35, iterations=1, step_size=0.25, end_percent=0.5)
    out = sample(comfy, sd35.model, sd35, s)
    steps = s.sampler_function.store.for_latent(out).refine
    want = [i for i in range(STEPS) if float(sd35.sigmas[i]) >= edge]
    assert 0 < len(want) < STEPS and [st.step for st in steps] == want
    for st in steps:
        assert st.sigma == pytest.approx(float(sd35.sigmas[st.step]))
        rms = float((st.latent_after - st.latent_before).pow(2).mean().sqrt())
        # float32 latent: the move is computed in float32 and added once, so relative error ~1e-6
        assert rms == pytest.approx(0.25 * st.sigma, rel=1e-4), (rms, st.sigma)


def test_a_grid_factor_other_than_the_patch_size_is_refused_before_sampling(comfy, sd35):
    with pytest.raises(CXRInputError) as err:
        sample(comfy, sd35.model, sd35, refiner(comfy, sd35, grid_factor="4"))
    assert err.value.input_name == "grid_factor" and "patch" in str(err.value)


def test_the_node_checks_a_connected_dit_when_it_runs(comfy, sd35):
    """With the model connected the node refuses, before any sampling, a grid other than the patch grid, and a
    token map made for another context (a UNet's CLIP chunks)."""
    with pytest.raises(CXRInputError) as err:
        refiner(comfy, sd35, model=sd35.model, grid_factor="4")
    assert err.value.input_name == "grid_factor"
    assert refiner(comfy, sd35, model=sd35.model) is not None
    unet_tokens = dataclasses.replace(sd35.tokens, layout="clip", parts=())
    with pytest.raises(CXRInputError) as err:
        refiner(comfy, sd35, tokens=unet_tokens, model=sd35.model)
    assert err.value.input_name == "tokens"
