"""The diffusers host's attention processors on real diffusers modules (random weights built from a config).

- A single diffusers ``Attention`` layer: our processor equals diffusers' own ``AttnProcessor2_0`` bit for bit
  when no stage acts, and equals the dense-mask reference of the core when a hard gate acts.
- A whole tiny ``UNet2DConditionModel``: installing processors whose stages do not act at this sigma (or do
  nothing: strength 0, factor 1) leaves the output bit-identical; removing restores the original processor
  objects; a gate changes only the positive rows.
- A real ``StableDiffusionPipeline``: the forward pre-hook reads each UNet call's latent size and timestep, so
  captures are recorded at exactly the scheduler's sigmas, and the negative rows (first, diffusers' order) stay
  stock.
"""

from __future__ import annotations

import pytest
import torch
from diffusers_helpers import (
    FLOAT32_KERNEL_TOL,
    PROMPT,
    SD_SCHEDULER,
    clip_tokenizer,
    fitted_masks,
    relative_diff,
    require_diffusers,
    tiny_pipeline,
    tiny_unet,
)

from cxr_counterfactual.attention.field import Field
from cxr_counterfactual.attention.layer_call import COND, UNCOND, layer_grid
from cxr_counterfactual.attention.schedule import DiscreteSchedule
from cxr_counterfactual.attention.stage_builders import target_region
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.hosts.diffusers.processors import CXRAttnProcessor, install_regulation
from cxr_counterfactual.hosts.diffusers.stages import boost_stage, capture_stage, gate_stage, token_map

LATENT = (9, 8)


@pytest.fixture(scope="module")
def tiny(comfyui_path, chexmask_example):
    require_diffusers()
    from diffusers import DDIMScheduler

    _, masks = fitted_masks(chexmask_example, 72)
    tokens = token_map(clip_tokenizer(comfyui_path), PROMPT, anatomy="left lung, heart", pathology="effusion")
    schedule = DiscreteSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER))
    g = torch.Generator().manual_seed(3)
    return dict(unet=tiny_unet(0), masks=masks, tokens=tokens, schedule=schedule,
                x=torch.randn(2, 4, *LATENT, generator=g), ctx=torch.randn(2, 77, 768, generator=g))


def _unet_out(s, sigma=2.0, chunks=(UNCOND, COND), stages=None):
    unet = s["unet"]
    with torch.no_grad():
        if stages is None:
            return unet(s["x"], 500, encoder_hidden_states=s["ctx"]).sample
        with install_regulation(unet, stages) as reg, reg.step(LATENT, sigma, chunks):
            return unet(s["x"], 500, encoder_hidden_states=s["ctx"]).sample


def test_layer_grid_follows_the_unets_rounding_never_a_square_root():
    assert [layer_grid(n, (5, 7)) for n in (35, 12, 4, 1)] == [(5, 7), (3, 4), (2, 2), (1, 1)]
    assert layer_grid(64 * 56, (64, 56)) == (64, 56) and layer_grid(16 * 14, (64, 56)) == (16, 14)
    with pytest.raises(ValueError, match="match no grid"):
        layer_grid(36, (5, 7))


def test_one_attention_layer_stock_and_gated(tiny):
    """Our processor on one diffusers Attention layer (self-attention over a 9×8 grid, 2 heads of 8)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from cxr_counterfactual.attention.gating import gated_self_attention_dense
    from cxr_counterfactual.attention.run_state import RunState

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 72, 16)
    stock = AttnProcessor2_0()(attn, x)
    gate = gate_stage(tiny["masks"], tiny["schedule"], strength=1.0, background="confined")

    class Holder:  # what a processor reads from its Regulation
        stages, probe, current, state = (gate,), None, None, RunState()

    proc = CXRAttnProcessor("down_blocks.0.attentions.0.transformer_blocks.0.attn1", ("input", 1, 0), Holder,
                            AttnProcessor2_0())
    with torch.no_grad():
        off = proc(attn, x, cxr_step=_step(sigma=-1.0))  # outside the stage's window: the original processor
        gated = proc(attn, x, cxr_step=_step(sigma=1.0, chunks=(COND, COND)))
        q, k, v = (t.view(2, 72, 2, 8).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
        part = gate.partition(9, 8, Field(LATENT), x.device)
        ref = gated_self_attention_dense(q, k, v, part, 0.0, "confined").transpose(1, 2).reshape(2, 72, 16)
        ref = attn.to_out[0](ref)
    assert torch.equal(off, stock)
    # region-grouped SDPA against the dense-mask reference: other kernels, one layer (float32 tolerance)
    assert relative_diff(gated, ref) <= FLOAT32_KERNEL_TOL and relative_diff(gated, stock) > 50 * FLOAT32_KERNEL_TOL


def _step(sigma: float, chunks=(COND,)):
    from cxr_counterfactual.hosts.diffusers.processors import StepContext

    return StepContext(LATENT, sigma, chunks)


def test_inactive_or_neutral_stages_leave_the_unet_bit_identical(tiny):
    """Bit-identical by construction: every layer call goes to the layer's original processor (counted by a
    spy around it), so no other kernel runs whose rounding could differ from stock on another CPU."""
    s = tiny
    stock = _unet_out(s)
    tokens, masks, schedule = s["tokens"], s["masks"], s["schedule"]
    late = [gate_stage(masks, schedule, tokens=tokens, start_percent=0.9, end_percent=1.0),
            boost_stage(tokens, target_region(masks, "left_lung"), schedule, end_percent=0.1)]
    neutral = [gate_stage(masks, schedule, tokens=tokens, strength=0.0, token_strength=0.0),
               boost_stage(tokens, target_region(masks, "left_lung"), schedule, factor=1.0, end_percent=1.0),
               boost_stage(tokens, target_region(masks, "left_lung"), schedule, factors={"effusion": 1.0},
                           damping=1.0, end_percent=1.0)]
    watch = [capture_stage(tokens, schedule, grid_factor=2, target=target_region(masks, "left_lung"))]
    unet = s["unet"]
    processors = unet.attn_processors
    calls = {"n": 0}

    class Spy:  # stands for the original processor and counts the calls that reach it
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls["n"] += 1
            return self.inner(*args, **kwargs)

    unet.set_attn_processor({k: Spy(p) for k, p in processors.items()})
    try:
        for stages in ([], late, neutral, watch):  # capture observes: it never changes the result
            calls["n"] = 0
            assert torch.equal(_unet_out(s, sigma=2.0, stages=stages), stock)
            assert calls["n"] == len(processors), "a layer ran another kernel than its original processor"
    finally:
        unet.set_attn_processor(processors)
    assert not torch.equal(_unet_out(s, sigma=2.0, stages=[gate_stage(masks, schedule, tokens=tokens)]), stock)


def test_install_and_remove_restore_the_original_processor_objects(tiny):
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny["unet"]
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    default = unet.attn_processors[name]
    unet.set_attn_processor({**unet.attn_processors, name: AttnProcessor()})  # a non-default one, kept as is
    before = unet.attn_processors
    reg = install_regulation(unet, [gate_stage(tiny["masks"], tiny["schedule"])])
    during = unet.attn_processors
    assert all(isinstance(p, CXRAttnProcessor) for p in during.values()) and len(during) == len(before) == 14
    assert during[name].original is before[name]
    with pytest.raises(CXRInputError, match="already has CXR processors"):
        install_regulation(unet, [])
    reg.remove()
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    unet.set_attn_processor({**after, name: default})  # the module's UNet as the other tests expect it


def test_gate_changes_only_the_positive_rows_and_needs_a_step_context(tiny):
    s = tiny
    stock = _unet_out(s)
    gated = _unet_out(s, stages=[gate_stage(s["masks"], s["schedule"], tokens=s["tokens"], apply_to_uncond=False)])
    # the negative row is stock attention on a sub-batch: equal up to the kernel's batching, which rounds differently
    # on different CPUs (FLOAT32_KERNEL_TOL); the positive row is gated, far beyond that
    assert relative_diff(gated[0], stock[0]) <= FLOAT32_KERNEL_TOL
    assert relative_diff(gated[1], stock[1]) > 50 * FLOAT32_KERNEL_TOL
    both = _unet_out(s, stages=[gate_stage(s["masks"], s["schedule"], apply_to_uncond=True)])
    assert not torch.allclose(both[0], stock[0], atol=1e-3)
    with install_regulation(s["unet"], [gate_stage(s["masks"], s["schedule"])]), torch.no_grad():
        with pytest.raises(CXRInputError, match="without a step context"):
            s["unet"](s["x"], 500, encoder_hidden_states=s["ctx"])
        context = _step(2.0, (UNCOND, COND))
        via_kwargs = s["unet"](s["x"], 500, encoder_hidden_states=s["ctx"],
                               cross_attention_kwargs={"cxr_step": context}).sample
    assert torch.equal(via_kwargs, _unet_out(s, stages=[gate_stage(s["masks"], s["schedule"])]))


def test_pipeline_hook_reads_each_calls_latent_and_timestep(comfyui_path, chexmask_example):
    """A real StableDiffusionPipeline run with CFG: captures land at the scheduler's own sigmas."""
    pipe = tiny_pipeline(comfyui_path)
    _, masks = fitted_masks(chexmask_example, 72)  # 72×64 px → latent 9×8
    tokens = token_map(pipe.tokenizer, PROMPT, anatomy="left lung, heart", pathology="effusion")
    schedule = DiscreteSchedule.from_scheduler(pipe.scheduler)
    target = target_region(masks, "left_lung")

    def run():
        with torch.no_grad():
            return pipe(PROMPT, height=72, width=64, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    stock = run()
    stages = [gate_stage(masks, schedule, tokens=tokens), capture_stage(tokens, schedule, label="p", target=target)]
    with install_regulation(pipe, stages) as reg:
        edited = run()
        record = reg.record
        timesteps = [int(t) for t in pipe.scheduler.timesteps]
    assert not torch.allclose(edited, stock, atol=1e-4)
    capture = record.capture["p"]
    assert capture.grid == (5, 4)
    assert sorted(capture.steps, reverse=True) == pytest.approx([schedule.sigma(t) for t in timesteps])
    assert all(0.0 <= st.share_sum / st.share_layers <= 1.0 for st in capture.steps.values())
    assert torch.equal(run(), stock)  # removed: the pipeline is stock again
