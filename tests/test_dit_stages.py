"""The CXR stage nodes on a diffusion transformer: the tiny SD3.5-family checkpoint (MMDiT-X, ``testing/tiny_models.py``
recipe ``sd35``) loaded by ComfyUI's own loader, the real radiograph and its organ masks fitted by the pack's node,
sampled by ComfyUI's KSampler (cond and uncond in one batch), in-process on the CPU.

What holds by construction and is asserted exactly: a neutral stage returns the model itself; hard gating leaves a
region's image-token outputs of the first gated block bit-identical when only cells its tokens never read change
(every later block sees the text stream, which carries the other region: docs/dit-progress.md); rows the stages do
not act on run the stock kernel. Settings with no meaning on a DiT are refused at node time.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from node_run import run
from test_tiny_sd35 import cells_read_only_by

from cxr_counterfactual.attention.patch_grid import patch_grid
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.hosts.comfy.dit import CALL_KEY, BlockReplace

pytestmark = pytest.mark.slow
SEED, CFG, STEPS = 3, 4.0, 2
PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"


@pytest.fixture(scope="module")
def sd35(comfy, sd35_loaded, chexmask_example):
    """The tiny SD3.5 model, the real radiograph fitted to 64 px (latent 8×7 → a 4×4 patch grid: the odd side is
    padded circularly), its organ masks and an empty negative prompt."""
    from cxr_helpers import chexmask_radiograph

    loaded = sd35_loaded
    image, masks = chexmask_radiograph(chexmask_example)
    with torch.inference_mode():
        fitted, fitted_masks, _ = run(comfy.node("CXRFitToModel"), image=image, max_side=64, organ_masks=masks)
        latent = comfy.node("VAEEncode")().encode(loaded.vae, fitted)[0]
        positive, tokens = run(comfy.node("CXRTextEncode"), clip=loaded.clip, text=PROMPT, anatomy="left lung, heart",
                               pathology="effusion")
        negative = comfy.node("CLIPTextEncode")().encode(loaded.clip, "")[0]
    assert latent["samples"].shape[-2:] == (8, 7)
    return SimpleNamespace(model=loaded.model, clip=loaded.clip, vae=loaded.vae, masks=fitted_masks, latent=latent,
                           positive=positive, negative=negative, tokens=tokens)


def sample(comfy, model, f, latent=None, denoise=0.6, steps=STEPS) -> torch.Tensor:
    """img2img (denoise < 1: a flow model's first sigma at denoise 1 is 1, where the latent does not reach it)."""
    with torch.inference_mode():
        out = comfy.node("KSampler")().sample(model, SEED, steps, CFG, "euler", "simple", f.positive, f.negative,
                                              latent or f.latent, denoise=denoise)[0]
    return out["samples"].clone()


def gate(comfy, f, **settings):
    return run(comfy.node("CXRAnatomyAttentionGate"), model=f.model, organ_masks=f.masks, **settings)[0]


def test_gate_node_patches_a_dit_and_neutral_is_the_model_itself(comfy, sd35):
    assert gate(comfy, sd35, strength=0.0) is sd35.model  # nothing to regulate: exactly the unpatched model
    gated = gate(comfy, sd35, organs="right_lung, left_lung, heart", background="confined")
    assert gated is not sd35.model
    dit = gated.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", 0), ("double_block", 1)}
    assert "dit" not in sd35.model.model_options.get("transformer_options", {}).get("patches_replace", {})
    stock, out = sample(comfy, sd35.model, sd35), sample(comfy, gated, sd35)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    from cxr_counterfactual.hosts.comfy.patch import run_state

    assert run_state(gated) is not None  # the run's holder: previews and the refinement find the run through it


def test_hard_gate_isolates_regions_within_the_first_block(comfy, sd35):
    """Through the node, the fitted CheXmask masks and ComfyUI's sampler: cells only the right lung's tokens read
    change; the left lung's tokens' outputs of block 0 (joint call and MMDiT-X's image-only call) stay
    bit-identical, and differ without the gate."""
    latent = sd35.latent["samples"]
    grid = patch_grid(tuple(latent.shape[-2:]), 2)
    gated = gate(comfy, sd35, organs="right_lung, left_lung", background="confined", apply_to_uncond=True)
    from cxr_counterfactual.attention.field import Field

    stage = gated.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].stages[0]
    part = stage.partition(*grid, Field(tuple(latent.shape[-2:]), patch=2), torch.device("cpu"))
    names = list(part.names)
    a, b = names.index("left_lung"), names.index("right_lung")
    changed = cells_read_only_by(part.labels, b, latent=tuple(latent.shape[-2:]), grid=grid)
    assert changed.any() and (part.labels == a).any()
    edited = {"samples": latent + 2.0 * changed.to(latent.dtype)}
    rows_a = torch.nonzero(part.labels == a).flatten()

    def block0(model, lat):
        seen = []
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        ours = to.get("optimized_attention_override")

        def recorder(func, *args, **kwargs):  # outermost: what ComfyUI's block receives
            out = ours(func, *args, **kwargs) if ours is not None else func(*args, **kwargs)
            call = kwargs["transformer_options"].get(CALL_KEY)
            if call is not None and call.block == ("double_block", 0) and len(seen) < 2:  # the first model call
                text = 0 if args[0].shape[1] == call.image_len else call.text_len
                seen.append(out[:, text + rows_a].clone())
            return out

        to["optimized_attention_override"] = recorder
        sample(comfy, m, sd35, lat, denoise=0.5, steps=1)  # a later step's input went through block 1
        return seen

    def tagged_stock(model):  # the stock model with bare block tags, so the recorder sees the same calls
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        to["patches_replace"] = {"dit": {("double_block", i): BlockReplace(("double_block", i)) for i in range(2)}}
        return m

    g0, g1 = block0(gated, sd35.latent), block0(gated, edited)
    s0, s1 = block0(tagged_stock(sd35.model), sd35.latent), block0(tagged_stock(sd35.model), edited)
    assert len(g0) == len(g1) == 2  # block 0's joint call and its image-only call
    assert all(torch.equal(x, y) for x, y in zip(g0, g1, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(s0, s1, strict=True))


@pytest.mark.parametrize(("node", "settings", "input_name"), [
    ("CXRAnatomyAttentionGate", {"blocks": "input"}, "blocks"),
    ("CXRAnatomyAttentionGate", {"anatomy_isolation": "prompt"}, "anatomy_isolation"),
])
def test_settings_without_meaning_on_a_dit_are_refused(comfy, sd35, node, settings, input_name):
    with pytest.raises(CXRInputError) as err:
        run(comfy.node(node), model=sd35.model, organ_masks=sd35.masks, **settings)
    assert err.value.input_name == input_name and "CXR Anatomy Attention Gate" in str(err.value)


def theirs_block(calls: list):
    """Another pack's block replace (ComfyUI's convention: ``replace(args, {"original_block": ...})``): counts its
    calls and runs the block it was given."""
    def replace(args, extra):
        calls.append(args["img"].shape[1])
        return extra["original_block"](args)
    return replace


def theirs_override(calls: list):
    """Another pack's attention override that wraps what it was given (ComfyUI's ``override(func, *args)``)."""
    def override(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)
    return override


def test_other_packs_block_replace_and_override_before_ours_still_run(comfy, sd35):
    """Installed before our gate, another pack's block replace and attention override are wrapped: both see every
    block/call, our gate still changes the result, and nothing is reported."""
    from cxr_counterfactual.hosts.comfy.patch import result_store

    blocks, attention = [], []
    m = sd35.model.clone()
    for i in range(2):
        m.set_model_patch_replace(theirs_block(blocks), "dit", "double_block", i)
    m.model_options["transformer_options"]["optimized_attention_override"] = theirs_override(attention)
    theirs_only = sample(comfy, m, sd35, steps=1)
    n_blocks, n_calls = len(blocks), len(attention)
    assert n_blocks == 2 and n_calls == 3  # one model call (cond and uncond batched): 2 blocks, 3 attention calls
    gated = run(comfy.node("CXRAnatomyAttentionGate"), model=m, organ_masks=sd35.masks, background="confined")[0]
    out = sample(comfy, gated, sd35, steps=1)
    assert len(blocks) == 2 * n_blocks  # their replace ran inside ours
    assert len(attention) > 2 * n_calls  # their override got our per-region calls too (it wraps the backend)
    assert not torch.equal(out, theirs_only)
    assert result_store(gated).latest().conflicts == []


@pytest.mark.parametrize("what", ["block", "override"])
def test_a_later_pack_that_shadows_ours_is_reported(comfy, sd35, what):
    """A block replace or an attention override set after our gate without calling ours: that part runs without the
    gate, and the run's record (and the log) says which block lost it."""
    from cxr_counterfactual.hosts.comfy.patch import result_store

    gated = run(comfy.node("CXRAnatomyAttentionGate"), model=sd35.model, organ_masks=sd35.masks)[0].clone()
    calls: list = []
    if what == "block":
        def replace(args, extra):  # does not call the replace it found: ours is shadowed at block 0
            calls.append(1)
            return extra["original_block"](args)
        gated.set_model_patch_replace(replace, "dit", "double_block", 0)
    else:
        def override(func, *args, **kwargs):  # replaces ours, calls the backend directly
            calls.append(1)
            kwargs.pop("transformer_options", None)
            return func(*args, **kwargs)
        gated.model_options["transformer_options"]["optimized_attention_override"] = override
    sample(comfy, gated, sd35, steps=1)
    assert calls
    conflicts = result_store(gated).latest().conflicts
    lost = {c.key for c in conflicts if c.kind == "overwritten"}
    assert lost == ({("double_block", 0, 0)} if what == "block" else {("double_block", 0, 0), ("double_block", 1, 0)})


def captured(comfy, model, f, label: str, **settings):
    """Capture (the left lung as target) on ``model``, one sampling run; that run's capture record."""
    from cxr_counterfactual.hosts.comfy.patch import result_store

    m = run(comfy.node("CXRCaptureAttention"), model=model, tokens=f.tokens, label=label, organ_masks=f.masks,
            target_organs="left_lung", **settings)[0]
    sample(comfy, m, f)
    return result_store(m).latest().capture[label]


def test_capture_records_each_words_map_at_the_patch_grid(comfy, sd35):
    """Per-word maps of every block's image→text attention at the 4×4 patch grid, every step, the in-target share
    too; the capture alone changes nothing (the same sampler output as the stock model)."""
    cap = captured(comfy, sd35.model, sd35, "stock")
    assert cap.grid == (4, 4) and len(cap.steps) == STEPS
    for step in cap.steps.values():
        assert step.layers == 2 and step.share_layers == 2  # both joint blocks, not MMDiT-X's image-only call
        assert set(step.maps) == {"left lung", "heart", "effusion"}
        assert all(m.shape == (4, 4) and (m > 0).all() for m in step.maps.values())
    m = run(comfy.node("CXRCaptureAttention"), model=sd35.model, tokens=sd35.tokens, organ_masks=sd35.masks)[0]
    assert torch.equal(sample(comfy, m, sd35), sample(comfy, sd35.model, sd35))


def test_anatomy_words_are_hidden_outside_their_organ_exactly(comfy, sd35):
    """With token_strength 1 the gate gives an anatomy word weight exactly 0 at every image token outside its organ
    (its text columns get −inf); inside, the word keeps a positive weight."""
    from cxr_counterfactual.attention.field import Field

    gated = gate(comfy, sd35, tokens=sd35.tokens, strength=0.0, token_strength=1.0)
    cap = captured(comfy, gated, sd35, "hidden")
    stage = gated.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].stages[0]
    field = Field(tuple(sd35.latent["samples"].shape[-2:]), patch=2)
    cover = stage.word_cover(4, 4, field).reshape(len(stage.token_words), 4, 4)
    words = [w for w in sd35.tokens.anatomy]
    assert words == ["left lung", "heart"]
    for step in cap.steps.values():
        for i, word in enumerate(words):
            inside = cover[i]
            assert inside.any() and (~inside).any()
            assert (step.maps[word][~inside] == 0).all() and (step.maps[word][inside] > 0).all()


def test_boost_raises_the_pathology_share_inside_the_target(comfy, sd35):
    """CXR Pathology Boost on the DiT (×3 inside the left lung): the captured in-target share of 'effusion' rises at
    every boosted step, and the sampler's output changes."""
    boosted = run(comfy.node("CXRPathologyBoost"), model=sd35.model, tokens=sd35.tokens, organ_masks=sd35.masks,
                  target_organs="left_lung", factor=3.0, end_percent=1.0)[0]
    stock, after = captured(comfy, sd35.model, sd35, "stock"), captured(comfy, boosted, sd35, "boosted")
    for sigma, step in stock.steps.items():
        before = step.share_sum / step.share_layers
        raised = after.steps[sigma].share_sum / after.steps[sigma].share_layers
        assert raised > before + 0.01, (sigma, before, raised)
    assert not torch.equal(sample(comfy, boosted, sd35), sample(comfy, sd35.model, sd35))


def test_stage_nodes_refuse_what_has_no_meaning_on_a_dit(comfy, sd35):
    """Capture at a grid the DiT does not have; a boost over UNet parts; a UNet token map on the DiT."""
    import dataclasses

    with pytest.raises(CXRInputError) as err:
        run(comfy.node("CXRCaptureAttention"), model=sd35.model, tokens=sd35.tokens, grid_factor="4")
    assert err.value.input_name == "grid_factor" and "grid_factor 2" in err.value.fix
    with pytest.raises(CXRInputError) as err:
        run(comfy.node("CXRPathologyBoost"), model=sd35.model, tokens=sd35.tokens, organ_masks=sd35.masks,
            blocks="output")
    assert err.value.input_name == "blocks"
    unet_tokens = dataclasses.replace(sd35.tokens, layout="clip", parts=())
    with pytest.raises(CXRInputError) as err:
        run(comfy.node("CXRPathologyBoost"), model=sd35.model, tokens=unet_tokens, organ_masks=sd35.masks)
    assert err.value.input_name == "tokens" and "'sd3'" in str(err.value)


def test_masks_of_another_aspect_ratio_are_refused_naming_the_node(comfy, sd35):
    """Masks that are not the latent's field of view (here 1:2, the latent 8:7) cannot be laid on the patch grid: the
    first gated call refuses them, naming the gate and its masks input."""
    from cxr_counterfactual.attention.organs import OrganMasks

    stretched = torch.nn.functional.interpolate(sd35.masks.data[None].float(), size=(64, 128), mode="nearest")[0]
    wrong = OrganMasks(sd35.masks.names, stretched)
    gated = run(comfy.node("CXRAnatomyAttentionGate"), model=sd35.model, organ_masks=wrong)[0]
    with pytest.raises(CXRInputError) as err:
        sample(comfy, gated, sd35, steps=1)
    assert err.value.input_name == "organ_masks" and "CXR Anatomy Attention Gate" in str(err.value)
    assert "aspect" in str(err.value)


def test_soft_gate_runs_on_the_log_sum_exp_route_and_records_its_kernel(comfy, sd35):
    """strength 0.5: other regions' image keys weigh 0.5; the output lies apart from both stock and the hard gate,
    and the run's record names the kernel the soft parts ran on (ComfyUI's CPU default has no log-sum-exp: torch's
    fallback, noted once)."""
    from cxr_counterfactual.hosts.comfy.patch import result_store

    soft = gate(comfy, sd35, strength=0.5, background="confined")
    hard = gate(comfy, sd35, strength=1.0, background="confined")
    out = sample(comfy, soft, sd35)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, sample(comfy, hard, sd35)) and not torch.equal(out, sample(comfy, sd35.model, sd35))
    assert "joint attention" in result_store(soft).latest().attention
