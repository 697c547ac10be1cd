"""The CXR stage nodes on Flux, in-process on the CPU, without a checkpoint (``testing/tiny_flux.py``).

A Flux file is fixed at width 3072 with the full T5-XXL (about 4.8 GB in fp8), too big for a fixture, so the model is
ComfyUI's own Flux (``comfy.supported_models.Flux`` → ``comfy.model_base.Flux`` → ``comfy.ldm.flux.model.Flux``)
with one double and one single block at Flux.1's head size and RoPE axes, seeded random weights, in ComfyUI's
``ModelPatcher``, sampled by ComfyUI's KSampler (cond and uncond in one batch). The prompt is tokenised by ComfyUI's
``FluxTokenizer`` and its words located by CXR Text Encode's own path (layout "flux": T5 positions); the context is
seeded noise of T5's length (256), since T5 is not run. Organ masks: the real CheXmask masks fitted by the pack's node
to 64×56 (latent 8×7, a 4×4 patch grid; the odd side padded circularly). Width: 2 heads of 128 (256) by default;
``CXR_FLUX_HEADS=24`` runs the same tests at Flux.1's full width 3072 (546 M parameters, ≈ 4 s a step on two CPU
cores, 3.4 GB peak memory, instead of ≈ 1 s).

What holds by construction and is asserted exactly: a neutral gate returns the model itself; hard gating leaves a
region's image-token outputs of the double block bit-identical when only cells its tokens never read change; masked
calls (``attention_mask``) and calls with reference-image tokens (Kontext) run the stock kernel, so such a run equals
the stock run bit for bit, and the run reports them. The single block's regulated rows are compared with plain
attention over the keys the gate lets them see, at a float32 tolerance.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from node_run import run
from test_tiny_sd35 import cells_read_only_by

from cxr_counterfactual.attention.field import Field
from cxr_counterfactual.attention.patch_grid import patch_grid
from cxr_counterfactual.hosts.comfy.dit import CALL_KEY, BlockReplace

pytestmark = pytest.mark.slow  # samples a model (seconds here; CXR_FLUX_HEADS=24: minutes)
SEED, CFG, STEPS = 3, 2.0, 2
PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"
LATENT = (8, 7)
GRID = patch_grid(LATENT, 2)  # (4, 4)
TEXT = 256  # T5's minimum length in ComfyUI's Flux tokenizer: the prompt fits in it


@pytest.fixture(scope="module")
def flux(comfy, chexmask_example):
    """The tiny Flux ModelPatcher, the prompt as Flux conditioning with its T5 token map, an empty negative, the
    fitted organ masks and a seeded 16-channel latent (≈ 2 s)."""
    from cxr_helpers import chexmask_radiograph

    from cxr_counterfactual.testing.tiny_flux import flux_prompt, flux_text_encoder, tiny_flux

    clip = flux_text_encoder()
    positive = flux_prompt(clip, PROMPT, anatomy="left lung, heart", pathology="effusion", seed=1)
    negative = flux_prompt(clip, "", seed=2)
    image, masks = chexmask_radiograph(chexmask_example)
    with torch.inference_mode():
        _, fitted_masks, _ = run(comfy.node("CXRFitToModel"), image=image, max_side=64, organ_masks=masks)
    latent = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(0))
    model = tiny_flux(seed=0, heads=int(os.environ.get("CXR_FLUX_HEADS", "2")))
    return SimpleNamespace(model=model, clip=clip, positive=positive, negative=negative,
                           masks=fitted_masks, latent={"samples": latent})


def sample(comfy, model, f, latent=None, denoise=0.6, steps=STEPS, positive=None, negative=None) -> torch.Tensor:
    """img2img (a flow model's first sigma at denoise 1 is 1, where the latent does not reach it)."""
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, SEED, steps, CFG, "euler", "simple",
                                              positive or f.positive.cond, negative or f.negative.cond,
                                              latent or f.latent, denoise=denoise)[0]
    return out["samples"].clone()


def gate(comfy, f, **settings):
    return run(comfy.node("CXRAnatomyAttentionGate"), model=f.model, organ_masks=f.masks, **settings)[0]


def recording(model, keep):
    """A clone of ``model`` with an outermost attention override: ``keep(call, q, k, v, out)`` sees every tagged
    call (q, k, v in Flux's heads layout, out as the block receives it: flat)."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    ours = to.get("optimized_attention_override")

    def recorder(func, *args, **kwargs):
        out = ours(func, *args, **kwargs) if ours is not None else func(*args, **kwargs)
        call = kwargs["transformer_options"].get(CALL_KEY)
        if call is not None:
            keep(call, *args[:3], out)
        return out

    to["optimized_attention_override"] = recorder
    return m


def tagged_stock(model):
    """The stock model with bare block tags, so a recorder sees the same calls as on a patched one."""
    from cxr_counterfactual.hosts.comfy.dit import tag_text_length
    from cxr_counterfactual.hosts.comfy.dit_stages import TAG_KEY

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to["patches_replace"] = {"dit": {key: BlockReplace(key) for key in (("double_block", 0), ("single_block", 0))}}
    import comfy.patcher_extension

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TAG_KEY, tag_text_length)
    return m


def test_gate_node_patches_flux_blocks_and_neutral_is_the_model_itself(comfy, flux):
    assert flux.positive.token_map.layout == "flux" and flux.positive.cond[0][0].shape == (1, TEXT, 4096)
    assert gate(comfy, flux, strength=0.0) is flux.model  # nothing to regulate: exactly the unpatched model
    gated = gate(comfy, flux, organs="right_lung, left_lung, heart", background="confined")
    dit = gated.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", 0), ("single_block", 0)}
    assert "dit" not in flux.model.model_options.get("transformer_options", {}).get("patches_replace", {})
    stock, out = sample(comfy, flux.model, flux), sample(comfy, gated, flux)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    assert torch.equal(sample(comfy, flux.model, flux), stock)  # the stock model was left as it was


def test_hard_gate_isolates_regions_within_the_double_block(comfy, flux):
    """Cells only the right lung's tokens read change: the left lung's image-token outputs of the double block's
    joint call stay bit-identical (and differ without the gate); in the single block they differ even with the gate
    (the text tokens' rows run stock in the double block, so they carry the right lung there)."""
    latent = flux.latent["samples"]
    gated = gate(comfy, flux, organs="right_lung, left_lung", background="confined", apply_to_uncond=True)
    stage = gated.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].stages[0]
    part = stage.partition(*GRID, Field(LATENT, patch=2), torch.device("cpu"))
    a, b = part.names.index("left_lung"), part.names.index("right_lung")
    changed = cells_read_only_by(part.labels, b, latent=LATENT, grid=GRID)
    assert changed.any() and (part.labels == a).any()
    edited = {"samples": latent + 2.0 * changed.to(latent.dtype)}
    rows_a = torch.nonzero(part.labels == a).flatten()

    def first_call(model, lat) -> dict:
        seen: dict = {}

        def keep(call, q, k, v, out):  # the first model call's outputs (a later one saw the first's result)
            seen.setdefault(call.block, out[:, call.text_len + rows_a].clone())

        sample(comfy, recording(model, keep), flux, lat, denoise=0.5, steps=1)
        return seen

    g0, g1 = first_call(gated, flux.latent), first_call(gated, edited)
    s0, s1 = first_call(tagged_stock(flux.model), flux.latent), first_call(tagged_stock(flux.model), edited)
    double, single = ("double_block", 0), ("single_block", 0)
    assert set(g0) == set(s0) == {double, single}
    assert torch.equal(g0[double], g1[double])
    assert not torch.equal(s0[double], s1[double])
    assert not torch.equal(g0[single], g1[single])


def test_single_block_is_regulated_at_the_text_length(comfy, flux):
    """Both blocks' joint calls are tagged with T5's 256 text tokens and the 4×4 grid's 16 (the single block learns
    the text length from the APPLY_MODEL tag); there the left lung's rows attend exactly to the text and their own
    region's tokens: plain attention over those keys gives the same output (float32, other reduction order)."""
    gated = gate(comfy, flux, organs="right_lung, left_lung", background="confined", apply_to_uncond=True)
    stage = gated.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].stages[0]
    part = stage.partition(*GRID, Field(LATENT, patch=2), torch.device("cpu"))
    rows_a = torch.nonzero(part.labels == part.names.index("left_lung")).flatten()
    calls, checked = [], []

    def keep(call, q, k, v, out):
        calls.append((call.block, call.text_len, call.image_len, q.shape[2]))
        text = torch.arange(call.text_len)
        keys = torch.cat([text, call.text_len + rows_a])
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, call.text_len + rows_a], k[:, :, keys],
                                                                v[:, :, keys])
        got = out.reshape(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)[:, :, call.text_len + rows_a]
        checked.append(float((got - want).abs().max()))

    sample(comfy, recording(gated, keep), flux, steps=1)
    image = GRID[0] * GRID[1]
    assert set(calls) == {(("double_block", 0), TEXT, image, TEXT + image), (("single_block", 0), TEXT, image,
                                                                             TEXT + image)}
    # float32 attention over ≤ 272 keys by two kernels: rounding differences of a few ulp of values of order one
    assert max(checked) < 1e-5, checked


def boosted(comfy, f, model, **settings):
    return run(comfy.node("CXRPathologyBoost"), model=model, tokens=f.positive.token_map, organ_masks=f.masks,
               target_organs="left_lung", **settings)[0]


def captured(comfy, f, model, label):
    return run(comfy.node("CXRCaptureAttention"), model=model, tokens=f.positive.token_map, label=label,
               grid_factor="2", organ_masks=f.masks, target_organs="left_lung")[0]


def test_capture_at_the_patch_grid_and_boost_raises_the_in_target_share(comfy, flux):
    """Capture on T5's positions of 'effusion' records its map at the 4×4 patch grid at each step, and never changes
    the result; a boost of 'effusion' in the left lung raises the captured in-target share at every step."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    tm = flux.positive.token_map
    assert tm.positions["effusion"] == (13, 14)  # '▁eff', 'usion' (T5 has no start token)
    stock = sample(comfy, flux.model, flux)
    shares = {}
    for label, model in (("stock", flux.model), ("boosted", boosted(comfy, flux, flux.model, factor=3.0,
                                                                    end_percent=1.0))):
        m = captured(comfy, flux, model, label)
        out = sample(comfy, m, flux)
        if label == "stock":
            assert torch.equal(out, stock)  # capture only reads
        record = run_state(m).store.latest().capture[label]
        assert record.grid == GRID
        assert len(record.steps) == STEPS
        for step in record.steps.values():
            assert step.maps["effusion"].shape == GRID and step.layers == 2  # the double and the single block
            assert torch.isfinite(step.maps["effusion"]).all()
        shares[label] = {s: st.share_sum / st.share_layers for s, st in record.steps.items()}
    for s, share in shares["stock"].items():
        assert shares["boosted"][s] > share + 0.01, (s, share, shares["boosted"][s])


def test_anatomy_words_hidden_outside_their_organ_at_t5_positions(comfy, flux):
    """The gate with the T5 token map hides 'left lung' (T5 positions 6, 7) from image tokens outside the left lung
    in both blocks' joint calls: its captured map (the probabilities the model attends with) is exactly zero there,
    and not zero inside, nor outside without the gate."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    tm = flux.positive.token_map
    assert tm.positions["left lung"] == (6, 7)  # '▁left', '▁lung'
    gated = gate(comfy, flux, tokens=tm, strength=0.0, token_strength=1.0)
    stage = gated.model_options["transformer_options"]["patches_replace"]["dit"][("single_block", 0)].stages[0]
    inside = stage.word_cover(*GRID, Field(LATENT, patch=2))[0].reshape(GRID)  # 'left lung', the first word
    assert inside.any() and (~inside).any()
    for label, model in (("gated", gated), ("stock", flux.model)):
        m = captured(comfy, flux, model, label)
        sample(comfy, m, flux)
        for step in run_state(m).store.latest().capture[label].steps.values():
            lung = step.maps["left lung"]
            assert (lung[inside] > 0).all()
            if label == "gated":
                assert torch.equal(lung[~inside], torch.zeros_like(lung[~inside]))  # exp(-inf) = 0 exactly
            else:
                assert (lung[~inside] > 0).all()


def with_extra(cond: list, **extra) -> list:
    return [[c, {**d, **extra}] for c, d in cond]


def test_masked_and_reference_token_calls_run_stock_and_are_reported(comfy, flux):
    """Flux's ``attention_mask`` (as Redux's attention bias makes it: additive over text ‖ image) and Kontext's
    reference latent (16 more image tokens after the grid's) through the real forward: the gated run equals the
    stock run bit for bit (every call takes the stock kernel), and the run says why."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    gated = gate(comfy, flux, organs="right_lung, left_lung", background="confined", apply_to_uncond=True)
    n = TEXT + GRID[0] * GRID[1]
    mask = torch.zeros(1, n, n)
    mask[:, :, TEXT - 8:TEXT] = -2.0  # down-weight the last text tokens for every query
    ref = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(5))
    cases = {"dit-mask": {"attention_mask": mask, "attention_mask_img_shape": GRID},
             "dit-tokens": {"reference_latents": [ref]}}
    plain = sample(comfy, flux.model, flux)
    for kind, extra in cases.items():
        pos, neg = with_extra(flux.positive.cond, **extra), with_extra(flux.negative.cond, **extra)
        stock = sample(comfy, flux.model, flux, positive=pos, negative=neg)
        assert not torch.equal(stock, plain)  # the mask / the reference tokens reached the model
        out = sample(comfy, gated, flux, positive=pos, negative=neg)
        assert torch.equal(out, stock), kind
        conflicts = run_state(gated).store.latest().conflicts
        assert {c.key for c in conflicts if c.kind == kind} == {("double_block", 0, 0), ("single_block", 0, 0)}
