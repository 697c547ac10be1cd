"""Repeated words: ``word#k`` names one occurrence; two boost nodes with their own words and targets chain.

Real ComfyUI in-process, the tiny SD1.5 checkpoint, the CheXmask radiograph and its masks at 64 px.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from cxr_helpers import sample
from node_run import run

from cxr_counterfactual.attention.boosting import pathology_boost_bias

REPEATED = "chest x-ray, left lung effusion, right lung clear, no effusion, normal heart"
TWO_WORDS = "chest x-ray, left lung effusion, right lung consolidation, normal heart"


def encode(comfy, tiny_model, text, pathology, anatomy=""):
    return run(comfy.node("CXRTextEncode"), clip=tiny_model.clip, text=text, anatomy=anatomy, pathology=pathology)


def boost(comfy, model, chest, tokens, **overrides):
    inputs = dict(model=model, tokens=tokens, organ_masks=chest.masks, end_percent=0.5)
    return run(comfy.node("CXRPathologyBoost"), **{**inputs, **overrides})[0]


def capture(comfy, model, chest, tokens, label, target_organs):
    return run(comfy.node("CXRCaptureAttention"), model=model, tokens=tokens, label=label, grid_factor="1",
               organ_masks=chest.masks, target_organs=target_organs, end_percent=0.5)[0]


def boost_stages(model):
    """The boost stages the node installed (one per boost node), read from the patched model's replaces."""
    from cxr_counterfactual.attention.stages import BoostStage

    table = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    found = {id(s): s for patch in table.values() for s in patch.stages if isinstance(s, BoostStage)}
    return list(found.values())


def shares(comfy, model, chest, positive, captures):
    """Sample with one capture per ``label → (tokens, target)``; each label's in-target share per step."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    for label, (tokens, target) in captures.items():
        model = capture(comfy, model, chest, tokens, label, target)
    sample(comfy, model, SimpleNamespace(**{**vars(chest), "positive": positive}), steps=4)
    record = run_state(model).store.latest().capture
    return {label: {s: st.share_sum / st.share_layers for s, st in record[label].steps.items()}
            for label in captures}


def test_occurrence_names_resolve_to_that_occurrence_only(comfy, tiny_model):
    clip = tiny_model.clip
    ids = [t[0] for t in clip.tokenize(REPEATED)["l"][0]]
    eff = clip.tokenizer.clip_l.tokenizer("effusion")["input_ids"][1:-1]
    _, tokens = encode(comfy, tiny_model, REPEATED, "effusion, effusion#1, effusion#2", anatomy="left lung#1")
    first, second = tokens.positions["effusion#1"], tokens.positions["effusion#2"]
    assert [ids[p] for p in first] == eff and [ids[p] for p in second] == eff  # all tokens of each, in order
    assert max(first) < min(second)  # prompt order
    assert tokens.positions["effusion"] == first + second  # the plain word: every occurrence, as before
    assert tokens.spans["effusion"] == (first, second)
    assert tokens.anatomy == {"left lung#1": ("left_lung",)}  # tied as 'left lung' is
    # a boost may name an occurrence of a word the text encoder was given plain, through the same resolver
    _, plain = encode(comfy, tiny_model, REPEATED, "effusion")
    assert plain.indices("effusion#2") == second and plain.indices("effusion") == first + second
    # counted across 77-token chunks
    long_text = "left pleural effusion, " + "normal study " * 40 + "no effusion"
    _, long_map = encode(comfy, tiny_model, long_text, "effusion#2")
    assert long_map.cond_len == 154 and min(long_map.positions["effusion#2"]) > 77
    assert max(long_map.indices("effusion#1")) < 77


def test_boost_of_one_occurrence_biases_only_its_tokens_and_shares(comfy, tiny_model, chest):
    positive, tokens = encode(comfy, tiny_model, REPEATED, "effusion")
    first, second = tokens.indices("effusion#1"), tokens.indices("effusion#2")
    (one,) = boost_stages(boost(comfy, tiny_model.model, chest, tokens, words="effusion#1=4"))
    (both,) = boost_stages(boost(comfy, tiny_model.model, chest, tokens, words="effusion=4"))
    assert one.positions == {"effusion#1": first} and both.positions == {"effusion": first + second}
    # The bias each builds (the function the layers call): exact by construction, so compared exactly.
    inside = torch.tensor([True, False, True, False])
    bias_one = pathology_boost_bias(inside, one.positions, one.factors, 77, 154, one.damping)
    bias_both = pathology_boost_bias(inside, both.positions, both.factors, 77, 154, both.damping)
    cols = list(first) + [p + 77 for p in first]
    other = [c for c in range(154) if c not in cols]
    assert torch.equal(bias_one[inside][:, cols], torch.full((2, 4), math.log(4.0)))
    assert not bias_one[:, other].any() and not bias_one[~inside].any()  # the second occurrence: untouched
    assert torch.equal(bias_both[:, cols], bias_one[:, cols])
    assert torch.equal(bias_both[inside][:, [p for p in second]], torch.full((2, 2), math.log(4.0)))

    # In the sampler: each occurrence's captured in-target share (the left lung) per step, under a boost of
    # the first and of the second. Boosting one occurrence raises its own share (by 0.27 here); the other's moves
    # only by renormalisation (the boosted tokens take attention from it inside the target) and through the image
    # the boost changed (0.011 here). A boost that also hit the other occurrence would raise both alike.
    _, occ1 = encode(comfy, tiny_model, REPEATED, "effusion#1")
    _, occ2 = encode(comfy, tiny_model, REPEATED, "effusion#2")
    caps = {"first": (occ1, "left_lung"), "second": (occ2, "left_lung")}
    runs = {name: shares(comfy, model, chest, positive, caps) for name, model in (
        ("stock", tiny_model.model),
        ("first", boost(comfy, tiny_model.model, chest, tokens, words="effusion#1=4")),
        ("second", boost(comfy, tiny_model.model, chest, tokens, words="effusion#2=4")),
    )}
    stock = runs["stock"]
    sigma_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    window = [s for s in stock["first"] if s >= sigma_end]
    assert len(window) == 2
    for s in window:
        for boosted, other in (("first", "second"), ("second", "first")):
            rise = runs[boosted][boosted][s] - stock[boosted][s]
            drift = abs(runs[boosted][other][s] - stock[other][s])
            assert rise > 0.01 and drift < rise / 10, (s, boosted, rise, drift)


def test_two_boost_nodes_chain_each_on_its_own_word_and_target(comfy, tiny_model, chest):
    positive, tokens = encode(comfy, tiny_model, TWO_WORDS, "effusion, consolidation")
    _, eff = encode(comfy, tiny_model, TWO_WORDS, "effusion")
    _, cons = encode(comfy, tiny_model, TWO_WORDS, "consolidation")
    a = boost(comfy, tiny_model.model, chest, tokens, words="effusion=4", target_organs="left_lung")
    chained = boost(comfy, a, chest, tokens, words="consolidation=4", target_organs="right_lung")
    assert len(boost_stages(chained)) == 2
    caps = {"effusion": (eff, "left_lung"), "consolidation": (cons, "right_lung")}
    stock = shares(comfy, tiny_model.model, chest, positive, caps)
    both = shares(comfy, chained, chest, positive, caps)
    sigma_end = float(tiny_model.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    window = [s for s in stock["effusion"] if s >= sigma_end]
    assert len(window) == 2
    for s in window:
        for word in caps:
            assert both[word][s] > stock[word][s] + 0.1, (s, word, stock[word][s], both[word][s])


def test_bad_occurrence_names(comfy, tiny_model, chest):
    _, tokens = encode(comfy, tiny_model, REPEATED, "effusion")
    with pytest.raises(ValueError, match=r"\[CXR Pathology Boost\] input 'words': 'effusion#3' asks for occurrence "
                       r"3, but 'effusion' occurs 2 times.*Fix: Use effusion#1 or effusion#2"):
        boost(comfy, tiny_model.model, chest, tokens, words="effusion#3=2")
    for bad in ("effusion#0", "effusion#x", "#1"):
        with pytest.raises(ValueError, match=r"\[CXR Pathology Boost\] input 'words': .*is not word#k.*#1 for the "):
            boost(comfy, tiny_model.model, chest, tokens, words=bad)
    with pytest.raises(ValueError, match=r"\[CXR Pathology Boost\] input 'words': 'effusion' and 'effusion#1' name "
                       r"the same tokens"):
        boost(comfy, tiny_model.model, chest, tokens, words="effusion=2, effusion#1=3")
    with pytest.raises(ValueError, match=r"\[CXR Text Encode.*input 'pathology': 'effusion#3' asks for occurrence 3, "
                       r"but 'effusion' occurs 2 times"):
        encode(comfy, tiny_model, REPEATED, "effusion#3")
    with pytest.raises(ValueError, match=r"\[CXR Text Encode.*input 'anatomy': 'heart#2' asks .* occurs 1 time "):
        encode(comfy, tiny_model, REPEATED, "effusion", anatomy="heart#2")
