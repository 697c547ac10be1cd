"""Pure core tests of one regulated joint (text + image) attention call of a diffusion transformer.

Exactness properties on tiny float32 tensors, as for the UNet's gate (``test_gating_core.py``): neutral settings
are the stock call itself, hard gating isolates regions exactly (by construction, not to a tolerance), hidden
anatomy tokens get weight 0, text rows stay stock, and every setting equals the dense-mask reference.
"""

from __future__ import annotations

import pytest
import torch
from test_gating_core import grid_masks  # two side-by-side 'lungs' and an overlapping 'heart'

from conftest import DEVICES
from cxr_counterfactual.attention.boosting import pathology_boost_bias
from cxr_counterfactual.attention.gating import anatomy_token_bias
from cxr_counterfactual.attention.joint import JointGate, JointLayout, joint_attention, joint_attention_dense
from cxr_counterfactual.attention.kernels import sdpa
from cxr_counterfactual.attention.regions import coverage, partition

ORGANS = ("heart", "right_lung", "left_lung")
TEXT = 12  # a short "prompt": positions 0..11


def joint_qkv(layout: JointLayout, b=2, heads=3, d=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, layout.total, d, generator=g).to(device) for _ in range(3))


def setup(grid=(5, 7), text_first=True, device="cpu"):
    h, w = grid
    masks = grid_masks(h * 8, w * 8)
    part = partition(masks, ORGANS, h, w).to(torch.device(device))
    layout = JointLayout(TEXT, h * w, text_first)
    inside = torch.stack([coverage(masks, ("left_lung",), h, w), coverage(masks, ("heart",), h, w)])
    anatomy = anatomy_token_bias(inside, [(3, 4), (6,)], TEXT, TEXT, 0.0)  # 'left lung' (2 tokens), 'heart'
    boost = pathology_boost_bias(inside[0], {"effusion": (8, 9)}, {"effusion": 3.0}, TEXT, TEXT, damping=0.5)
    return layout, part, inside, anatomy, boost


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("text_first", [True, False])
def test_neutral_settings_are_the_stock_call(text_first, device):
    layout, part, *_ = setup(text_first=text_first, device=device)
    q, k, v = joint_qkv(layout, device=device)
    stock = sdpa(q, k, v)
    for gate in (None, JointGate(part, 1.0)):
        assert torch.equal(joint_attention(q, k, v, layout, gate, None), stock)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("background", ["confined", "free"])
@pytest.mark.parametrize("grid", [(5, 7), (8, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_hard_gate_isolates_regions_exactly(with_bias, grid, background, text_first, device):
    layout, part, _, anatomy, boost = setup(grid, text_first, device)
    gate = JointGate(part, 0.0, background)
    bias = (anatomy + boost).to(device) if with_bias else None  # without a bias: one mask-free call per region
    q, k, v = joint_qkv(layout, device=device)
    out = joint_attention(q, k, v, layout, gate, bias)
    img = torch.arange(layout.total, device=device)[layout.image]
    for label in range(1, len(part.names)):
        inside = part.labels == label
        if not inside.any():
            continue
        others = img[~inside]
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        noise = torch.randn(2, 3, others.numel(), 8, device=device) * 10
        q2[:, :, others] += noise
        k2[:, :, others] += noise
        v2[:, :, others] -= noise
        out2 = joint_attention(q2, k2, v2, layout, gate, bias)
        rows = img[inside]
        assert float((out2[:, :, rows] - out[:, :, rows]).abs().max()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_hidden_anatomy_tokens_get_weight_zero(leak, device):
    layout, part, inside, anatomy, _ = setup(device=device)
    gate = JointGate(part, leak)
    q, k, v = joint_qkv(layout, device=device)
    out = joint_attention(q, k, v, layout, gate, anatomy.to(device))
    # Change the hidden word's text tokens ('left lung' at 3, 4): image rows outside the left lung do not move.
    text = torch.arange(layout.total, device=device)[layout.text]
    cols = text[[3, 4]]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cols] += 5.0
    v2[:, :, cols] -= 7.0
    out2 = joint_attention(q, k2, v2, layout, gate, anatomy.to(device))
    img = torch.arange(layout.total, device=device)[layout.image]
    outside = img[~inside[0].to(device)]
    assert float((out2[:, :, outside] - out[:, :, outside]).abs().max()) == 0.0
    inside_rows = img[inside[0].to(device)]
    assert float((out2[:, :, inside_rows] - out[:, :, inside_rows]).abs().max()) > 1e-3  # inside still sees it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("text_first", [True, False])
def test_text_rows_stay_stock(text_first, device):
    layout, part, _, anatomy, boost = setup(text_first=text_first, device=device)
    q, k, v = joint_qkv(layout, device=device)
    out = joint_attention(q, k, v, layout, JointGate(part, 0.0), (anatomy + boost).to(device))
    t = layout.text
    assert torch.equal(out[:, :, t], sdpa(q[:, :, t], k, v))  # the stock kernel over every key, same order
    torch.testing.assert_close(out[:, :, t], sdpa(q, k, v)[:, :, t], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("background", ["confined", "free"])
@pytest.mark.parametrize("leak", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_dense_reference(with_bias, leak, background, text_first, device):
    layout, part, _, anatomy, boost = setup((7, 5), text_first, device)
    gate = JointGate(part, leak, background)
    bias = (anatomy + boost).to(device) if with_bias else None
    q, k, v = joint_qkv(layout, seed=3, device=device)
    ours = joint_attention(q, k, v, layout, gate, bias)
    ref = joint_attention_dense(q, k, v, layout, gate, bias)
    assert float((ours - ref).abs().max()) < 1e-5


def test_image_first_is_the_text_first_call_reordered():
    first, part, _, anatomy, boost = setup(text_first=True)
    flipped = JointLayout(first.text_len, first.image_len, text_first=False)
    q, k, v = joint_qkv(first)
    gate, bias = JointGate(part, 0.2), anatomy + boost
    order = torch.cat((torch.arange(TEXT, first.total), torch.arange(TEXT)))  # image tokens, then text
    a = joint_attention(q, k, v, first, gate, bias)
    b = joint_attention(q[:, :, order], k[:, :, order], v[:, :, order], flipped, gate, bias)
    torch.testing.assert_close(b, a[:, :, order], atol=1e-6, rtol=1e-5)


def test_mismatched_shapes_are_refused():
    layout, part, _, anatomy, _ = setup()
    q, k, v = joint_qkv(layout)
    with pytest.raises(ValueError, match="text"):
        joint_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], layout)
    with pytest.raises(ValueError, match="grid"):
        joint_attention(q, k, v, layout, JointGate(partition(grid_masks(48, 48), ORGANS, 6, 6)))
    with pytest.raises(ValueError, match="image tokens × text tokens"):
        joint_attention(q, k, v, layout, None, anatomy[:, :5])
    with pytest.raises(ValueError, match="leak"):
        JointGate(part, 1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_biased_lse_kernel_fused_and_explicit_paths_agree(device):
    """The image → text part: torch's fused kernel with the bias (a bias with no all-blocked row) and the explicit
    float32 scores give the same output and log-sum-exp (float32 accumulation over 9 keys of dim 8: 1e-5 is
    ~100× the rounding); a hidden key has weight exactly 0 on both; a row whose keys are all blocked takes the
    explicit path: zero output, log-sum-exp -inf (so merge_by_lse gives the image keys all the weight)."""
    from cxr_counterfactual.attention.kernels import _biased_reference, biased_with_lse

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 12, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    v = torch.zeros(2, 3, 9, 8)
    v[..., 4, 0] = 1.0  # the output's channel 0 is key 4's weight
    v[..., :, 1:] = torch.randn(2, 3, 9, 7, generator=g)
    q, k, v = q.to(device), k.to(device), v.to(device)
    bias = torch.zeros(12, 9)
    bias[:, 4] = float("-inf")
    bias[3:7, 2] = 1.0986  # log 3: a boost
    out, lse = biased_with_lse(q, k, v, bias)
    ref, ref_lse = _biased_reference(q, k, v, bias)
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert (out[..., 0] == 0).all() and (ref[..., 0] == 0).all()
    bias[5] = float("-inf")
    out, lse = biased_with_lse(q, k, v, bias)
    assert (out[:, :, 5] == 0).all() and torch.isneginf(lse[:, :, 5]).all()
    assert torch.isfinite(lse[:, :, :5]).all()
