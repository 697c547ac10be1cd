"""Composition with other attention patches, checked against formulas of their exact effect.

Each check compares whole predictions of the tiny model on the real radiograph:

- ``denoised``: one guided model call at the first sigma (CFG and every post-CFG function included), taken
  through SamplerCustom with a one-call sampler, so a formula for a guidance method applies to it directly.
- Attention multiply (core ``UNet{Self,Cross}AttentionMultiply``) with ``v = 2`` doubles every attention output
  (attention is linear in v, and ×2 is exact in floating point). Hard gating and token masking are linear in v
  too, so the multiply before or after our gate must equal a cooperative stub after ours that doubles what it
  wraps, and (self-attention) our gate around a stub kernel installed before it that doubles stock attention.
  Cross-attention: a token mask cannot be handed to another pack's kernel; that documented conflict is reported.
- PAG before or after our gate: ``D_cfg(gated) + s · (C(gated) − C(gated, middle self-attention = v))``.
- SAG before our gate (our gate leaves the negative prompt's rows alone, which is all SAG reads and re-runs):
  ``D(gate ∘ SAG) = D_cfg(gated) + (D(SAG) − D_cfg(stock))``. This found a bug: SAG's extra pass holds the
  negative prompt alone, which ComfyUI labels 0 ("cond") by its place in the call; the positive prompt is now
  recognised by its conditioning ids. SAG after our gate overwrites our key: that
  documented conflict is reported (tests/test_gating_compose.py).
- Removing our node restores stock: every model without our node gives bit-identical output before and
  after gated copies of it were built and sampled.

Tolerance: the same arithmetic runs through different kernels and batch splits (ComfyUI's CPU attention on
the whole batch vs ours per cond row and region), which moves float32 results by rounding only: 1e-4 of the
prediction's scale. The effects themselves are 1e-2 or more of it (checked in each test).
"""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import gate as gate_at_defaults
from cxr_helpers import sample
from node_run import run

pytestmark = pytest.mark.slow

CFG = 5.0


def gate(comfy, model, chest, **overrides):
    """The gate with the negative prompt's rows stock unless ``overrides`` say otherwise: the formulas above are
    for that layout (the node's default gates both passes; README, "Defaults for the negative prompt's pass")."""
    return gate_at_defaults(comfy, model, chest, **{"apply_to_uncond": False, **overrides})


def denoised(comfy, model, chest, cfg: float = CFG) -> torch.Tensor:
    """The guided prediction at the first sigma of a 4-step schedule (one model call, post-CFG included)."""
    import comfy.samplers as samplers  # alias: the fixture is called comfy

    def one_call(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
        return model_fn(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))

    with torch.inference_mode():
        sigmas = comfy.node("BasicScheduler")().get_sigmas(model, "normal", 4, 1.0)[0]
        out = comfy.node("SamplerCustom")().sample(model, True, 3, cfg, chest.positive, chest.negative,
                                                  samplers.KSAMPLER(one_call), sigmas, chest.latent)[0]
    return out["samples"].clone()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


def differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a - b).abs().max()) > 1e-2 * float(b.abs().max())


def with_stub(comfy, model, kind: str, make):
    """A clone with ``make(previous)`` installed at every ``kind`` key (previous: what was there, or None)."""
    from cxr_counterfactual.hosts.comfy import unet_layout

    m = model.clone()
    replaces = m.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault(kind, {})
    for key in unet_layout.transformer_keys(model):  # one self- and one cross-attention each
        install = m.set_model_attn1_replace if kind == "attn1" else m.set_model_attn2_replace
        install(make(replaces.get(key)), *key)
    return m


def doubled_stock(previous):
    """Before our gate: a pack whose attention is stock attention × 2."""
    import comfy.ldm.modules.attention as attention

    assert previous is None

    def double(q, k, v, extra):
        return 2 * attention.optimized_attention(q, k, v, extra["n_heads"])

    return double


def doubling_wrapper(previous):
    """After our gate: a cooperative pack that wraps what it finds at the key and doubles its output."""
    assert previous is not None

    def double(q, k, v, extra):
        return 2 * previous(q, k, v, extra)

    return double


def conflicts(model) -> list[dict]:
    from cxr_counterfactual.hosts.comfy import patch as host_comfy

    return host_comfy.run_state(model).store.latest().conflicts


@pytest.mark.parametrize("node, kind", [("UNetSelfAttentionMultiply", "attn1"),
                                        ("UNetCrossAttentionMultiply", "attn2")])
def test_attention_multiply_before_and_after_ours_is_the_formula(comfy, tiny_model, chest, node, kind):
    base = tiny_model.model
    multiply = comfy.node(node)

    def mult(model):
        return run(multiply, model=model, q=1.0, k=1.0, v=2.0, out=1.0)[0]

    gated = sample(comfy, gate(comfy, base, chest), chest)
    wrapper = with_stub(comfy, gate(comfy, base, chest), kind, doubling_wrapper)
    formula = sample(comfy, wrapper, chest)  # a cooperative pack after ours: 2 × our attention
    assert not conflicts(wrapper), "a pack that calls our replace is no conflict"
    close(sample(comfy, gate(comfy, mult(base), chest), chest), formula)
    close(sample(comfy, mult(gate(comfy, base, chest)), chest), formula)
    differs(formula, gated)  # the multiply acts
    differs(formula, sample(comfy, mult(base), chest))  # and so does the gate
    close(sample(comfy, mult(base), chest), sample(comfy, with_stub(comfy, base, kind, doubled_stock), chest))

    # A pack's replace before ours becomes the kernel of our gate (exact for self-attention); a token mask
    # cannot be handed to another pack's kernel: that documented conflict is reported.
    before = gate(comfy, with_stub(comfy, base, kind, doubled_stock), chest)
    out = sample(comfy, before, chest)
    if kind == "attn1":
        close(out, formula)
        assert not conflicts(before)
    else:
        assert {c.kind for c in conflicts(before)} == {"token-mask"}


def test_pag_before_and_after_ours_is_the_formula(comfy, tiny_model, chest128):
    chest = chest128  # SAG/PAG act on the middle block: it needs more than one token (see the fixture)
    pag = comfy.node("PerturbedAttentionGuidance")
    scale = 3.0
    gated = gate(comfy, tiny_model.model, chest)
    perturbed = gated.clone()  # PAG's perturbation: the middle block's self-attention returns v
    perturbed.set_model_attn1_replace(lambda q, k, v, extra: v, "middle", 0, 0)
    expected = (denoised(comfy, gated, chest)
                + scale * (denoised(comfy, gated, chest, cfg=1.0) - denoised(comfy, perturbed, chest, cfg=1.0)))
    after = denoised(comfy, run(pag, model=gated, scale=scale)[0], chest)
    before = denoised(comfy, gate(comfy, run(pag, model=tiny_model.model, scale=scale)[0], chest), chest)
    close(after, expected)
    close(before, expected)
    differs(expected, denoised(comfy, gated, chest))
    differs(expected, denoised(comfy, run(pag, model=tiny_model.model, scale=scale)[0], chest))


def test_sag_before_ours_is_the_formula(comfy, tiny_model, chest128):
    chest = chest128  # SAG/PAG act on the middle block: it needs more than one token (see the fixture)
    sag = comfy.node("SelfAttentionGuidance")
    base = tiny_model.model
    with_sag = run(sag, model=base, scale=0.8, blur_sigma=2.0)[0]
    gated = gate(comfy, base, chest)
    sag_term = denoised(comfy, with_sag, chest) - denoised(comfy, base, chest)
    expected = denoised(comfy, gated, chest) + sag_term
    composed = gate(comfy, with_sag, chest)
    close(denoised(comfy, composed, chest), expected)
    assert not conflicts(composed)
    differs(expected, denoised(comfy, gated, chest))
    assert float(sag_term.abs().max()) > 1e-2 * float(expected.abs().max())

    # Gating the negative prompt too: SAG must still see that prompt's whole attention in its layer (it reads it
    # there), so that layer's negative rows stay ungated, and the run says so.
    both = gate(comfy, with_sag, chest, apply_to_uncond=True)
    out = sample(comfy, both, chest)
    assert torch.isfinite(out).all()
    assert [c.key for c in conflicts(both)] == [("middle", 0, 0)]
    differs(out, sample(comfy, gate(comfy, base, chest, apply_to_uncond=True), chest))


def test_removing_our_node_restores_stock_output(comfy, tiny_model, chest128):
    chest = chest128  # SAG/PAG act on the middle block: it needs more than one token (see the fixture)
    base = tiny_model.model
    others = {
        "stock": base,
        "pag": run(comfy.node("PerturbedAttentionGuidance"), model=base, scale=3.0)[0],
        "sag": run(comfy.node("SelfAttentionGuidance"), model=base, scale=0.5, blur_sigma=2.0)[0],
        "multiply": run(comfy.node("UNetSelfAttentionMultiply"), model=base, q=1.0, k=1.2, v=0.8, out=1.0)[0],
        "stub": with_stub(comfy, base, "attn1", doubled_stock),
    }
    first = {name: sample(comfy, m, chest) for name, m in others.items()}
    for name, m in others.items():  # our node on each, sampled
        regulated = sample(comfy, gate(comfy, m, chest), chest)
        assert not torch.equal(regulated, first[name]), name
    for name, m in others.items():
        assert torch.equal(sample(comfy, m, chest), first[name]), f"{name}: our node left a trace"
