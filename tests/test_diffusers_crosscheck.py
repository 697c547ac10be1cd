"""The same regulated denoising step through both hosts: ComfyUI (the pack's replace patches on the real
ComfyUI UNet) and diffusers (the pack's attention processors on ``UNet2DConditionModel``).

One tiny random-weight diffusers UNet; its weights mapped into ComfyUI's UNet with ComfyUI's own key map. The
ComfyUI model runs ``apply_model`` (its c_in scaling and timestep) with the batch laid out as ComfyUI's CFG
does (negative rows first, ``cond_or_uncond = [1, 0]``); a DIFFUSION_MODEL wrapper records the UNet's exact
input, timestep and raw eps output, and the diffusers UNet gets that same input, timestep and context, with
the same stage objects, the same real organ masks (CheXmask example fitted to a 9×8 latent: odd, non-square)
and the same token positions (the SD1 tokenizer).

Tolerance: both are float32; the hosts differ in attention kernels (ComfyUI's CPU default is the
sub-quadratic kernel, diffusers calls torch SDPA), in GEGLU/linear/conv op order and in the timestep
embedding's arithmetic. Measured: 5e-7 (stock) to 7e-7 (regulated) of the output's largest magnitude. The
test allows ``TOL = 2e-5`` of it (about 30× the measured difference: float32 rounding through ~20 layers with
other kernels, not a loose match), while every regulation must change the output by more than ``50·TOL = 1e-3``
(measured: boost 1.2e-2, soft gate 6.1e-2, hard gate 1.6e-1), so agreement cannot come from doing nothing.
"""

from __future__ import annotations

import pytest
import torch
from diffusers_helpers import (
    FLOAT32_KERNEL_TOL,
    PROMPT,
    clip_tokenizer,
    comfy_twin,
    fitted_masks,
    relative_diff,
    require_diffusers,
    tiny_unet,
)

TOL = FLOAT32_KERNEL_TOL
SIGMA_INDEX = 600  # a discrete timestep, so both hosts' sigma → timestep is exact
MAX_SIDE = 72  # the 899×786 radiograph → 72×64 px → latent 9×8


@pytest.fixture(scope="module")
def twins(comfy, comfyui_path, chexmask_example):
    """The tiny diffusers UNet, its ComfyUI twin, masks, tokens, a step's inputs and the schedule."""
    require_diffusers()
    from cxr_counterfactual.hosts.diffusers.stages import token_map

    unet = tiny_unet(seed=0)
    model = comfy_twin(unet)
    _, masks = fitted_masks(chexmask_example, MAX_SIDE)
    tokens = token_map(clip_tokenizer(comfyui_path), PROMPT, anatomy="left lung, heart", pathology="effusion")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 9, 8, generator=g) * 3.0
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    ms = model.get_model_object("model_sampling")
    sigma = float(ms.sigmas[SIGMA_INDEX])
    return dict(unet=unet, model=model, masks=masks, tokens=tokens, x=x, cond=cond, uncond=uncond, sigma=sigma, ms=ms)


def _stages(t, which: str):
    from cxr_counterfactual.attention.schedule import DiscreteSchedule
    from cxr_counterfactual.attention.stage_builders import target_region
    from cxr_counterfactual.hosts.diffusers.stages import boost_stage, capture_stage, gate_stage

    schedule = DiscreteSchedule(torch.tensor([0.9, 0.5]))  # windows 0..1 are the same on every schedule
    target = target_region(t["masks"], "left_lung")
    out = []
    if "gate" in which:
        strength = 0.7 if "soft" in which else 1.0
        out.append(gate_stage(t["masks"], schedule, tokens=t["tokens"], strength=strength, background="confined",
                              apply_to_uncond=False))  # the negative rows stay stock (checked below)
    if "boost" in which:
        out.append(boost_stage(t["tokens"], target, schedule, factor=4.0, damping=0.5, end_percent=1.0))
    if "capture" in which:
        out.append(capture_stage(t["tokens"], schedule, label="x", grid_factor=2, target=target))
    return out


def _comfy_step(t, stages):
    """ComfyUI: the patched model's raw UNet eps, input and timestep for [uncond, cond] at sigma."""
    import comfy.patcher_extension

    from cxr_counterfactual.attention.stages import GateStage
    from cxr_counterfactual.hosts.comfy.patch import install_stage, run_state

    model = t["model"]
    for stage in stages:
        kinds = ["attn1", "attn2"] if isinstance(stage, GateStage) else ["attn2"]
        model = install_stage(model, stage, kinds)
    seen = {}

    def probe(executor, x, timesteps, *args, **kwargs):
        seen["x"], seen["t"] = x.clone(), timesteps.clone()
        seen["eps"] = executor(x, timesteps, *args, **kwargs)
        return seen["eps"]

    # What calc_cond_batch hands apply_model: the model's transformer options, its wrappers, the rows' layout.
    to = dict(model.model_options.get("transformer_options", {}))
    wrappers = comfy.patcher_extension.merge_nested_dicts({}, model.wrappers)
    wrappers.setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})["test"] = [probe]
    to.update(wrappers=wrappers, cond_or_uncond=[1, 0], sigmas=torch.full((2,), t["sigma"]))
    with torch.no_grad():
        model.model.apply_model(t["x"].repeat(2, 1, 1, 1), torch.full((2,), t["sigma"]),
                                c_crossattn=torch.cat([t["uncond"], t["cond"]]), transformer_options=to)
    state = run_state(model)
    return seen, (state.record if state is not None else None)


def _diffusers_step(t, stages, seen):
    from cxr_counterfactual.attention.layer_call import COND, UNCOND
    from cxr_counterfactual.hosts.diffusers.processors import install_regulation

    with torch.no_grad(), install_regulation(t["unet"], stages) as reg:
        with reg.step((9, 8), t["sigma"], (UNCOND, COND)):
            eps = t["unet"](seen["x"], seen["t"], encoder_hidden_states=torch.cat([t["uncond"], t["cond"]])).sample
        return eps, reg.record


@pytest.mark.parametrize("which", ["off", "gate", "soft gate", "boost", "gate+boost+capture"])
def test_both_hosts_compute_the_same_regulated_step(twins, which):
    stages = _stages(twins, which)
    seen, comfy_record = _comfy_step(twins, stages)
    eps, record = _diffusers_step(twins, stages, seen)
    assert torch.equal(seen["t"], torch.full((2,), float(SIGMA_INDEX)))  # ComfyUI's timestep of that sigma
    diff = relative_diff(eps, seen["eps"])
    assert diff <= TOL, f"{which}: hosts differ by {diff:.2e} of the output's scale"
    if which == "off":
        twins["stock"] = seen["eps"]
        return
    stock = twins.get("stock")
    if stock is None:
        stock = _comfy_step(twins, [])[0]["eps"]
    changed = relative_diff(seen["eps"], stock)
    assert changed > 50 * TOL, f"{which}: the regulation changed the output by only {changed:.2e}"
    # the negative rows are stock in both hosts (token masks and boosts act on the positive prompt only;
    # the gate's apply_to_uncond is off), the positive rows carry the whole change
    assert relative_diff(eps[0], stock[0]) <= TOL and relative_diff(eps[1], stock[1]) > 50 * TOL
    if "capture" in which:
        ours, theirs = record.capture["x"], comfy_record.capture["x"]
        assert ours.grid == theirs.grid == (5, 4)
        (step,) = ours.steps.values()
        (their_step,) = theirs.steps.values()
        assert step.layers == their_step.layers == 3  # at 5×4: one encoder and two decoder layers
        for word, m in step.maps.items():
            assert relative_diff(m, their_step.maps[word]) <= TOL, word
        assert step.share_sum == pytest.approx(their_step.share_sum, abs=1e-5)


def test_diffusers_keys_are_comfyuis_transformer_keys(twins):
    from cxr_counterfactual.hosts.comfy.unet_layout import transformer_keys
    from cxr_counterfactual.hosts.diffusers.processors import layer_keys

    keys = layer_keys(twins["unet"])
    assert sorted(keys.values()) == sorted(transformer_keys(twins["model"]))
    assert keys["down_blocks.1.attentions.0.transformer_blocks.0"] == ("input", 3, 0)
    assert keys["up_blocks.2.attentions.1.transformer_blocks.0"] == ("output", 5, 0)


def test_sigma_schedule_matches_comfyui(twins):
    """The diffusers host's sigma table, percents and timesteps are ComfyUI's (scaled-linear SD betas). diffusers
    computes the betas in float32, ComfyUI in float64: the tables differ by up to 1.3e-5 (relative)."""
    require_diffusers()
    import comfy.samplers
    from diffusers import DDIMScheduler

    from cxr_counterfactual.attention.schedule import DiscreteSchedule

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours, ms = DiscreteSchedule.from_scheduler(scheduler), twins["ms"]
    assert torch.allclose(ours.sigmas, ms.sigmas, rtol=5e-5)
    for p in (0.0, 0.13, 0.4, 0.5, 0.77, 1.0):
        assert ours.percent_to_sigma(p) == pytest.approx(float(ms.percent_to_sigma(p)), rel=5e-5)
    for s in (0.03, 0.5, 2.0, 9.9, 14.6):
        assert ours.timestep(s) == int(ms.timestep(torch.tensor(s)))
    for steps, denoise in ((8, 1.0), (10, 0.6)):
        total = steps if denoise == 1.0 else int(steps / denoise)
        theirs = comfy.samplers.calculate_sigmas(ms, "normal", total)[-(steps + 1):]
        assert torch.allclose(ours.normal_sigmas(steps, denoise), theirs, rtol=5e-5)
