"""Word positions in a diffusion transformer's text context (SD3: CLIP-L ‖ CLIP-G chunks, then T5; Flux: T5 only).

The core (``attention/tokens.py`` ``build_context_token_map``) runs on ComfyUI's real tokenizers
(``SD3Tokenizer``, ``FluxTokenizer``: vocabulary files in ComfyUI's tree, no weights); a word is encoded alone with
the Hugging Face tokenizer's own ``add_special_tokens=False``, a route independent of the node's stripping of
start/end tokens. Found positions are checked by spelling the word back from the vocabulary. The node
(``nodes/text.py``) is checked on the tiny SD3.5 checkpoint's real CLIP-L/G (no T5), and its family detection on
real SD3/Flux text encoders built on the meta device (no weights, no memory; only tokenising is run).
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
from node_run import run

from cxr_counterfactual.attention.tokens import (
    ContextPart,
    TokenizerView,
    build_context_token_map,
    build_token_map,
    continues_word,
    token_columns,
)
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.hosts.comfy.standalone import prepare_comfy_import

PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"
ANATOMY = {"left lung": ("left_lung",), "heart": ("heart",)}
PATHOLOGY = ("effusion",)
# By hand from the tokenizers' output for PROMPT. CLIP: <start> chest x - ray , left lung with large ple ural ef
# fusion , normal heart → 'heart' at 16. T5 (no start token): ▁chest ▁ x - ray , ▁left ▁lung ▁with ▁large ▁ ple
# ural ▁eff usion , ▁normal ▁heart → 'heart' at 17.
CLIP_HEART, T5_HEART = 16, 17
LONG = "chest x-ray " + "normal study " * 40 + "left pleural effusion"  # 84 CLIP tokens: two chunks


@pytest.fixture(scope="module")
def toks(comfyui_path):
    """ComfyUI's SD3 and Flux tokenizers (≈ 5 s to load)."""
    prepare_comfy_import(comfyui_path)
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy.text_encoders.sd3_clip import SD3Tokenizer

    return SimpleNamespace(sd3=SD3Tokenizer(), flux=FluxTokenizer())


def view(name: str, sdtok, chunks) -> TokenizerView:
    ids = [[t[0] for t in chunk] for chunk in chunks]
    continues = (lambda i: continues_word(sdtok.inv_vocab[i])) if name.startswith("T5") else None
    return TokenizerView(name, ids, lambda w: sdtok.tokenizer(w, add_special_tokens=False)["input_ids"], continues)


def sd3_parts(tokenizer, text: str, clip: bool = True, t5: bool = True) -> list[ContextPart]:
    tokens = tokenizer.tokenize_with_weights(text)
    parts = []
    if clip:
        parts.append(ContextPart("clip", (view("CLIP-L", tokenizer.clip_l, tokens["l"]),
                                          view("CLIP-G", tokenizer.clip_g, tokens["g"]))))
    if t5:
        parts.append(ContextPart("t5", (view("T5-XXL", tokenizer.t5xxl, tokens["t5xxl"]),)))
    return parts


def spelled(tokenizer, parts: list[ContextPart], positions: tuple[int, ...]) -> dict[str, str]:
    """Part name → the text the tokens at ``positions`` spell, read from each part's vocabulary (CLIP marks a word's
    end with '</w>', sentencepiece a word's start with '▁')."""
    vocab = {"clip": tokenizer.clip_l.inv_vocab, "t5": tokenizer.t5xxl.inv_vocab}
    out, start = {}, 0
    for part in parts:
        ids = [i for chunk in part.views[0].chunks for i in chunk]
        pieces = [vocab[part.name][ids[p - start]] for p in positions if start <= p < start + part.length]
        out[part.name] = "".join(pieces).replace("</w>", " ").replace("▁", " ").strip()
        start += part.length
    return out


# ---------------------------------------------------------------------------------------------------------------
# the core, on the real tokenizers
def test_sd3_clip_and_t5_positions_in_both_parts(toks) -> None:
    parts = sd3_parts(toks.sd3, PROMPT)
    tm = build_context_token_map("sd3", parts, ANATOMY, PATHOLOGY)
    assert (tm.layout, tm.cond_len, tm.parts) == ("sd3", 154, (("clip", 0, 77), ("t5", 77, 77)))
    assert tm.positions["heart"] == (CLIP_HEART, 77 + T5_HEART)
    for word in ("left lung", "heart", "effusion"):
        pos = tm.positions[word]
        clip_pos, t5_pos = [p for p in pos if p < 77], [p for p in pos if p >= 77]
        assert clip_pos and t5_pos, word  # found by both tokenizers
        assert spelled(toks.sd3, parts, pos) == {"clip": word, "t5": word}
    # The CLIP part is exactly what the UNet path (layout "clip") finds on CLIP-L's chunks.
    unet = build_token_map(parts[0].views[0].chunks, parts[0].views[0].encode_word, ANATOMY, PATHOLOGY)
    assert unet.layout == "clip" and unet.parts == ()
    assert {w: tuple(p for p in pos if p < 77) for w, pos in tm.positions.items()} == dict(unet.positions)
    # cond_len is the whole context: each position is one key column (no repeat).
    assert token_columns(tm.positions["heart"], tm.cond_len, tm.cond_len).tolist() == [CLIP_HEART, 77 + T5_HEART]


def test_sd3_t5_only_and_flux(toks) -> None:
    sd3 = build_context_token_map("sd3", sd3_parts(toks.sd3, PROMPT, clip=False), ANATOMY, PATHOLOGY)
    assert (sd3.cond_len, sd3.parts, sd3.positions["heart"]) == (77, (("t5", 0, 77),), (T5_HEART,))
    tokens = toks.flux.tokenize_with_weights(PROMPT)
    parts = [ContextPart("t5", (view("T5-XXL", toks.flux.t5xxl, tokens["t5xxl"]),))]
    flux = build_context_token_map("flux", parts, ANATOMY, PATHOLOGY)
    assert (flux.layout, flux.cond_len, flux.parts) == ("flux", 256, (("t5", 0, 256),))
    assert dict(flux.positions) == dict(sd3.positions)  # the same T5 tokens, only the padding differs
    assert spelled(toks.flux, parts, flux.positions["effusion"]) == {"t5": "effusion"}


def test_long_prompt_puts_t5_after_two_clip_chunks(toks) -> None:
    parts = sd3_parts(toks.sd3, LONG)
    tm = build_context_token_map("sd3", parts, {}, ("effusion",))
    t5_len = parts[1].length
    assert t5_len == len(toks.sd3.t5xxl.tokenizer(LONG)["input_ids"]) > 77  # T5: one chunk, its own length
    assert tm.parts == (("clip", 0, 154), ("t5", 154, t5_len)) and tm.cond_len == 154 + t5_len
    pos = tm.positions["effusion"]
    assert [p for p in pos if p < 154] and all(77 < p < 154 for p in pos if p < 154)  # in the 2nd CLIP chunk
    assert [p for p in pos if p >= 154]
    assert spelled(toks.sd3, parts, pos) == {"clip": "effusion", "t5": "effusion"}


def test_occurrence_names_cover_that_occurrence_in_every_part(toks) -> None:
    text = "left lung effusion, right lung clear, no effusion"
    parts = sd3_parts(toks.sd3, text)
    tm = build_context_token_map("sd3", parts, {}, ("effusion#2", "effusion"))
    first, second = tm.spans["effusion"]
    assert tm.positions["effusion#2"] == second and tm.positions["effusion"] == first + second
    for occ in (first, second):
        assert spelled(toks.sd3, parts, occ) == {"clip": "effusion", "t5": "effusion"}
    assert max(first) < min(p for p in second if p >= 77)  # prompt order within T5 too
    with pytest.raises(CXRInputError, match=r"input 'pathology'.*occurrence 3.*occurs 2 times"):
        build_context_token_map("sd3", parts, {}, ("effusion#3",))


@pytest.mark.parametrize(("text", "word", "counts"), [
    ("normal lung/heart", "heart", "CLIP-L 1 time, T5-XXL 0 times"),  # T5: ▁lung / he art
    ("normal heart2", "heart", "CLIP-L 1 time, T5-XXL 0 times"),  # T5: ▁heart 2 (a longer word); CLIP: heart 2
    ("small effusion, unheart", "heart", "CLIP-L 1 time, T5-XXL 0 times"),  # CLIP: un heart; T5: ▁un he art
    # Equal counts from different places would pass a count check alone: CLIP's 'heart' is in 'lung/heart',
    # T5's ▁heart is the start of 'heartbeat', which does not count as 'heart'.
    ("lung/heart, heartbeat", "heart", "CLIP-L 1 time, T5-XXL 0 times"),
])
def test_tokenizers_that_disagree_are_an_input_error(toks, text, word, counts) -> None:
    with pytest.raises(CXRInputError) as err:
        build_context_token_map("sd3", sd3_parts(toks.sd3, text), {}, (word,))
    assert err.value.input_name == "text"
    assert f"find '{word}' a different number of times in this prompt: {counts}" in err.value.problem
    assert f"Write '{word}' as a separate word" in err.value.fix
    # CLIP alone (the UNet's view, or SD3 without T5) finds the word: the error is the parts' disagreement.
    assert build_context_token_map("sd3", sd3_parts(toks.sd3, text, t5=False), {}, (word,)).positions[word]


def test_t5_matches_inside_a_longer_word_do_not_count(toks) -> None:
    """T5 reads 'effusions' as ▁eff usion s and 'heartbeat' as ▁heart beat: 'effusion' and 'heart' match there
    but lie inside a longer word, which CLIP's word-final pieces (fusion</w>, heart</w>) never match."""
    text = "effusion, small effusions, heart and heartbeat"
    parts = sd3_parts(toks.sd3, text)
    t5_ids = list(parts[1].views[0].chunks[0])
    eff = toks.sd3.t5xxl.tokenizer("effusion", add_special_tokens=False)["input_ids"]
    assert sum(t5_ids[i:i + len(eff)] == eff for i in range(len(t5_ids))) == 2  # two raw matches ...
    tm = build_context_token_map("sd3", parts, {"heart": ("heart",)}, ("effusion",))
    for word in ("effusion", "heart"):
        (occ,) = tm.spans[word]  # ... one occurrence: the whole word, in both parts
        assert spelled(toks.sd3, parts, occ) == {"clip": word, "t5": word}
    with pytest.raises(CXRInputError, match="'heart' is not in the prompt"):
        build_context_token_map("sd3", sd3_parts(toks.sd3, "normal heartbeat"), {}, ("heart",))


def test_word_in_no_part_and_bad_layouts(toks) -> None:
    with pytest.raises(CXRInputError, match=r"input 'text': the word 'pneumothorax' is not in the prompt"):
        build_context_token_map("sd3", sd3_parts(toks.sd3, PROMPT), {}, ("pneumothorax",))
    with pytest.raises(ValueError, match="DiT layout"):
        build_context_token_map("clip", sd3_parts(toks.sd3, PROMPT), {}, ())
    with pytest.raises(ValueError, match="unknown token layout 'sdxl'"):
        type(build_token_map([[1, 2]], lambda w: [2], {}, ()))(77, {}, layout="sdxl")


# ---------------------------------------------------------------------------------------------------------------
# the node: family detection and CXR Text Encode on real SD3 / Flux text encoders
def meta_clip(tokenizer, model):
    """A real ``comfy.sd.CLIP`` whose text encoder is built on the meta device: real classes, no weights."""
    import comfy.sd
    import comfy.supported_models_base as smb

    cpu = torch.device("cpu")
    return comfy.sd.CLIP(smb.ClipTarget(tokenizer, model),
                         model_options={"initial_device": torch.device("meta"), "load_device": cpu,
                                        "offload_device": cpu})


def test_locate_words_follows_the_loaded_encoders(comfy) -> None:
    from comfy.text_encoders import flux, sd3_clip

    from cxr_counterfactual.nodes.text import locate_words

    cases = [  # text encoder → (layout, parts, 'heart')
        (meta_clip(flux.FluxTokenizer, flux.flux_clip()), ("flux", (("t5", 0, 256),), (T5_HEART,))),
        (meta_clip(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=False, clip_g=True, t5=True)),
         ("sd3", (("clip", 0, 77), ("t5", 77, 77)), (CLIP_HEART, 77 + T5_HEART))),
        (meta_clip(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=False, clip_g=False, t5=True)),
         ("sd3", (("t5", 0, 77),), (T5_HEART,))),
    ]
    for clip, (layout, parts, heart) in cases:
        tokens, tm = locate_words(clip, PROMPT, "left lung, heart", "effusion")
        assert "l" in tokens and "t5xxl" in tokens  # every key is tokenised, loaded or not
        assert (tm.layout, tm.parts, tm.positions["heart"]) == (layout, parts, heart)
    with pytest.raises(CXRInputError, match=r"different number of times.*CLIP-G 1 time, T5-XXL 0 times"):
        locate_words(cases[1][0], "normal lung/heart", "heart", "")
    _, tm = locate_words(cases[0][0], "normal heart, regular heartbeat", "heart", "")
    assert tm.spans["heart"] == ((1,),)  # ▁normal ▁heart , ▁regular ▁heart beat (no start token): not heartbeat
    with pytest.raises(CXRInputError, match="neither a CLIP nor a T5"):
        locate_words(meta_clip(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(False, False, False)), PROMPT, "heart", "")
    gc.collect()


@pytest.mark.slow
def test_text_encode_on_the_tiny_sd35_clip(comfy, tiny_sd35_checkpoint) -> None:
    """The tiny SD3.5 checkpoint's CLIP-L/G (no T5): layout "sd3", one 77-token CLIP part, the positions the
    UNet path finds on CLIP, the conditioning as long as the map says; prompt isolation refused."""
    from comfy.sd import load_checkpoint_guess_config  # not "import comfy.sd": the fixture is called comfy

    with torch.inference_mode():
        clip = load_checkpoint_guess_config(str(tiny_sd35_checkpoint), output_model=False, output_vae=False)[1]
    cond, tm = run(comfy.node("CXRTextEncode"), clip=clip, text=PROMPT, anatomy="left lung, heart",
                   pathology="effusion")
    assert (tm.layout, tm.cond_len, tm.parts) == ("sd3", 77, (("clip", 0, 77),))
    assert cond[0][0].shape == (1, tm.cond_len, 4096)
    ids = [t[0] for t in clip.tokenize(PROMPT)["l"][0]]
    bpe = clip.tokenizer.clip_l.tokenizer
    unet = build_token_map([ids], lambda w: bpe(w, add_special_tokens=False)["input_ids"], ANATOMY, PATHOLOGY)
    assert dict(tm.positions) == dict(unet.positions) and dict(tm.spans) == dict(unet.spans)
    assert tm.positions["heart"] == (CLIP_HEART,)
    with pytest.raises(CXRInputError, match=r"input 'anatomy_isolation'.*UNet models.*SD3") as err:
        tm.encode_without(tm.positions["heart"])
    assert err.value.fix == "Use anatomy_isolation 'tokens'."
