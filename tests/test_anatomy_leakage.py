"""Anatomy leakage (``testing/leakage.py``): what of an anatomy word outside queries still see, per cross-attention
layer, and the gate's ``anatomy_isolation="prompt"`` that removes it.

Real ComfyUI on the CPU, the tiny random-weight checkpoints, the CheXmask radiograph and its human organ masks
(fitted to 64 px; SDXL: 128 px, where its attention runs at 8×7 and 4×4), real CXR prompts. The leakage is
‖out_gated − out_removed‖ / ‖out_stock − out_removed‖ over the outside queries of each layer (0: masking the words
is as good as removing them from the prompt). Random weights show the mechanism (a causal text encoder spreads a
word into later tokens), not a trained model's figure.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cxr_helpers import gate, sample
from host_fixtures import load_checkpoint
from node_run import run

from cxr_counterfactual.attention.gating import removal_columns
from cxr_counterfactual.testing.leakage import layer_leakage, without_words

TEXT = "chest x-ray, left lung effusion, heart normal"
WORDS = "left lung, heart"
THRESHOLD = 0.10  # issue 20: above it anywhere, masking is not enough and prompt isolation is needed
# Prompt isolation computes the outside queries' attention over the prompt without their words, as the reference
# does, from the same float32 queries and the same CLIP encoding (token removal equals re-typing the text here,
# asserted below). What is left is float32 rounding of two attention calls over 77 keys (≲ 1e-6 of ‖out‖), over the
# words' effect (≈ 10 % of ‖out‖): ≲ 1e-5; 1e-4 leaves room for a different SDPA kernel on another CPU.
ISOLATED = 1e-4


def leak(comfy, loaded, chest, **gate_inputs):
    return layer_leakage(comfy.node, loaded.model, loaded.clip, TEXT, WORDS, chest.masks, chest.latent, gate_inputs)


def test_token_masking_leaks_through_later_tokens_and_prompt_isolation_removes_it(comfy, tiny_model, chest):
    masked = leak(comfy, tiny_model, chest)
    isolated = leak(comfy, tiny_model, chest, anatomy_isolation="prompt")
    assert [r.key for r in masked] == [r.key for r in isolated] and len(masked) >= 4  # every cross-attention layer
    assert all(r.outside > 0 for r in masked)
    # The finding (max ≈ 0.98 on this model): hiding the words' own tokens leaves most of their effect.
    assert min(r.leakage for r in masked) > THRESHOLD, [(r.key, r.leakage) for r in masked]
    assert max(r.leakage for r in isolated) < ISOLATED, [(r.key, r.leakage) for r in isolated]


def test_removing_tokens_equals_retyping_the_prompt_and_columns_follow_the_words(comfy, tiny_model):
    from cxr_counterfactual.nodes.text import locate_words, tokens_without

    clip = tiny_model.clip
    tokens, token_map = locate_words(clip, TEXT, WORDS, "effusion")
    removed = token_map.positions["left lung"]
    ids = [t[0] for t in tokens["l"][0]]
    kept = [t[0] for t in tokens_without(clip, tokens, removed)["l"][0]]
    assert kept == [t[0] for t in clip.tokenize(without_words(TEXT, ["left lung"]))["l"][0]]
    cols = removal_columns(removed, token_map.cond_len).tolist()
    assert kept == [ids[c] for c in cols]  # a boost on 'effusion' finds its word in the prompt without 'left lung'
    effusion = token_map.positions["effusion"]
    assert [cols.index(p) for p in effusion] == [p - len(removed) for p in effusion]


def test_tokens_is_todays_path_and_prompt_changes_the_result(comfy, tiny_model, chest):
    default = gate(comfy, tiny_model.model, chest)
    tokens = gate(comfy, tiny_model.model, chest, anatomy_isolation="tokens")
    prompt = gate(comfy, tiny_model.model, chest, anatomy_isolation="prompt")
    replaces = tokens.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(s.isolation is None for r in replaces.values() for s in r.stages)  # the same stage and code path
    base = sample(comfy, default, chest, steps=1)
    assert torch.equal(sample(comfy, tokens, chest, steps=1), base)
    isolated = sample(comfy, prompt, chest, steps=1)
    assert float((isolated - base).abs().max()) > 1e-4
    # A boost composes: its bias follows 'effusion' into the prompts without the anatomy words.
    boosted = run(comfy.node("CXRPathologyBoost"), model=prompt, tokens=chest.tokens, organ_masks=chest.masks)[0]
    assert float((sample(comfy, boosted, chest, steps=1) - isolated).abs().max()) > 1e-4


def test_prompt_isolation_refusals(comfy, tiny_model, chest):
    from cxr_counterfactual.hosts.diffusers import stages as diffusers_stages

    with pytest.raises(ValueError, match=r"Gate.*token_strength.*partial mask.*Use token_strength 1"):
        gate(comfy, tiny_model.model, chest, anatomy_isolation="prompt", token_strength=0.5)
    plain = dataclasses.replace(chest.tokens, encode_without=None)
    with pytest.raises(ValueError, match=r"Gate.*tokens.*re-encodes the prompt.*CXR Text Encode"):
        gate(comfy, tiny_model.model, chest, tokens=plain, anatomy_isolation="prompt")
    schedule = type("S", (), {"percent_to_sigma": staticmethod(lambda p: 1.0 - p)})()
    with pytest.raises(ValueError, match=r"anatomy_isolation.*not supported by this host"):
        diffusers_stages.gate_stage(chest.masks, schedule, tokens=chest.tokens, anatomy_isolation="prompt")


@pytest.mark.slow
def test_sdxl_two_text_encoders_prompt_isolation(comfy, tiny_sdxl_checkpoint, chexmask_example):
    from cxr_helpers import fitted_chest

    loaded = load_checkpoint(comfy, tiny_sdxl_checkpoint)
    chest = fitted_chest(comfy, loaded, chexmask_example, max_side=128)
    masked, isolated = leak(comfy, loaded, chest), leak(comfy, loaded, chest, anatomy_isolation="prompt")
    assert len(masked) >= 3 and min(r.leakage for r in masked) > THRESHOLD, [(r.key, r.leakage) for r in masked]
    assert max(r.leakage for r in isolated) < ISOLATED, [(r.key, r.leakage) for r in isolated]
