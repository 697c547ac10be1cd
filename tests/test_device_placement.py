"""No tensor the core makes lands on another device than the activations it meets.

The stages build their region labels and biases from organ masks held on the CPU and cache them per device; the
attention, boost, map and refinement-step functions then meet activations on the model's device. An op that mixes a
CPU tensor (other than a 0-dim scalar) with tensors of another device raises, on CUDA as on PyTorch's ``meta``
device, which computes shapes only. So these paths, run with activations on ``meta``, prove on a CPU-only machine that
nothing in them is made on the CPU and used as is (a missing ``device=`` or ``.to(device)``); on CUDA the same
tests run with ``cuda`` (``benchmarks/gpu.py``), where the values are checked against the CPU too.

(Index tensors are not covered by ``meta``: its ``index_select`` accepts a CPU index, so those are checked on CUDA.)
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES
from cxr_counterfactual.attention.field import Field
from cxr_counterfactual.attention.gating import gated_self_attention, token_masked_cross_attention
from cxr_counterfactual.attention.layer_call import cross_bias, pathology_maps
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.refinement import refinement_step, smooth_maps
from cxr_counterfactual.attention.stage_builders import boost_stage, gate_stage
from cxr_counterfactual.attention.tokens import TokenMap

H, W, CONTEXT = 5, 7, 154  # a 5×7 token grid of a 5×7 latent; the prompt (77) repeated twice
TARGETS = ["meta", *DEVICES]


def masks() -> OrganMasks:
    rl, ll, heart = torch.zeros(40, 56), torch.zeros(40, 56), torch.zeros(40, 56)
    rl[8:32, 5:27] = 1
    ll[8:32, 29:50] = 1
    heart[20:32, 22:34] = 1
    return OrganMasks.from_dict({"right_lung": rl, "left_lung": ll, "heart": heart})


def stages():
    tokens = TokenMap(77, {"left lung": (3, 4), "effusion": (6, 7)}, anatomy={"left lung": ("left_lung",)},
                      pathology=("effusion",))
    to_sigma = lambda p: 14.6 * (1 - p)  # noqa: E731 (any decreasing map: the windows are not exercised here)
    gate = gate_stage(masks(), to_sigma, tokens=tokens, strength=1.0, token_strength=1.0, background="confined")
    boost = boost_stage(tokens, masks().select(("left_lung",)), to_sigma, factor=3.0, outside_damping=0.5)
    return gate, boost


def activations(device: str, n: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 8, generator=g)
    k, v = torch.randn(2, 4, m, 8, generator=g), torch.randn(2, 4, m, 8, generator=g)
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("device", TARGETS)
@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("background", ["confined", "free"])
def test_self_gating_stays_on_the_activations_device(device, leak, background):
    gate, _ = stages()
    field = Field((H, W))
    part = gate.partition(H, W, field, torch.device(device))
    assert {part.labels.device.type, part.perm.device.type, part.inv.device.type} == {torch.device(device).type}
    q, k, v = activations(device, H * W, H * W)
    out = gated_self_attention(q, k, v, part, leak, background)
    assert out.device.type == torch.device(device).type and out.shape == q.shape
    if device not in ("cpu", "meta"):  # the same values as on the CPU (float32 kernels: rounding only)
        cpu = gated_self_attention(*(t.cpu() for t in (q, k, v)), gate.partition(H, W, field, torch.device("cpu")),
                                   leak, background)
        torch.testing.assert_close(out.cpu(), cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", TARGETS)
def test_cross_biases_and_maps_stay_on_the_activations_device(device):
    gate, boost = stages()
    field = Field((H, W))
    bias = cross_bias([gate, boost], H, W, field, CONTEXT, torch.device(device))
    assert bias is not None and bias.device.type == torch.device(device).type and bias.shape == (H * W, CONTEXT)
    # cached per device: asking again on this device returns the same tensors, another device gets its own
    assert gate.cross_bias(H, W, field, CONTEXT, torch.device(device)) is gate.cross_bias(
        H, W, field, CONTEXT, torch.device(device))
    q, k, v = activations(device, H * W, CONTEXT, seed=1)
    out = token_masked_cross_attention(q, k, v, bias)
    maps = pathology_maps(q, k, bias, torch.tensor([6, 7, 83, 84]), H, W)  # CPU columns, as the stages hold them
    assert out.device.type == maps.device.type == torch.device(device).type and maps.shape == (2, H, W)
    if device not in ("cpu", "meta"):
        cpu_bias = cross_bias([gate, boost], H, W, field, CONTEXT, torch.device("cpu"))
        torch.testing.assert_close(bias.cpu(), cpu_bias)
        torch.testing.assert_close(maps.cpu(), pathology_maps(q.cpu(), k.cpu(), cpu_bias,
                                                              torch.tensor([6, 7, 83, 84]), H, W))


@pytest.mark.parametrize("device", TARGETS)
def test_refinement_step_and_smoothing_stay_on_the_latents_device(device):
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(2, 4, 6, 5, generator=g).to(device), torch.randn(2, 4, 6, 5, generator=g).to(device)
    mask = torch.zeros(1, 1, 6, 5)  # a LATENT's noise mask may still be on the CPU
    mask[..., 2:, :] = 1
    moved = refinement_step(x, grad, 1.5, 0.1, mask)
    smoothed = smooth_maps(torch.rand(2, 6, 5, generator=g).to(device), 0.5)
    assert moved.device.type == smoothed.device.type == torch.device(device).type
