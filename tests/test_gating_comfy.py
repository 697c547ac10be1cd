"""The anatomy gate inside the real ComfyUI (CPU, tiny checkpoint, the CheXmask radiograph and masks)."""

from __future__ import annotations

import pytest
import torch
from cxr_helpers import PROMPT, gate, sample
from node_run import run

from cxr_counterfactual.attention.organs import OrganMasks


def test_text_encode_finds_words_as_the_tokenizer_does(comfy, tiny_model, chest):
    clip = tiny_model.clip
    ids = [t[0] for t in clip.tokenize(PROMPT)["l"][0]]
    eff = clip.tokenizer.clip_l.tokenizer("effusion")["input_ids"][1:-1]
    assert len(eff) == 2  # "effusion" is two CLIP tokens
    pos = chest.tokens.positions["effusion"]
    assert [ids[p] for p in pos] == eff
    assert chest.tokens.anatomy == {"left lung": ("left_lung",), "heart": ("heart",)}
    assert chest.tokens.cond_len == 77


def test_weighted_and_long_prompts(comfy, tiny_model):
    enc = comfy.node("CXRTextEncode")
    _, weighted = run(enc, clip=tiny_model.clip, text="x-ray, (left lung:1.3) with effusion", anatomy="left lung",
                      pathology="effusion")
    assert len(weighted.positions["left lung"]) == 2
    long_text = "chest x-ray " + "normal study " * 40 + "left pleural effusion"
    _, long_map = run(enc, clip=tiny_model.clip, text=long_text, anatomy="", pathology="effusion")
    assert long_map.cond_len == 154 and min(long_map.positions["effusion"]) > 77
    with pytest.raises(ValueError, match=r"\[CXR Text Encode.*'pneumothorax' is not in the prompt"):
        run(enc, clip=tiny_model.clip, text=PROMPT, anatomy="", pathology="pneumothorax")


def test_probe_every_block_gated_at_every_step_inside_the_window_only(comfy, tiny_model, chest):
    from cxr_counterfactual.hosts.comfy.patch import run_state
    from cxr_counterfactual.hosts.comfy.unet_layout import transformer_keys  # needs ComfyUI on the path

    patched = gate(comfy, tiny_model.model, chest, start_percent=0.0, end_percent=0.5)
    state = run_state(patched)
    state.trace_enabled = True
    sample(comfy, patched, chest, steps=6)
    trace = state.store.latest().trace
    keys = transformer_keys(tiny_model.model)
    sigmas = sorted({s for _, _, s, _ in trace}, reverse=True)
    assert len(sigmas) == 6 and len(keys) >= 4
    sampling = tiny_model.model.get_model_object("model_sampling")
    sigma_end = float(sampling.percent_to_sigma(0.5))
    for kind in ("attn1", "attn2"):
        for sigma in sigmas:
            calls = {key: gated for k, key, s, gated in trace if k == kind and s == sigma}
            assert set(calls) == set(keys), (kind, sigma)
            assert set(calls.values()) == {sigma >= sigma_end}, (kind, sigma)
    assert {s >= sigma_end for s in sigmas} == {True, False}  # the window split the run


def test_strength_zero_is_the_unpatched_model_and_effect_grows(comfy, tiny_model, chest):
    off = gate(comfy, tiny_model.model, chest, strength=0.0, token_strength=0.0)
    assert off is tiny_model.model
    base = sample(comfy, tiny_model.model, chest)
    assert torch.equal(sample(comfy, off, chest), base)
    diffs = []
    for s in (1e-3, 1e-2, 1e-1, 1.0):
        patched = gate(comfy, tiny_model.model, chest, strength=s, token_strength=s)
        diffs.append(float((sample(comfy, patched, chest) - base).abs().mean()))
    assert 0 < diffs[0] < diffs[1] < diffs[2] < diffs[3], diffs


def test_state_does_not_leak_between_queued_runs(comfy, tiny_model, chest):
    patched = gate(comfy, tiny_model.model, chest)
    first = sample(comfy, patched, chest, seed=5)
    sample(comfy, patched, chest, seed=6)
    assert torch.equal(sample(comfy, patched, chest, seed=5), first)


def test_cfg1_batch2_and_img2img(comfy, tiny_model, chest):
    patched = gate(comfy, tiny_model.model, chest, apply_to_uncond=True)
    base = sample(comfy, tiny_model.model, chest, cfg=1.0)
    out = sample(comfy, patched, chest, cfg=1.0)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    batch = {"samples": chest.latent["samples"].repeat(2, 1, 1, 1)}
    out2 = sample(comfy, patched, chest, latent=batch)
    assert out2.shape[0] == 2 and torch.isfinite(out2).all()
    img2img = sample(comfy, patched, chest, denoise=0.6)
    assert torch.isfinite(img2img).all()
    assert not torch.equal(img2img, sample(comfy, tiny_model.model, chest, denoise=0.6))


def test_bad_inputs_are_clear_errors(comfy, tiny_model, chest):
    with pytest.raises(ValueError, match=r"\[CXR Anatomy Attention Gate\].*'clavicle'.*present"):
        gate(comfy, tiny_model.model, chest, organs="clavicle")
    with pytest.raises(ValueError, match=r"\[CXR Anatomy Attention Gate\].*'background'"):
        gate(comfy, tiny_model.model, chest, background="sideways")
    with pytest.raises(ValueError, match=r"start_percent"):
        gate(comfy, tiny_model.model, chest, start_percent=0.8, end_percent=0.2)
    wrong = OrganMasks.from_dict({"right_lung": torch.ones(64, 128), "left_lung": torch.ones(64, 128),
                                  "heart": torch.ones(64, 128)})
    patched = gate(comfy, tiny_model.model, chest, organ_masks=wrong, tokens=None)
    with pytest.raises(ValueError, match=r"\[CXR Anatomy Attention Gate\].*aspect.*Fit Radiograph"):
        sample(comfy, patched, chest)


def test_a_dit_family_the_pack_does_not_know_is_named_with_the_supported_ones(comfy, chest):
    """SD3/SD3.5 and Flux are supported (tests/test_dit_*.py); another DiT family, here AuraFlow's (whose class is
    also named MMDiT, in another module), is refused before anything runs, naming itself and the supported ones."""
    import comfy.model_patcher as model_patcher  # aliases: the fixture is called comfy
    from comfy.ldm.aura.mmdit import MMDiT as AuraFlow

    dit = AuraFlow.__new__(AuraFlow)  # the family is read from the class: no weights needed
    torch.nn.Module.__init__(dit)
    holder = torch.nn.Module()
    holder.diffusion_model = dit
    patcher = model_patcher.ModelPatcher(holder, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\[CXR Anatomy Attention Gate\] input 'model': the model's diffusion "
                       r"transformer is MMDiT \(from comfy\.ldm\.aura\.mmdit\)") as err:
        gate(comfy, patcher, chest)
    assert "SD3/SD3.5 (MMDiT) or Flux" in str(err.value)
