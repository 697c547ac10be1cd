"""Half precision (float16, bfloat16) in the core, on half q/k/v: the attention kernels, hard and soft gating, token
masking, the boost and capture, and the masks' resampling, on the CheXmask example radiograph's organ masks.

Exact where it holds by construction: hard gating runs one attention per region, so the tokens of other regions never
enter a region's call (bit-identical outputs whatever they hold); a hidden anatomy token's ``-inf`` bias gives it a
weight of exactly 0; capture reads its probabilities in float32 from q and k (the same float32 tensors, the same ops);
masks are resampled in float32 whatever their dtype.

Elsewhere a tolerance derived from the dtype (:func:`half_tolerances.rounding_tol`). The UNet computing in half inside
ComfyUI: tests/test_half_precision_comfy.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from half_tolerances import DTYPES, MARGIN, ids, rounding_tol

from cxr_counterfactual.attention.boosting import pathology_boost_bias, token_probabilities
from cxr_counterfactual.attention.gating import anatomy_token_bias, gated_self_attention, token_masked_cross_attention
from cxr_counterfactual.attention.kernels import _lse_reference, sdpa_with_lse
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.regions import coverage, fit_to_layer, partition
from cxr_counterfactual.imaging.geometry import apply_fit, plan_fit

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
ORGANS = ("heart", "right_lung", "left_lung")
LATENT, GRID = (16, 14), (8, 7)  # the radiograph's aspect (899×786 px); the level-1 grid of that latent

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
