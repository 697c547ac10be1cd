"""The gate composes with other attention patches: stubs of exactly known effect and the real PAG / SAG."""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import gate, sample
from node_run import run

from cxr_counterfactual.attention.gating import gated_self_attention
from cxr_counterfactual.attention.kernels import to_flat, to_heads
from cxr_counterfactual.attention.regions import partition

MIDDLE = ("middle", 0, 0)


@pytest.fixture(scope="module")
def host(comfy):
    """The ComfyUI adapter (importable once the ``comfy`` fixture has put ComfyUI on the path)."""
    from cxr_counterfactual.hosts.comfy import patch as host_comfy

    return host_comfy


def stock_attention(q, k, v, heads):
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, heads)


def doubled(q, k, v, extra):
    """A cooperative patch of known effect: stock attention × 2."""
    return 2 * stock_attention(q, k, v, extra["n_heads"])


def layer_inputs(host, key_grid=(4, 4), channels=640, heads=8, sigma=10.0):
    g = torch.Generator().manual_seed(0)
    n = key_grid[0] * key_grid[1]
    q, k, v = (torch.randn(2, n, channels, generator=g) for _ in range(3))
    extra = {"n_heads": heads, "activations_shape": [2, channels, *key_grid], "original_shape": [1, 4, 8, 7],
             "cond_or_uncond": [1, 0], "sigmas": torch.tensor([sigma, sigma]), "attn_precision": None,
             host.HOLDER_KEY: host.RunState()}
    return q, k, v, extra


def test_cooperative_patch_before_the_gate_becomes_its_kernel(comfy, host, tiny_model, chest):
    m = tiny_model.model.clone()
    m.set_model_attn1_replace(doubled, *MIDDLE)
    patched = gate(comfy, m, chest)
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn1"][MIDDLE]
    assert isinstance(replace, host.CXRReplace) and replace.inner is doubled
    q, k, v, extra = layer_inputs(host)
    out = replace(q, k, v, extra)
    # uncond row (first chunk): the other patch alone; cond row: that patch run per organ region.
    torch.testing.assert_close(out[:1], doubled(q[:1], k[:1], v[:1], extra))
    part = partition(chest.masks, ("right_lung", "left_lung", "heart"), 4, 4, latent=(8, 7))
    kernel = lambda a, b, c: 2 * to_heads(stock_attention(to_flat(a), to_flat(b), to_flat(c), 8), 8)  # noqa: E731
    expected = to_flat(gated_self_attention(to_heads(q[1:], 8), to_heads(k[1:], 8), to_heads(v[1:], 8), part,
                                            0.0, "free", kernel))
    torch.testing.assert_close(out[1:], expected, atol=1e-5, rtol=1e-5)
    plain = gate(comfy, tiny_model.model, chest)
    assert not torch.allclose(sample(comfy, patched, chest), sample(comfy, plain, chest))


def test_patch_that_overwrites_ours_is_reported(comfy, host, tiny_model, chest):
    patched = gate(comfy, tiny_model.model, chest)
    m = patched.clone()
    m.set_model_attn1_replace(doubled, *MIDDLE)  # what SAG does to its key
    sample(comfy, m, chest)
    conflicts = host.run_state(m).store.latest().conflicts
    assert [c.key for c in conflicts if c.kind == "overwritten"] == [MIDDLE]
    assert "doubled" in conflicts[0].message


def test_real_sag_after_is_reported_and_before_composes(comfy, host, tiny_model, chest128):
    chest = chest128  # SAG/PAG act on the middle block: it needs more than one token (see the fixture)
    sag = comfy.node("SelfAttentionGuidance")
    gated = gate(comfy, tiny_model.model, chest)
    after = run(sag, model=gated, scale=0.5, blur_sigma=2.0)[0]
    sample(comfy, after, chest)
    assert any(c.key == MIDDLE for c in host.run_state(after).store.latest().conflicts)
    sag_first = run(sag, model=tiny_model.model, scale=0.5, blur_sigma=2.0)[0]
    before = gate(comfy, sag_first, chest, apply_to_uncond=False)
    out = sample(comfy, before, chest)
    assert torch.isfinite(out).all() and not host.run_state(before).store.latest().conflicts
    assert not torch.allclose(out, sample(comfy, gated, chest))  # SAG is still acting
    # with the negative pass gated (the default), SAG's layer keeps the negative rows whole and says so, once
    both = gate(comfy, sag_first, chest)
    assert torch.isfinite(sample(comfy, both, chest)).all()
    assert [(c.kind, c.key) for c in host.run_state(both).store.latest().conflicts] == [("uncond-kernel", MIDDLE)]


def test_two_part_replace_installed_at_sampling_time_is_wrapped(comfy, tiny_model, chest):
    import comfy.model_patcher as model_patcher  # aliases: the fixture is called comfy
    import comfy.samplers as samplers

    calls = []

    def identity_attention(q, k, v, extra, mask=None):
        calls.append(q.shape)
        return v

    def post_cfg(args):  # what PAG does: an extra pass with a 2-part ("middle", 0) replace
        options = model_patcher.set_model_options_patch_replace(
            args["model_options"].copy(), identity_attention, "attn1", "middle", 0)
        (perturbed,) = samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                      options)
        return args["denoised"] + (args["cond_denoised"] - perturbed) * 0.5

    patched = gate(comfy, tiny_model.model, chest).clone()
    patched.set_model_sampler_post_cfg_function(post_cfg)
    sample(comfy, patched, chest)
    assert calls, "the 2-part replace never ran: our 3-part key shadowed it"


def test_real_pag_is_not_switched_off(comfy, tiny_model, chest128):
    chest = chest128  # SAG/PAG act on the middle block: it needs more than one token (see the fixture)
    pag = comfy.node("PerturbedAttentionGuidance")
    gated = gate(comfy, tiny_model.model, chest)
    with_pag = run(pag, model=gated, scale=3.0)[0]
    no_effect = run(pag, model=gated, scale=0.0)[0]
    base = sample(comfy, gated, chest)
    assert torch.equal(sample(comfy, no_effect, chest), base)
    assert float((sample(comfy, with_pag, chest) - base).abs().mean()) > 1e-3


def test_attention_override_is_honoured(comfy, tiny_model, chest):
    calls = []

    def override(func, *args, **kwargs):
        calls.append(kwargs.get("mask") is not None)
        return func(*args, **kwargs)

    def with_override(model):
        m = model.clone()
        m.model_options["transformer_options"]["optimized_attention_override"] = override
        return m

    for strength in (1.0, 0.5):
        reference = sample(comfy, gate(comfy, tiny_model.model, chest, strength=strength, token_strength=0.0), chest)
        after = with_override(gate(comfy, tiny_model.model, chest, strength=strength, token_strength=0.0))
        before = gate(comfy, with_override(tiny_model.model), chest, strength=strength, token_strength=0.0)
        for overridden in (after, before):
            calls.clear()
            out = sample(comfy, overridden, chest)
            assert calls, "the override was bypassed"
            if strength < 1.0:
                assert any(calls), "soft gating should hand the override a float mask"
            assert float((out - reference).abs().max()) < 1e-3 * float(reference.abs().max())
