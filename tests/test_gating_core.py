"""Pure core tests of anatomy gating on tiny tensors: isolation, soft = dense reference, token masks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICES
from cxr_counterfactual.attention.gating import (
    anatomy_token_bias,
    gated_self_attention,
    gated_self_attention_dense,
    token_masked_cross_attention,
)
from cxr_counterfactual.attention.kernels import _lse_reference, sdpa, sdpa_with_lse, to_flat, to_heads
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.regions import RegionCache, coverage, partition


def grid_masks(h: int, w: int) -> OrganMasks:
    """Three organs on an h×w mask grid: two side-by-side 'lungs' and an overlapping 'heart'."""
    rl, ll, heart = torch.zeros(h, w), torch.zeros(h, w), torch.zeros(h, w)
    rl[h // 5 : 4 * h // 5, w // 10 : w // 2 - 1] = 1
    ll[h // 5 : 4 * h // 5, w // 2 + 1 : 9 * w // 10] = 1
    heart[h // 2 : 4 * h // 5, 2 * w // 5 : 3 * w // 5] = 1
    return OrganMasks.from_dict({"right_lung": rl, "left_lung": ll, "heart": heart})


def qkv(b, heads, n, d, seed=0, m=None, device="cpu"):
    """Seeded q, k, v (drawn on the CPU, so every device gets the same values), moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (torch.randn(b, heads, n, d, generator=g).to(device), torch.randn(b, heads, m, d, generator=g).to(device),
            torch.randn(b, heads, m, d, generator=g).to(device))


ORGANS = ("heart", "right_lung", "left_lung")


@pytest.mark.parametrize("grid", [(5, 7), (7, 5), (10, 8), (20, 16), (40, 32), (80, 64), (13, 9)])
def test_partition_is_exact_on_odd_and_non_square_grids(grid):
    h, w = grid
    masks = grid_masks(h * 8, w * 8)
    part = partition(masks, ORGANS, h, w)
    assert part.labels.shape == (h * w,) and sum(part.counts) == h * w
    assert torch.equal(part.labels[part.perm].sort().values, part.labels[part.perm])  # grouped by region
    assert torch.equal(part.perm[part.inv], torch.arange(h * w))


def test_overlap_rule_largest_cover_then_first_listed():
    a, b = torch.zeros(4, 8), torch.zeros(4, 8)
    a[:, :5] = 1  # a covers columns 0-4, b columns 4-7: column 4 is shared (a tie)
    b[:, 4:] = 1
    masks = OrganMasks.from_dict({"a": a, "b": b})
    assert partition(masks, ("a", "b"), 4, 8).labels.view(4, 8)[0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert partition(masks, ("b", "a"), 4, 8).labels.view(4, 8)[0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    # On a 2×4 grid cell 2 covers columns 4-5: b covers all of it, a half, so b wins in either order.
    assert partition(masks, ("a", "b"), 2, 4).labels.view(2, 4)[0].tolist() == [1, 1, 2, 2]


def test_vanishing_region_is_reported_not_an_error():
    m = torch.zeros(64, 64)
    m[10:12, 10:12] = 1
    masks = OrganMasks.from_dict({"dot": m, "big": torch.ones(64, 64)})
    part = partition(masks, ("dot", "big"), 4, 4)
    assert part.missing() == ["dot"] and part.counts[1] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("background", ["confined", "free"])
@pytest.mark.parametrize("grid", [(5, 7), (8, 6)])
def test_hard_gating_exact_isolation(background, grid, device):
    h, w = grid
    part = partition(grid_masks(h * 8, w * 8), ORGANS, h, w).to(torch.device(device))
    q, k, v = qkv(2, 3, h * w, 8, device=device)
    out = gated_self_attention(q, k, v, part, 0.0, background)
    for label in range(1, len(part.names)):
        inside = part.labels == label
        if not inside.any():
            continue
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        noise = torch.randn(2, 3, int((~inside).sum()), 8, device=device) * 10
        q2[:, :, ~inside] += noise
        k2[:, :, ~inside] += noise
        v2[:, :, ~inside] -= noise
        out2 = gated_self_attention(q2, k2, v2, part, 0.0, background)
        assert float((out2[:, :, inside] - out[:, :, inside]).abs().max()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("background", ["confined", "free"])
@pytest.mark.parametrize("leak", [0.0, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("grid", [(5, 7), (10, 8)])
def test_gating_equals_dense_mask_reference(background, leak, grid, device):
    h, w = grid
    part = partition(grid_masks(h * 8, w * 8), ORGANS, h, w).to(torch.device(device))
    q, k, v = qkv(2, 4, h * w, 16, seed=3, device=device)
    ours = gated_self_attention(q, k, v, part, leak, background)
    ref = gated_self_attention_dense(q, k, v, part, leak, background)
    assert float((ours - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_leak_one_is_stock_and_sdpa_lse_is_exact(device):
    # on CUDA sdpa_with_lse takes the memory-efficient kernel's log-sum-exp (padded queries, sliced back)
    part = partition(grid_masks(40, 56), ORGANS, 5, 7).to(torch.device(device))
    q, k, v = qkv(1, 2, 35, 8, device=device)
    torch.testing.assert_close(gated_self_attention(q, k, v, part, 1.0), sdpa(q, k, v))
    out, lse = sdpa_with_lse(q, k, v)
    ref_out, ref_lse = _lse_reference(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_layout_round_trip():
    x = torch.randn(2, 35, 4 * 8)
    torch.testing.assert_close(to_flat(to_heads(x, 4)), x)


@pytest.mark.parametrize("device", DEVICES)
def test_anatomy_token_bias_hides_tokens_outside_the_organ_and_renormalises(device):
    h, w = 5, 7
    masks = grid_masks(40, 56)
    inside = torch.stack([coverage(masks, ("left_lung",), h, w)])
    cond_len, ctx_len = 8, 16  # the context is the prompt repeated twice (LCM with the negative)
    positions = [(3, 4)]  # a two-token word
    q, k, v = qkv(1, 2, h * w, 8, m=ctx_len, device=device)
    for leak in (0.0, 0.25):
        bias = anatomy_token_bias(inside, positions, cond_len, ctx_len, leak)
        hidden_cols = [3, 4, 11, 12]  # index i also sits at i + cond_len
        assert torch.isfinite(bias[inside[0]]).all() and float(bias[inside[0]].abs().max()) == 0
        out = token_masked_cross_attention(q, k, v, bias.to(device))  # as the stages cache it: on q's device
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        weights = torch.ones(h * w, ctx_len, device=device)
        rows = (~inside[0]).nonzero().flatten()
        weights[rows[:, None].to(device), torch.tensor(hidden_cols, device=device)[None, :]] = leak
        p = torch.exp(scores) * weights
        p = p / p.sum(-1, keepdim=True)
        torch.testing.assert_close(out, p @ v, atol=1e-5, rtol=1e-5)
    assert float(anatomy_token_bias(inside, positions, cond_len, ctx_len, 1.0).abs().max()) == 0
    with pytest.raises(ValueError, match="multiple"):
        anatomy_token_bias(inside, positions, cond_len, 12, 0.0)


def test_region_cache_builds_once_and_survives_deepcopy():
    import copy

    cache, calls = RegionCache(), []
    build = lambda: calls.append(1) or torch.zeros(1)  # noqa: E731
    cache.get(("x", 5, 7), build)
    cache.get(("x", 5, 7), build)
    assert len(calls) == 1 and copy.deepcopy(cache) is cache


def test_coarse_grids_of_odd_latents_pad_instead_of_stretching():
    from cxr_counterfactual.attention.regions import fit_to_layer

    left = torch.zeros(56, 56)
    left[:, :28] = 1  # the left half of a 7×7 latent's field of view
    masks = OrganMasks.from_dict({"left": left})
    # A 7-wide latent becomes 4 tokens covering 8 latent columns: the organ spans 3.5 of them.
    fitted = fit_to_layer(masks, 4, 4, (7, 7))
    assert fitted.data.shape[-2:] == (64, 64)
    part = partition(masks, ("left",), 4, 4, latent=(7, 7))
    assert part.labels.view(4, 4)[0].tolist() == [1, 1, 0, 0]  # not stretched to 3 columns of 4
    with pytest.raises(Exception, match="aspect"):
        fit_to_layer(masks, 4, 2, (7, 3))
