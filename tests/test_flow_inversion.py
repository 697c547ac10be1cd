"""Inversion and the keep region for flow-matching models (ComfyUI's CONST sampling): the core on an analytic flow,
then the nodes inside the real ComfyUI on the tiny SD3.5-family checkpoint and the real radiograph (CheXmask example
fitted to 128 px: latent 16×14, 16 channels), float latents compared.

One module-scoped load and one prompt encode serve every test (the full-size CLIP-G encode dominates: ≈ 15 s on a
busy 2-core machine); the negative is ComfyUI's ConditioningZeroOut of it, as SD3 workflows use. Marked slow: the
checkpoint is built on first use (≈ 30 s)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import chexmask_radiograph
from node_run import run

from cxr_counterfactual.attention.inversion import EPS, FLOW, check_schedule, ddim_invert, euler_sample
from cxr_counterfactual.errors import CXRInputError

SOURCE_PROMPT = "chest x-ray, normal left lung, normal heart"
REGIONS = dict(edit_organs="left_lung", margin_px=4, feather_px=3.0, protect="heart")  # on the 128 px mask grid
# Relative to the latent's largest value: SD3's (x − 0.0609)·1.5305 latent scaling and back, and the last Euler step's
# x − σ·(x − x0)/σ (float32).
ROUNDING = 1e-5


# the core, on an analytic flow ---------------------------------------------------------------------------------------
def flow_denoiser(m: float, s: float):
    """The exact x0-estimate for data N(m, s²) under x = (1 − σ)·x0 + σ·n: E[x0 | x]."""
    def d(x: torch.Tensor, sigma: float) -> torch.Tensor:
        a = 1.0 - sigma
        return m + a * s * s / (a * a * s * s + sigma * sigma) * (x - a * m)
    return d


def test_flow_noise_convention_round_trips_and_bounds_sigma():
    x0, n = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0))
    for sigma in (1e-3, 0.4, 1.0):
        # float32 rounding of the mix (a few ulps of its largest term), divided by sigma on the way back
        atol = 4 * torch.finfo(torch.float32).eps * float(x0.abs().max() + n.abs().max()) / sigma
        torch.testing.assert_close(FLOW.noise(FLOW.noised(x0, n, sigma), x0, sigma), n, rtol=0, atol=atol)
    assert torch.equal(FLOW.noise(n, x0, 1.0), n)  # at sigma 1 the latent is the noise
    assert torch.equal(FLOW.noised(x0, n, 0.25), 0.75 * x0 + 0.25 * n) and torch.equal(EPS.noised(x0, n, 2.0),
                                                                                        x0 + 2.0 * n)
    with pytest.raises(CXRInputError, match="outside"):
        FLOW.noise(n, x0, 1.5)
    with pytest.raises(CXRInputError, match="above the flow"):
        check_schedule([1.2, 0.5, 0.0], FLOW)
    assert check_schedule([3.0, 1.0, 0.0], EPS) == [3.0, 1.0, 0.0]


def test_refined_flow_inversion_is_the_exact_inverse_of_the_euler_step_from_pure_noise():
    """From sigma 0 up to sigma 1 (a flow schedule's full range, shift-3 spacing as SD3's): the first step needs no
    model call at sigma 0, and refinement makes the sampler's Euler steps land back on x0."""
    t = torch.linspace(1.0, 0.0, 9)
    sigmas = 3 * t / (1 + 2 * t)  # SD3's time shift 3; 1.0 … 0
    x0 = 0.3 + 0.5 * torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    d = flow_denoiser(0.3, 0.5)

    def error(refine: int) -> float:
        x_t, report = ddim_invert(d, x0, sigmas, refine=refine, convention=FLOW)
        assert report.steps == 8 and len(report.trajectory) == 8
        return float((euler_sample(d, x_t, sigmas) - x0).abs().max())

    errors = [error(r) for r in (0, 1, 3)]
    print("analytic flow, max |x0 error| by refine 0/1/3:", [f"{e:.1e}" for e in errors])
    assert errors[0] > 1e-2 and errors[2] < 1e-5 and errors[0] > errors[1] > errors[2], errors


# the tiny SD3.5-family checkpoint and the real radiograph ------------------------------------------------------------
@pytest.fixture(scope="module")
def sd35(comfy, sd35_loaded, chexmask_example):
    """MODEL, VAE (loaded once per session), conditioning (source prompt; negative = its zero-out), the radiograph's
    latent and masks."""
    image, masks = chexmask_radiograph(chexmask_example)
    model, clip, vae = sd35_loaded.model, sd35_loaded.clip, sd35_loaded.vae
    with torch.inference_mode():
        positive = comfy.node("CLIPTextEncode")().encode(clip, SOURCE_PROMPT)[0]
        negative = comfy.node("ConditioningZeroOut")().zero_out(positive)[0]
        fitted, masks, _ = run(comfy.node("CXRFitToModel"), image=image, max_side=128, organ_masks=masks)
        latent = comfy.node("VAEEncode")().encode(vae, fitted)[0]
    assert latent["samples"].shape == (1, 16, 16, 14)
    return SimpleNamespace(model=model, vae=vae, positive=positive, negative=negative, latent=latent, masks=masks)


def invert(comfy, f, **overrides):
    with torch.inference_mode():
        return run(comfy.node("CXRInvertLatent"), **{"model": f.model, "positive": f.positive,
                                                     "negative": f.negative, "latent": f.latent, **overrides})


def euler(comfy):
    return comfy.node("KSamplerSelect")().get_sampler("euler")[0]


def regenerate(comfy, f, inverted, sigmas, cfg=1.0):
    """SamplerCustom, add_noise off, from the inverted latent (the 'inverted' route)."""
    with torch.inference_mode():
        return comfy.node("SamplerCustom")().sample(f.model, False, 0, cfg, f.positive, f.negative, euler(comfy),
                                                   sigmas, inverted)[0]["samples"]


def advanced(comfy, noise, guider, sigmas, latent):
    with torch.inference_mode():
        return comfy.node("SamplerCustomAdvanced")().sample(noise, guider, euler(comfy), sigmas, latent)[0]


def guider(comfy, f, inverted, positive=None):
    return run(comfy.node("CXRInversionGuider"), model=f.model, positive=positive or f.positive, negative=f.negative,
               cfg=1.0, inverted=inverted)[0]


def mean_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().mean())


def test_inversion_schedule_is_the_flow_models_own(comfy, sd35):
    """Every offered scheduler spans [sigma_min, percent_to_sigma(start)] of the CONST sampling (sigma_max 1):
    'normal'/'sgm_uniform' included, whose time map ComfyUI does not invert for flow models."""
    from cxr_counterfactual.hosts.comfy.inversion import SCHEDULERS, inversion_sigmas

    ms = sd35.model.get_model_object("model_sampling")
    assert float(ms.sigma_max) == 1.0 and ms.shift == 3.0
    for start_percent, start in ((0.5, 0.75), (0.01, 2.97 / 2.98)):  # shift 3: 3·0.5/(1 + 2·0.5) = 0.75
        assert float(ms.percent_to_sigma(start_percent)) == pytest.approx(start)
        for scheduler in SCHEDULERS:
            sigmas = inversion_sigmas(sd35.model, scheduler, 6, start_percent, "t", FLOW)
            values = check_schedule(sigmas, FLOW)
            assert values[0] == pytest.approx(start, rel=1e-5) and len(values) == 7, (scheduler, values)
            if scheduler != "sgm_uniform":  # sgm drops the last timestep by design
                assert values[-2] == pytest.approx(float(ms.sigma_min), rel=1e-3), (scheduler, values)


def test_sd3_inversion_regenerates_the_patient_and_more_steps_or_refinement_do_better(comfy, sd35):
    """The node refuses nothing on SD3; sampling euler back from the inversion (either route) gives the radiograph's
    latent, far closer than img2img noising at the same start, and closer with more steps and with refinement (the
    random-weight model's ODE is still deterministic: the only error is the inverse Euler steps' residual)."""
    src = sd35.latent["samples"]
    errors: dict[tuple[int, int], float] = {}
    for steps, refine in ((4, 0), (4, 2), (10, 2)):
        inverted, noise, sigmas = invert(comfy, sd35, steps=steps, refine=refine, start_percent=0.5)
        assert float(sigmas[0]) == pytest.approx(0.75) and float(sigmas[-1]) == 0.0
        errors[steps, refine] = mean_err(regenerate(comfy, sd35, inverted, sigmas), src)
    img2img = advanced(comfy, comfy.node("RandomNoise")().get_noise(1)[0],
                       comfy.node("CFGGuider")().get_guider(sd35.model, sd35.positive, sd35.negative, 1.0)[0],
                       sigmas, sd35.latent)["samples"]
    # The NOISE route (source latent + the inversion's noise, checked guider): ComfyUI's CONST noise scaling
    # σ·noise + (1 − σ)·source starts at the inverted latent, so it regenerates the same.
    via_noise = advanced(comfy, noise, guider(comfy, sd35, inverted), sigmas, sd35.latent)["samples"]
    last = regenerate(comfy, sd35, inverted, sigmas)
    print("SD3 flow inversion, start 0.5 (sigma 0.75), karras, cfg 1: mean |latent error| by (steps, refine):",
          {k: round(v, 5) for k, v in errors.items()}, "img2img", round(mean_err(img2img, src), 4),
          "source std", round(float(src.std()), 4), "noise route vs inverted route",
          f"{float((via_noise - last).abs().max()):.1e}")
    assert errors[4, 0] > errors[4, 2] > errors[10, 2], errors
    assert errors[10, 2] <= 0.02 * mean_err(img2img, src), errors
    assert float((via_noise - last).abs().max()) <= 1e-3 * float(src.abs().max())  # two float32 starts, amplified


def test_sd3_inverted_latent_is_comfyuis_leftover_noise_convention(comfy, sd35):
    """ComfyUI stores a flow latent at sigma s as x_s / (1 − s) (CONST's inverse_noise_scaling, what KSamplerAdvanced
    returns with leftover noise) and scales a latent without added noise by (1 − s): the 'inverted' output is stored
    so, and both routes start at the same x_s = s·noise + (1 − s)·source. Sigma 1 (start 0) has no such latent: it
    is refused with the fix."""
    inverted, noise, sigmas = invert(comfy, sd35, start_percent=0.3, steps=2, refine=0)
    s, m = float(sigmas[0]), sd35.model.model
    assert s == pytest.approx(0.875, rel=1e-6)  # shift 3: 3·0.7/(1 + 2·0.7)
    via_latent = (1 - s) * m.process_latent_in(inverted["samples"])
    via_noise = s * noise.generate_noise(sd35.latent) + (1 - s) * m.process_latent_in(sd35.latent["samples"])
    # float32 rounding of the (x − 0.0609)·1.5305 round trip, magnified by 1/(1 − s) and back
    torch.testing.assert_close(via_latent, via_noise, rtol=0, atol=1e-5 * float(via_noise.abs().max()) / (1 - s))
    with pytest.raises(CXRInputError, match=r"input 'start_percent': start_percent 0.0 is sigma 1"):
        invert(comfy, sd35, start_percent=0.0, steps=2)


def test_sd3_keep_region_stays_at_the_source_and_follows_the_inverted_path(comfy, sd35):
    """Keep region + inversion on SD3 through the checked guider: with the source prompt the kept region is fed the
    inverted trajectory and the whole latent comes back to the patient; with an edit prompt the edit region changes;
    the kept cells end at the source within rounding and exactly after the paste."""
    from cxr_counterfactual.nodes.keep import latent_keep_mask

    edit = run(comfy.node("CXREditKeepRegions"), organ_masks=sd35.masks, **REGIONS)[0]
    latent, _ = run(comfy.node("CXRApplyKeepRegion"), latent=sd35.latent, edit_region=edit)
    src, keep = latent["samples"], latent_keep_mask(latent["noise_mask"], latent["samples"])
    assert 20 < int(keep[0, 0].sum()) < 200  # both regions on the 16×14 latent
    # Without inversion (KSampler, random noise): at every model call the kept cells are ComfyUI's CONST noise
    # scaling of the source, σ·noise + (1 − σ)·source, bit for bit, and the sampler ends there up to rounding.
    from comfy.patcher_extension import WrappersMP
    from comfy.sample import prepare_noise

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def probe(executor, x, t, *args, **kwargs):
        calls.append((x.detach().float().cpu().clone(), t.detach().float().cpu().clone()))
        return executor(x, t, *args, **kwargs)

    (probed := sd35.model.clone()).add_wrapper_with_key(WrappersMP.APPLY_MODEL, "cxr_test_probe", probe)
    with torch.inference_mode():
        plain = comfy.node("KSampler")().sample(probed, 7, 3, 1.0, "euler", "simple", sd35.positive, sd35.negative,
                                                latent)[0]
    noise0, scaled = prepare_noise(src, 7), sd35.model.model.process_latent_in(src)
    assert len(calls) == 3
    for x, sigma in calls:
        expected = sigma.reshape(-1, 1, 1, 1) * noise0 + (1.0 - sigma.reshape(-1, 1, 1, 1)) * scaled
        assert torch.equal(x[keep], expected[keep]), float(sigma[0])
    assert float((plain["samples"] - src)[keep].abs().max()) <= ROUNDING * float(src.abs().max())
    pasted = run(comfy.node("CXRPasteKeepRegion"), samples=plain, source=latent)[0]["samples"]
    assert torch.equal(pasted[keep], src[keep]) and float((pasted - src)[~keep].abs().mean()) > 0.05

    inverted, noise, sigmas = invert(comfy, sd35, latent=latent, steps=8, refine=2)
    results = {}
    # The "edit" prompt is the zeroed-out conditioning (one prompt encode per module): any other prompt moves the
    # edit region away from the patient.
    for name, positive in (("patient", None), ("edit", sd35.negative)):
        out = advanced(comfy, noise, guider(comfy, sd35, inverted, positive), sigmas, latent)
        drift = float((out["samples"] - src)[keep].abs().max())
        assert drift <= ROUNDING * float(src.abs().max()), (name, drift)
        pasted = run(comfy.node("CXRPasteKeepRegion"), samples=out, source=latent)[0]["samples"]
        assert torch.equal(pasted[keep], src[keep]) and torch.equal(pasted[~keep], out["samples"][~keep])
        results[name] = mean_err(pasted[~keep], src[~keep])
    print("SD3 keep + inversion, edit-region mean |latent error| against the patient:",
          {k: round(v, 4) for k, v in results.items()})
    assert results["edit"] > 3 * results["patient"], results  # measured 6× (0.0006 against 0.0001)


def test_unsupported_model_sampling_is_refused_with_both_conventions_named(comfy, sd35):
    """A prediction type that is neither EPS nor CONST (here ComfyUI's cosmos_rflow, set by its own node) is refused
    before any model call, the message naming both supported mixings and the fix."""
    with torch.inference_mode():
        other = comfy.node("ModelSamplingContinuousEDM")().patch(sd35.model, "cosmos_rflow", 0.002, 80.0)[0]
    with pytest.raises(CXRInputError) as info:
        invert(comfy, SimpleNamespace(**{**vars(sd35), "model": other}), steps=2)
    text = str(info.value)
    assert text.startswith("[Invert Radiograph (DDIM)] input 'model': unsupported model sampling COSMOS_RFLOW"), text
    assert "x = x0 + σ·ε" in text and "x = (1 − σ)·x0 + σ·ε" in text and "SD3/SD3.5" in text
