"""Half precision (float16, bfloat16), tested where it is real: the core on half q/k/v, and ComfyUI with the UNet
really computing in half on the CPU.

Exact where it holds by construction: hard gating runs one attention per region, so the tokens of other regions never
enter a region's call (bit-identical outputs whatever they hold); a hidden anatomy token's ``-inf`` bias gives it a
weight of exactly 0; capture and the refinement's maps are computed in float32 from q and k (the same float32
tensors, the same ops); masks are resampled in float32 whatever their dtype.

Elsewhere a tolerance derived from the dtype (:func:`rounding_tol`, :func:`network_tol`).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from cxr_counterfactual.attention.boosting import pathology_boost_bias, token_probabilities
from cxr_counterfactual.attention.gating import anatomy_token_bias, gated_self_attention, token_masked_cross_attention
from cxr_counterfactual.attention.kernels import _lse_reference, sdpa_with_lse
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.regions import coverage, fit_to_layer, partition
from cxr_counterfactual.imaging.geometry import apply_fit, plan_fit

DTYPES = (torch.float16, torch.bfloat16)
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
ORGANS = ("heart", "right_lung", "left_lung")
LATENT, GRID = (16, 14), (8, 7)  # the radiograph's aspect (899×786 px); the level-1 grid of that latent
# A margin of 2 over each bound below: the bounds are first order (products of two rounding errors are dropped).
MARGIN = 2.0


def rounding_tol(dtype: torch.dtype, scale: float, roundings: int, bias: float = 0.0) -> float:
    """How far an attention output computed in ``dtype`` may lie from float32 on the same (rounded) inputs.

    An attention output is a convex combination of value rows, so every error is relative to ``scale = max|v|``.
    Each rounding to ``dtype`` (round to nearest) moves a value by at most ``eps/2`` of it: the kernels keep scores,
    maxima and sums in float32 (products of two half numbers are exact in float32) and round the probabilities
    before ``P·V`` and the output once each (2 roundings per pass); soft gating merges two such passes (a convex
    combination: at most the larger of their errors) and rounds the merge (3). An additive bias ``b`` rounded to
    ``dtype`` shifts a score by ``|b|·eps/2``, scaling a weight by ``exp(±|b|·eps/2)``; re-normalised, that moves the
    combination by at most ``|b|·eps·scale``.
    """
    return MARGIN * (roundings / 2 + bias) * torch.finfo(dtype).eps * scale


def network_tol(dtype: torch.dtype, ops: int, confidence: float = 4.0) -> float:
    """Relative difference allowed between a quantity read from the UNet in ``dtype`` and in float32, same input.

    Each of the ``ops`` operations from the latent to a layer (at most one per weight tensor of the UNet, whose
    normalisations keep activations at unit scale) rounds once, a relative error of at most ``u = eps/2``. Rounding
    errors of independent operations add up like a random walk: ``|error| ≤ λ·sqrt(ops)·u`` with probability at least
    ``1 − 2·exp(−λ²/2)`` (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
    Comput. 41(5), 2019); ``λ = 4``: 0.9993. A share of attention (a ratio of sums of probabilities) inherits it.
    """
    return confidence * math.sqrt(ops) * torch.finfo(dtype).eps / 2


_MASKS: dict = {}


def real_masks(chexmask_example) -> OrganMasks:
    """The CheXmask example radiograph's human organ masks (899×786 px), read once per run."""
    from cxr_helpers import chexmask_radiograph

    if chexmask_example not in _MASKS:
        _MASKS[chexmask_example] = chexmask_radiograph(chexmask_example)[1]
    return _MASKS[chexmask_example]


def qkv(dtype, device, n, m=None, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q, k, v = torch.randn(1, heads, n, d, generator=g), torch.randn(1, heads, m, d, generator=g), \
        torch.randn(1, heads, m, d, generator=g)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def ids(value) -> str:
    return str(value).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# core, on half q/k/v
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_kernels_take_half_and_give_a_float32_log_sum_exp(dtype, device):
    q, k, v = qkv(dtype, device, 56)
    if device == "cpu":  # the CPU flash kernel itself takes both dtypes (no fallback hides a refusal)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
        assert out.dtype == dtype and lse.dtype == torch.float32
    out, lse = sdpa_with_lse(q, k, v)
    ref_out, ref_lse = _lse_reference(q.float(), k.float(), v.float())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert float((out.float() - ref_out).abs().max()) <= rounding_tol(dtype, float(v.abs().max()), 2)
    # The log-sum-exp stays in float32: its error is float32's (d products and m exponentials summed), not dtype's.
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lse64 = torch.logsumexp(scores, -1)
    bound = MARGIN * (q.shape[-1] + k.shape[2]) * torch.finfo(torch.float32).eps * float(scores.abs().max() + 1)
    assert float((lse.double() - lse64).abs().max()) <= bound
    assert float((ref_lse.double() - lse64).abs().max()) <= bound


@pytest.mark.parametrize("background", ["confined", "free"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_hard_gating_isolation_is_exact_in_half(dtype, device, background, chexmask_example):
    part = partition(real_masks(chexmask_example), ORGANS, *GRID, latent=LATENT).to(torch.device(device))
    q, k, v = qkv(dtype, device, GRID[0] * GRID[1])
    out = gated_self_attention(q, k, v, part, 0.0, background)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    checked = 0
    for label in range(0 if background == "confined" else 1, len(part.names)):  # free background sees every key
        inside = part.labels == label
        if not inside.any():
            continue
        noise = qkv(dtype, device, int((~inside).sum()), seed=label + 1)
        changed = [t.clone() for t in (q, k, v)]
        for t, n in zip(changed, noise, strict=True):
            t[:, :, ~inside] = n * 10  # other regions' queries, keys and values: anything at all
        again = gated_self_attention(*changed, part, 0.0, background)
        assert torch.equal(again[:, :, inside], out[:, :, inside]), part.names[label]
        assert not torch.equal(again[:, :, ~inside], out[:, :, ~inside])
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("leak", [0.01, 0.3, 0.9])
@pytest.mark.parametrize("background", ["confined", "free"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_soft_gating_agrees_with_float32(dtype, device, background, leak, chexmask_example):
    part = partition(real_masks(chexmask_example), ORGANS, *GRID, latent=LATENT).to(torch.device(device))
    q, k, v = qkv(dtype, device, GRID[0] * GRID[1], seed=3)
    out = gated_self_attention(q, k, v, part, leak, background)
    ref = gated_self_attention(q.float(), k.float(), v.float(), part, leak, background)
    tol = rounding_tol(dtype, float(v.abs().max()), 3)
    assert out.dtype == dtype
    assert float((out.float() - ref).abs().max()) <= tol
    # the tolerance is far below what gating does (a gate that does not gate would fail it)
    hard = gated_self_attention(q.float(), k.float(), v.float(), part, 0.0, background)
    assert float((hard - torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())).abs()
                 .max()) > 4 * tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_token_masking_boost_and_capture_in_half(dtype, device, chexmask_example):
    masks = real_masks(chexmask_example)
    n = GRID[0] * GRID[1]
    cover = torch.stack([coverage(masks, o, *GRID, latent=LATENT) for o in (("left_lung",), ("heart",))])
    left, outside = cover[0], (~cover[0]).to(device)
    words = {"effusion": (9, 10)}
    q, k, v = qkv(dtype, device, n, 77, seed=5)
    scale = float(v.abs().max())
    for leak in (0.0, 0.2):
        token = anatomy_token_bias(cover, [(5, 6), (12,)], 77, 77, leak)
        boost = pathology_boost_bias(left, words, {"effusion": 3.0}, 77, 77, damping=0.5)
        for bias in (token, boost, token + boost):
            assert bias.dtype == torch.float32  # built in float32; cast to the attention's dtype when applied
            out = token_masked_cross_attention(q, k, v, bias)
            ref = token_masked_cross_attention(q.float(), k.float(), v.float(), bias)
            largest = float(bias[torch.isfinite(bias)].abs().max())  # -inf stays -inf in every dtype
            assert out.dtype == dtype
            assert float((out.float() - ref).abs().max()) <= rounding_tol(dtype, scale, 2, largest)
    # a hidden token's weight is exactly 0 in half too: its key and value never reach the queries outside its organ
    token = anatomy_token_bias(cover, [(5, 6), (12,)], 77, 77, 0.0)
    out = token_masked_cross_attention(q, k, v, token)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, [5, 6]], v2[:, :, [5, 6]] = 7.0, -7.0
    again = token_masked_cross_attention(q, k2, v2, token)
    assert torch.equal(again[:, :, outside], out[:, :, outside])
    assert not torch.equal(again[:, :, ~outside], out[:, :, ~outside])
    # capture reads probabilities in float32 from q and k: the same as from their float32 copies, bit for bit
    boost = pathology_boost_bias(left, words, {"effusion": 3.0}, 77, 77)
    cols = torch.tensor(words["effusion"], device=device)
    probs = token_probabilities(q, k, boost, cols)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, token_probabilities(q.float(), k.float(), boost, cols))
    stock = token_probabilities(q, k, None, cols).sum(-1)
    assert bool((probs.sum(-1)[..., left.to(device)] > stock[..., left.to(device)]).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_masks_are_resampled_in_float32_whatever_their_dtype(dtype, chexmask_example):
    full = real_masks(chexmask_example)
    half = OrganMasks(full.names, full.data.to(dtype))
    same = OrganMasks(full.names, full.data.to(dtype).float())  # the half values, as float32
    assert half.data.dtype == torch.float32 and torch.equal(half.data, same.data)
    for grid, latent in ((GRID, LATENT), ((4, 4), LATENT), ((16, 14), (16, 14)), ((3, 3), (5, 5))):
        if latent == (5, 5):  # a square field of view: the masks padded to it (odd latent, coarse grid)
            sq = OrganMasks(full.names, torch.nn.functional.pad(full.data, (56, 57)).to(dtype))
            sq32 = OrganMasks(full.names, torch.nn.functional.pad(full.data, (56, 57)).to(dtype).float())
            a, b = partition(sq, ORGANS, *grid, latent=latent), partition(sq32, ORGANS, *grid, latent=latent)
        else:
            a, b = partition(half, ORGANS, *grid, latent=latent), partition(same, ORGANS, *grid, latent=latent)
        assert torch.equal(a.labels, b.labels)
    fitted = fit_to_layer(half, 4, 4, LATENT)
    assert fitted.data.dtype == torch.float32 and torch.equal(fitted.data, fit_to_layer(same, 4, 4, LATENT).data)
    assert torch.equal(half.resampled(40, 35).data, same.resampled(40, 35).data)
    assert torch.equal(half.dilated(3).data, same.dilated(3).data)
    assert torch.equal(half.feathered(2.0).data, same.feathered(2.0).data)
    # the biases a stage builds from them are float32; the attention casts them to its dtype (exactly that cast)
    cover = torch.stack([coverage(half, ("left_lung",), *GRID, latent=LATENT)])
    assert torch.equal(cover, torch.stack([coverage(same, ("left_lung",), *GRID, latent=LATENT)]))
    bias = anatomy_token_bias(cover, [(5,)], 77, 154, 0.3)
    assert bias.dtype == torch.float32
    # images and masks resized to the model's grid (Fit Radiograph to Model): float32 inside, cast back
    fit = plan_fit(899, 786, 64)
    image = torch.rand(1, 1, 899, 786, generator=torch.Generator().manual_seed(0)).to(dtype)
    for mode in ("image", "nearest", "bilinear"):
        out = apply_fit(image, fit, mode)
        assert out.dtype == dtype and torch.equal(out, apply_fit(image.float(), fit, mode).to(dtype))
    small = apply_fit(image, fit)
    grow = plan_fit(40, 35, 128)
    assert torch.equal(apply_fit(small[..., :40, :35], grow), apply_fit(small[..., :40, :35].float(), grow).to(dtype))


# ------------------------------------------------------------------------------------------------
# inside ComfyUI, the UNet computing in half on the CPU
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
