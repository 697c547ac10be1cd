"""Gated layers run on the user's attention backend (real ComfyUI in-process, tiny checkpoint, CheXmask radiograph).

A *recording backend* is installed the way ComfyUI installs one: ``comfy.ldm.modules.attention.optimized_attention``
set to a ``wrap_attn``-wrapped function (and registered with ``register_attention_function``), which records every
call's shapes and then runs ComfyUI's own ``attention_pytorch``. Sampling through KSampler then shows, layer by layer,
which attention calls the model made: hard gating calls the backend once per region of the layer's partition (the
stage's own), with the heads layout ``[B, H, n_r, D]``; stock layers call it once over the whole ``N``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from cxr_helpers import gate, sample

from cxr_counterfactual.attention.field import Field
from cxr_counterfactual.attention.gating import gated_self_attention_dense
from cxr_counterfactual.attention.kernels import to_flat, to_heads
from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.attention.run_state import RunState


@pytest.fixture(scope="module")
def host(comfy):
    """The ComfyUI adapter (importable once the ``comfy`` fixture has put ComfyUI on the path)."""
    from cxr_counterfactual.hosts.comfy import patch as host_comfy

    return host_comfy


@dataclass(frozen=True)
class Call:
    """One call of the backend: the layer, its token grid, and the shapes it was given."""

    key: tuple
    grid: tuple[int, int]
    heads_layout: bool  # skip_reshape: q is [B, H, n, D] (else ComfyUI's flat [B, n, H·D])
    q: tuple[int, ...]
    n_k: int
    masked: bool

    @property
    def n_q(self) -> int:
        return self.q[2] if self.heads_layout else self.q[1]


@pytest.fixture
def recorder(comfy, monkeypatch):
    """Install a recording backend as ComfyUI installs one; returns the list its calls are appended to."""
    import comfy.ldm.modules.attention as attention

    calls: list[Call] = []

    def recorder(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                 **kwargs):
        options = kwargs.get("transformer_options") or {}
        block = options.get("block")
        key = (block[0], block[1], options.get("block_index", 0)) if block is not None else None
        grid = tuple(int(n) for n in options.get("activations_shape", (0, 0))[-2:])
        calls.append(Call(key, grid, skip_reshape, tuple(q.shape), k.shape[2] if skip_reshape else k.shape[1],
                          mask is not None))
        return attention.attention_pytorch(q, k, v, heads, mask=mask, attn_precision=attn_precision,
                                           skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                                           **kwargs)

    backend = attention.wrap_attn(recorder)
    monkeypatch.setattr(attention, "optimized_attention", backend)
    monkeypatch.setattr(attention, "optimized_attention_masked", backend)
    attention.register_attention_function("recorder", backend)
    yield calls
    attention.REGISTERED_ATTENTION_FUNCTIONS.pop("recorder", None)


def self_calls(calls: list[Call]) -> list[Call]:
    """The self-attention calls (cross-attention's keys are the 77 prompt tokens; no layer here has 77 tokens)."""
    return [c for c in calls if c.n_k != 77]


def expected_calls(stage, keys, grids: dict) -> Counter:
    """Per model call, the backend calls the hard gate makes: one per region of each layer's partition, over the
    region's own keys (the free background's queries over all keys); a one-region layer makes the stock call."""
    out: Counter = Counter()
    for key in keys:
        h, w = grids[key]
        part = stage.partition(h, w, Field(latent=(8, 7)), torch.device("cpu"))
        if len(part.slices) == 1:
            out[(key, False, h * w, h * w)] += 1
            continue
        for label, s, e in part.slices:
            free = label == 0 and stage.background == "free"
            out[(key, True, e - s, h * w if free else e - s)] += 1
    return out


def check_per_region(calls: list[Call], stage, keys, batch: int) -> None:
    mine = self_calls(calls)
    grids = {c.key: c.grid for c in mine}
    assert set(grids) == set(keys), "every gated layer called the backend"
    per_call = expected_calls(stage, keys, grids)
    seen = Counter((c.key, c.heads_layout, c.n_q, c.n_k) for c in mine)
    model_calls = seen[next(iter(per_call))] // per_call[next(iter(per_call))]
    assert model_calls >= 2  # 2 steps, each one model call or more
    assert seen == Counter({k: n * model_calls for k, n in per_call.items()})
    assert any(c.heads_layout for c in mine), "no layer was split into regions"
    for c in mine:
        assert not c.masked  # hard gating needs no mask
        if c.heads_layout:  # [B, H, n_r, D]: the rows of the call, the layer's heads and head size
            assert c.q[0] == batch and c.q[1] == 8 and c.q[3] in (40, 80, 160), c
    # cross-attention (not patched here) is the stock call: flat, whole N, once per layer and model call
    cross = [c for c in calls if c.n_k == 77]
    assert cross and all(not c.heads_layout and c.n_q == c.grid[0] * c.grid[1] for c in cross)


def test_hard_gating_calls_the_backend_once_per_region(comfy, host, tiny_model, chest, recorder):
    stock = sample(comfy, tiny_model.model, chest, steps=2)
    assert torch.isfinite(stock).all()
    assert recorder and all(not c.heads_layout and c.n_q == c.grid[0] * c.grid[1] for c in recorder)
    from cxr_counterfactual.hosts.comfy import unet_layout

    keys = unet_layout.transformer_keys(tiny_model.model)
    assert {c.key for c in self_calls(recorder)} == set(keys)  # stock: each layer once over its whole N
    recorder.clear()

    patched = gate(comfy, tiny_model.model, chest, token_strength=0.0)
    (stage,) = host.our_stages(patched.model_options)
    sample(comfy, patched, chest, steps=2)
    check_per_region(recorder, stage, keys, batch=2)  # cfg 7: negative and positive rows, both gated (default)
    assert host.run_state(patched).store.latest().attention == {"hard gating": "recorder"}


def test_an_attention_override_sees_every_region(comfy, host, tiny_model, chest, recorder):
    """Another pack's ``optimized_attention_override`` is called for each region (``wrap_attn`` routes to it) and
    hands the call on to the backend."""
    seen: list = []

    def override(func, *args, **kwargs):
        seen.append(func)
        return func(*args, **kwargs)

    patched = gate(comfy, tiny_model.model, chest, token_strength=0.0).clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = override
    (stage,) = host.our_stages(patched.model_options)
    sample(comfy, patched, chest, steps=2)
    from cxr_counterfactual.hosts.comfy import unet_layout

    check_per_region(recorder, stage, unet_layout.transformer_keys(tiny_model.model), batch=2)
    # every backend call went through the override, which wrap_attn hands the backend's own function
    assert len(seen) == len(recorder) and {f.__name__ for f in seen} == {"recorder"}
    assert host.run_state(patched).store.latest().attention["hard gating"] == (
        "recorder via optimized_attention_override test_an_attention_override_sees_every_region.<locals>.override")


def layer_inputs(host, grid=(8, 7), channels=320, heads=8):
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, n, channels, generator=g) for _ in range(3))
    extra = {"n_heads": heads, "dim_head": channels // heads, "activations_shape": [2, channels, *grid],
             "original_shape": [1, 4, 8, 7], "cond_or_uncond": [1, 0], "sigmas": torch.tensor([10.0, 10.0]),
             "attn_precision": None, "block": ("input", 1), "block_index": 0, host.HOLDER_KEY: RunState()}
    return q, k, v, extra


def test_one_region_over_every_token_is_the_stock_call(comfy, host, tiny_model, chest, recorder):
    """Every token of the layer in one organ: hard gating confines nothing and makes the stock call (same kernel,
    same inputs), so its output is bit-identical to the stock layer's by construction."""
    import comfy.ldm.modules.attention as attention

    one = OrganMasks.from_dict({"right_lung": torch.ones(chest.masks.height, chest.masks.width)})
    patched = gate(comfy, tiny_model.model, chest, organ_masks=one, organs="right_lung", tokens=None,
                   token_strength=0.0, background="confined")
    (stage,) = host.our_stages(patched.model_options)
    q, k, v, extra = layer_inputs(host)  # the 8×7 grid of the first level: the mask covers every token there
    assert len(stage.partition(8, 7, Field(latent=(8, 7)), torch.device("cpu")).slices) == 1
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn1"][("input", 1, 0)]
    out = replace(q, k, v, extra)
    gated_calls = list(recorder)
    recorder.clear()
    stock = attention.optimized_attention(q, k, v, 8, attn_precision=None, transformer_options=extra)
    assert torch.equal(out, stock) and gated_calls == recorder and len(recorder) == 1


@pytest.mark.parametrize("background", ["free", "confined"])
def test_soft_gating_without_a_log_sum_exp_is_exact_and_warns_once_per_run(comfy, host, tiny_model, chest, recorder,
                                                                           caplog, background):
    patched = gate(comfy, tiny_model.model, chest, strength=0.5, token_strength=0.0, background=background)
    (stage,) = host.our_stages(patched.model_options)

    # One layer, called as ComfyUI calls it: against the dense float-mask reference.
    replace = patched.model_options["transformer_options"]["patches_replace"]["attn1"][("input", 1, 0)]
    q, k, v, extra = layer_inputs(host)
    out = replace(q, k, v, extra)
    part = stage.partition(8, 7, Field(latent=(8, 7)), torch.device("cpu"))
    reference = to_flat(gated_self_attention_dense(to_heads(q, 8), to_heads(k, 8), to_heads(v, 8), part,
                                                   stage.self_leak, stage.background))
    # Both are softmax-weighted sums of N = 56 value rows in float32: each carries at most ~N·eps relative
    # rounding of max|v| (sums of N terms), the log-sum-exp merge a few eps more.
    tol = 2 * part.height * part.width * torch.finfo(torch.float32).eps * float(v.abs().max())
    torch.testing.assert_close(out, reference, rtol=0, atol=tol)
    assert float((reference - to_flat(torch.nn.functional.scaled_dot_product_attention(
        to_heads(q, 8), to_heads(k, 8), to_heads(v, 8)))).abs().max()) > 100 * tol  # the leak changes the output

    # Sampling: one warning per run, naming the backend, in the log and the run's record.
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cxr_counterfactual"):
            sample(comfy, patched, chest, steps=2)
        warnings = [r.getMessage() for r in caplog.records if "log-sum-exp" in r.getMessage()]
        assert len(warnings) == 1 and "recorder" in warnings[0], warnings
        record = host.run_state(patched).store.latest()
        from cxr_counterfactual.hosts.comfy import attention_backend

        assert [c.kind for c in record.conflicts] == [attention_backend.SOFT_REPORT]
        assert record.attention == {"soft gating": "recorder (no log-sum-exp: fallback)"}
    # the free background's queries attend over every key without a mask: through the backend
    assert any(c.heads_layout and c.n_k > c.n_q for c in recorder) == (background == "free")


def test_soft_gating_on_pytorch_attention_uses_its_log_sum_exp_without_warning(comfy, host, tiny_model, chest,
                                                                               monkeypatch, caplog):
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    patched = gate(comfy, tiny_model.model, chest, strength=0.5, token_strength=0.0)
    with caplog.at_level(logging.WARNING, logger="cxr_counterfactual"):
        out = sample(comfy, patched, chest, steps=2)
    assert torch.isfinite(out).all()
    assert not [r for r in caplog.records if "log-sum-exp" in r.getMessage()]
    record = host.run_state(patched).store.latest()
    assert not record.conflicts and record.attention == {"soft gating": "attention_pytorch"}


def test_a_failing_optional_lse_kernel_falls_back_to_the_exact_one(comfy, caplog):
    """The flash / xformers / sage log-sum-exp branches cannot run here; if one fails on an API it did not expect, soft
    gating must go on with torch's exact kernel (same result as calling it directly: the same function on the same
    inputs), warn once, and still let out-of-memory through (the refinement names the setting for it)."""
    from cxr_counterfactual.attention.kernels import sdpa_with_lse
    from cxr_counterfactual.hosts.comfy.attention_backend import guarded

    calls = []

    def broken(q, k, v):
        calls.append(1)
        raise TypeError("unexpected keyword argument 'return_lse'")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    kernel = guarded(broken, "attention_test")
    with caplog.at_level(logging.WARNING, logger="cxr_counterfactual"):
        for _ in range(3):
            out, lse = kernel(q, k, v)
            ref_out, ref_lse = sdpa_with_lse(q, k, v)
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert len(calls) == 1  # tried once, then the fallback only
    assert sum("attention_test" in r.getMessage() for r in caplog.records) == 1

    def oom(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        guarded(oom, "attention_test")(q, k, v)
