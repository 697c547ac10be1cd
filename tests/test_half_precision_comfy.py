"""Half precision (float16, bfloat16) inside ComfyUI, with the tiny checkpoint's UNet stored and computing in half on
the CPU (fixture ``half_model``): the hard gate's isolation of each region at every layer (exact: one attention per
region), soft gating and token masking per layer against float32 on the same inputs, the boost's rise of the in-target
share, and the refinement lowering its energy, each against the float32 model within a tolerance derived from the dtype
(:func:`half_tolerances.rounding_tol`, :func:`half_tolerances.network_tol`); the refinement's maps are computed in
float32. The core on half q/k/v: tests/test_half_precision_core.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from half_tolerances import DTYPES, ids, network_tol, rounding_tol

# cfg 1: ComfyUI skips the negative prompt's pass, halving the half-precision CPU work (most CPUs have no fast float16
# convolution); the stages act on the positive prompt's rows, which is what these tests read.
STEPS, CFG, SEED = 2, 1.0, 3


@pytest.fixture(scope="module", params=DTYPES, ids=ids)
def half_model(request, comfy, tiny_checkpoint):
    """The tiny checkpoint's MODEL with its UNet stored *and computed* in ``dtype`` on the CPU.

    ComfyUI 0.3.64 computes in float32 on a CPU device whatever the UNet's dtype (``--fp16-unet``,
    ``--bf16-unet``, ``model_options["dtype"]``): ``comfy.model_management.unet_manual_cast`` answers float32 there
    because ``should_use_fp16`` / ``should_use_bf16`` are False for the CPU, and the model then casts its weights to
    float32 per layer (manual cast). On a GPU it answers None for fp16/bf16 and the UNet computes in its own dtype,
    which is what users run. So the load is done with ``unet_manual_cast`` answering None for ``dtype``, monkeypatched
    for this one load only (the model keeps the answer it got; nothing else reads it), which gives on the CPU the
    model a GPU gets: weights and activations in ``dtype``.
    """
    import comfy.model_management
    import comfy.sd

    dtype = request.param
    original = comfy.model_management.unet_manual_cast

    def no_manual_cast(weight_dtype, device, *args, **kwargs):
        return None if weight_dtype == dtype else original(weight_dtype, device, *args, **kwargs)
    with torch.inference_mode():
        as_shipped = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False, output_clip=False,
                                                           model_options={"dtype": dtype})[0]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(comfy.model_management, "unet_manual_cast", no_manual_cast)
            model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False, output_clip=False,
                                                          model_options={"dtype": dtype})[0]
    # why the patch is needed: without it the CPU computes this half UNet in float32
    assert as_shipped.model.manual_cast_dtype == torch.float32
    assert model.model.manual_cast_dtype is None
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {dtype}
    return model


@pytest.fixture(scope="module")
def sigmas(comfy, tiny_model):
    return comfy.node("BasicScheduler")().get_sigmas(tiny_model.model, "normal", STEPS, 1.0)[0]


class Seen:
    """Wraps the core functions the ComfyUI replace calls (same arguments, same result) and checks each call.

    ``check_gate(run, a, out)`` gets the gate's arguments by name (``a["q"]``, ``a["part"]``, ``a["leak"]``, ...) and
    ``run(**a)``, the original function; ``check_cross(run, q, k, v, bias, out)``.
    """

    def __init__(self, monkeypatch, check_gate=None, check_cross=None):
        from cxr_counterfactual.hosts.comfy import replace as patch

        self.dtypes: set[torch.dtype] = set()
        self.calls = {"attn1": 0, "attn2": 0}
        gate, cross = patch.gated_self_attention, patch.token_masked_cross_attention

        signature = inspect.signature(gate)

        def gated(*args, **kwargs):
            out = gate(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.dtypes.add(bound.arguments["q"].dtype)
            self.calls["attn1"] += 1
            if check_gate is not None:
                check_gate(gate, dict(bound.arguments), out)
            return out

        def masked(q, k, v, bias):
            out = cross(q, k, v, bias)
            self.dtypes.add(q.dtype)
            self.calls["attn2"] += 1
            if check_cross is not None:
                check_cross(cross, q, k, v, bias, out)
            return out
        monkeypatch.setattr(patch, "gated_self_attention", gated)
        monkeypatch.setattr(patch, "token_masked_cross_attention", masked)


def ksample(comfy, model, chest, sigmas, sampler=None, seed=SEED):
    sampler = sampler or comfy.node("KSamplerSelect")().get_sampler("euler")[0]
    with torch.inference_mode():
        out = comfy.node("SamplerCustom")().sample(model, True, seed, CFG, chest.positive, chest.negative, sampler,
                                                   sigmas, chest.latent)[0]
    return out["samples"]


def test_hard_gate_isolates_each_region_inside_the_half_unet(comfy, half_model, chest, sigmas, monkeypatch):
    """At every gated self-attention of the sampled model (its real half activations on the radiograph), each region's
    outputs are bit-identical when every other region's queries, keys and values are replaced."""
    from cxr_helpers import gate

    dtype = half_model.model.diffusion_model.dtype
    regions = []

    def check(gate_fn, a, out):
        q, k, v, part, background = a["q"], a["k"], a["v"], a["part"], a["background"]
        assert a["leak"] == 0.0
        for label, _, _ in part.slices:
            if label == 0 and background == "free":
                continue
            inside = part.labels == label
            changed = [t.clone() for t in (q, k, v)]
            for t in changed:
                t[:, :, ~inside] = torch.randn_like(t[:, :, ~inside]) * 10
            again = gate_fn(**{**a, "q": changed[0], "k": changed[1], "v": changed[2]})
            assert torch.equal(again[:, :, inside], out[:, :, inside]), (part.names[label], part.height, part.width)
            regions.append(label)
    seen = Seen(monkeypatch, check_gate=check)
    gated = gate(comfy, half_model, chest, background="confined")
    out = ksample(comfy, gated, chest, sigmas)
    assert seen.dtypes == {dtype}  # our replace really sees half q/k/v
    assert bool(torch.isfinite(out).all())
    assert seen.calls["attn1"] >= 2 * STEPS and len(regions) >= seen.calls["attn1"]


def test_soft_gate_and_token_masking_agree_with_float32_per_layer(comfy, half_model, chest, sigmas, monkeypatch):
    """Soft gating and anatomy-token masking at every layer of the sampled half model agree with the same call in
    float32 on the same (half) inputs within :func:`rounding_tol`."""
    from cxr_helpers import gate

    dtype = half_model.model.diffusion_model.dtype
    worst = {"attn1": 0.0, "attn2": 0.0}

    def check_gate(gate_fn, a, out):
        q, k, v, leak = a["q"], a["k"], a["v"], a["leak"]
        assert 0.0 < leak < 1.0
        ref = gate_fn(q.float(), k.float(), v.float(), a["part"], leak, a["background"])  # torch's kernels, float32
        err = float((out.float() - ref).abs().max()) / rounding_tol(dtype, float(v.abs().max()), 3)
        worst["attn1"] = max(worst["attn1"], err)

    def check_cross(cross_fn, q, k, v, bias, out):
        ref = cross_fn(q.float(), k.float(), v.float(), bias)
        largest = float(bias[torch.isfinite(bias)].abs().max())
        err = float((out.float() - ref).abs().max()) / rounding_tol(dtype, float(v.abs().max()), 2, largest)
        worst["attn2"] = max(worst["attn2"], err)
    seen = Seen(monkeypatch, check_gate=check_gate, check_cross=check_cross)
    out = ksample(comfy, gate(comfy, half_model, chest, strength=0.7, token_strength=0.8), chest, sigmas)
    assert seen.dtypes == {dtype} and min(seen.calls.values()) >= 2 * STEPS
    assert bool(torch.isfinite(out).all())
    assert worst["attn1"] <= 1.0 and worst["attn2"] <= 1.0, worst


def _shares(comfy, model, chest, sigmas, label):
    from test_boosting import capture

    from cxr_counterfactual.hosts.comfy.patch import run_state

    m = capture(comfy, model, chest, label=label, grid_factor="2", target_organs="left_lung")
    out = ksample(comfy, m, chest, sigmas)
    steps = run_state(m).store.latest().capture[label].steps
    for st in steps.values():
        assert all(bool(torch.isfinite(x).all()) for x in st.maps.values())
    return out, {s: st.share_sum / st.share_layers for s, st in steps.items()}


def test_boost_raises_the_in_target_share_as_in_float32(comfy, half_model, tiny_model, chest, sigmas, monkeypatch):
    """Capture and boost on the half UNet: the boost raises the pathology word's share of attention inside the left
    lung at every step, and at the first step (the same input latent in both precisions) by as much as in float32
    within :func:`network_tol`."""
    from test_boosting import boost

    dtype = half_model.model.diffusion_model.dtype
    worst = [0.0]

    def check_cross(cross_fn, q, k, v, bias, out):
        if q.dtype == torch.float32:  # the float32 model's run
            return
        ref = cross_fn(q.float(), k.float(), v.float(), bias)
        largest = float(bias[torch.isfinite(bias)].abs().max())
        worst[0] = max(worst[0], float((out.float() - ref).abs().max()) / rounding_tol(dtype, float(v.abs().max()),
                                                                                         2, largest))
    shares = {}
    seen = Seen(monkeypatch, check_cross=check_cross)
    for name, model in (("half", half_model), ("float32", tiny_model.model)):
        seen.dtypes.clear()
        seen.calls["attn2"] = 0
        out, stock = _shares(comfy, model, chest, sigmas, "stock")
        boosted_out, boosted = _shares(comfy, boost(comfy, model, chest, end_percent=1.0), chest, sigmas, "boost")
        assert bool(torch.isfinite(out).all() and torch.isfinite(boosted_out).all())
        assert seen.calls["attn2"] >= STEPS
        assert seen.dtypes == {dtype if name == "half" else torch.float32}
        assert len(stock) == STEPS and stock.keys() == boosted.keys()
        for s in stock:
            assert boosted[s] > stock[s] + 0.01, (name, s, stock[s], boosted[s])
        shares[name] = (stock, boosted)
    assert worst[0] <= 1.0, worst
    first = float(sigmas[0])
    (hs, hb), (fs, fb) = shares["half"], shares["float32"]
    tol = network_tol(dtype, len(list(half_model.model.diffusion_model.parameters())))
    assert abs(hs[first] - fs[first]) <= tol * fs[first]
    assert abs(hb[first] - fb[first]) <= tol * fb[first]
    # the rise itself (a difference of two shares, each within tol of its own size)
    assert abs((hb[first] - hs[first]) - (fb[first] - fs[first])) <= tol * (fb[first] + fs[first])


def test_refinement_lowers_the_energy_of_the_half_unet(comfy, half_model, tiny_model, chest, sigmas):
    """CXR Refinement Sampler on the half UNet: its gradient pass runs through half weights (float32 energy and
    reductions), every iteration lowers the energy, and the first energy (same latent in both precisions) is the float32
    model's within :func:`network_tol`."""
    from node_run import run

    records = {}
    for name, model in (("half", half_model), ("float32", tiny_model.model)):
        sampler = run(comfy.node("CXRRefinementSampler"), tokens=chest.tokens, organ_masks=chest.masks, iterations=1,
                      step_size=0.5, end_percent=0.5, grid_factor="2", smoothing=0.0)[0]
        out = ksample(comfy, model, chest, sigmas, sampler)
        assert bool(torch.isfinite(out).all())
        records[name] = sampler.sampler_function.store.for_latent(out).refine
    refined = records["half"]
    assert len(refined) == 1  # the first step's sigma lies in the window (0 to 50 % of the noise range)
    for st in refined:
        assert st.iterations == 1
        assert all(b > a for b, a in zip(st.energies, st.energies[1:], strict=False)), st.energies
        assert torch.isfinite(st.latent_after).all()
    dtype = half_model.model.diffusion_model.dtype
    tol = network_tol(dtype, len(list(half_model.model.diffusion_model.parameters())))
    e_half, e_float = refined[0].energies[0], records["float32"][0].energies[0]
    assert abs(e_half - e_float) <= tol * (1 - e_float)  # 1 − E is the in-target share
