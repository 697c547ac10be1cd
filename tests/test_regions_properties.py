"""Properties of region labelling and gating on random organ masks and token grids (hypothesis).

For any masks (overlapping or not, any size with the grid's aspect ratio) and any grid: every token gets exactly
one label, the sort permutation and its inverse are inverse permutations, each region is one contiguous slice of
the sorted order, a cell inside exactly one organ gets that organ, and the overlap rule (the organ covering more of
a cell, ties to the organ listed first) holds. Gating on such partitions: hard gating isolates regions exactly and
soft gating equals the dense-mask reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICES
from cxr_counterfactual.attention.gating import gated_self_attention, gated_self_attention_dense
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.regions import partition

ORGANS = ("right_lung", "left_lung", "heart")


@st.composite
def masks_and_grid(draw):
    """Random blocky organ masks on an ``(f·h)×(f·w)`` grid and the ``h×w`` token grid (exact cells)."""
    h, w, f = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    data = (torch.rand(len(ORGANS), h * f, w * f, generator=g) < torch.rand(len(ORGANS), 1, 1, generator=g)).float()
    return OrganMasks(ORGANS, data), h, w, f


@settings(max_examples=60, deadline=None)
@given(masks_and_grid())
def test_every_token_has_one_label_and_the_sorted_order_is_a_partition(case):
    masks, h, w, f = case
    part = partition(masks, ORGANS, h, w)
    n = h * w
    assert part.labels.shape == (n,) and int(part.labels.min()) >= 0 and int(part.labels.max()) <= len(ORGANS)
    assert torch.equal(part.perm[part.inv], torch.arange(n)) and torch.equal(part.inv[part.perm], torch.arange(n))
    assert sum(part.counts) == n
    sorted_labels = part.labels[part.perm]
    for label, s, e in part.slices:
        assert bool((sorted_labels[s:e] == label).all())
    assert [s for _, s, _ in part.slices] == sorted({s for _, s, _ in part.slices})  # contiguous, ascending
    # The overlap rule, cell by cell: the organ covering most of the cell (≥ half), ties to the first listed.
    cover = masks.data.reshape(len(ORGANS), h, f, w, f).mean(dim=(2, 4)).reshape(len(ORGANS), n)
    for token in range(n):
        best = max(range(len(ORGANS)), key=lambda k: (float(cover[k, token]), -k))
        expected = best + 1 if float(cover[best, token]) >= 0.5 else 0
        assert int(part.labels[token]) == expected, (token, cover[:, token].tolist())


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(masks_and_grid(), st.sampled_from(["confined", "free"]), st.sampled_from([0.0, 0.2, 0.7]),
       st.integers(0, 2**16))
def test_gating_on_random_partitions(device, case, background, leak, seed):
    masks, h, w, _ = case
    part = partition(masks, ORGANS, h, w).to(torch.device(device))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, h * w, 8, generator=g).to(device) for _ in range(3))
    ours = gated_self_attention(q, k, v, part, leak, background)
    torch.testing.assert_close(ours, gated_self_attention_dense(q, k, v, part, leak, background), atol=1e-5, rtol=1e-5)
    if leak == 0.0:  # hard: changing another region's keys and values leaves a region's queries untouched
        for label, _, _ in part.slices:
            if label == 0 and background == "free":
                continue
            outside = part.labels != label
            k2, v2 = k.clone(), v.clone()
            k2[:, :, outside] += 3.0
            v2[:, :, outside] -= 5.0
            inside = ~outside
            again = gated_self_attention(q, k2, v2, part, leak, background)
            assert torch.equal(again[:, :, inside], ours[:, :, inside])
