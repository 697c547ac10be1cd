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
        positive = comfy.node("CLIPTextEncode")().encode(loaded.clip, "chest x-ray, left pleural effusion")[0]
        negative = comfy.node("CLIPTextEncode")().encode(loaded.clip, "")[0]
    assert latent["samples"].shape[-2:] == (8, 7)
    return SimpleNamespace(model=loaded.model, clip=loaded.clip, vae=loaded.vae, masks=fitted_masks, latent=latent,
                           positive=positive, negative=negative)


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
