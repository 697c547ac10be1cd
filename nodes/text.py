"""Text encoding that also records where the anatomy and pathology words sit (``CXR_TOKENS``)."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..attention.gating import PromptTokenMap
from ..attention.tokens import (
    ContextPart,
    TokenizerView,
    TokenMap,
    build_context_token_map,
    build_token_map,
    continues_word,
    parse_anatomy,
    parse_words,
)
from ..errors import CXRInputError
from .common import user_errors
from .schema import CATEGORY_TEXT, TokensType, described


def _tokenizer_for(clip, key: str):
    """The SDTokenizer behind one key of ``clip.tokenize``'s output ('l', 'g', 'h', ...)."""
    tok = getattr(clip.tokenizer, f"clip_{key}", None) or getattr(clip.tokenizer, key, None)
    if tok is None or not hasattr(tok, "tokenizer"):
        raise CXRInputError(
            f"cannot find the '{key}' tokenizer of this text encoder.",
            input_name="clip",
            fix="Use an SD1.x, SD2.x or SDXL CLIP (the anatomy stages target those UNets).",
        )
    return tok


def _word_ids(tok, word: str) -> list[int]:
    ids = list(tok.tokenizer(word)["input_ids"])
    if ids and ids[0] == getattr(tok, "start_token", None):
        ids = ids[1:]
    if ids and ids[-1] == getattr(tok, "end_token", None):
        ids = ids[:-1]
    return ids


def _chunk_ids(chunks) -> list[list[int]]:
    """Token ids per chunk of ``clip.tokenize``'s output (an embedding's vector: -1, which no word matches)."""
    return [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in chunks]


#: Tokenizer key of ``clip.tokenize``'s output → (the encoder attribute of the text encoder model, its name).
_DIT_ENCODERS = {"l": ("clip_l", "CLIP-L"), "g": ("clip_g", "CLIP-G"), "t5xxl": ("t5xxl", "T5-XXL")}


def _view(clip, tokens: dict, key: str) -> TokenizerView:
    tok = _tokenizer_for(clip, key)
    # T5's sentencepiece pieces mark a word's start, so a match followed by a continuing piece is inside a longer
    # word ('▁heart', 'beat'); CLIP's pieces mark a word's end, which the word's own ids already hold.
    continues = (lambda i: continues_word(tok.inv_vocab.get(i, ""))) if key == "t5xxl" else None
    return TokenizerView(_DIT_ENCODERS[key][1], _chunk_ids(tokens[key]), lambda w: _word_ids(tok, w), continues)


def dit_context_parts(clip, tokens: dict) -> tuple[str, list[ContextPart]] | None:
    """(layout, parts) of a diffusion transformer's text encoder, or None for a UNet's.

    SD3 (``sd3_clip.SD3ClipModel``): the CLIP-L ‖ CLIP-G chunks (when either is loaded; its attribute is None
    otherwise), then T5 (when loaded). Flux (``flux.FluxClipModel``): T5 only; its CLIP-L gives the pooled vector.
    ``clip.tokenize`` returns every key of the family whether or not that encoder is loaded, so the parts follow
    the model, not the keys.
    """
    from comfy.text_encoders.flux import FluxClipModel
    from comfy.text_encoders.sd3_clip import SD3ClipModel

    model = getattr(clip, "cond_stage_model", None)
    if isinstance(model, SD3ClipModel):
        layout, groups = "sd3", (("clip", ("l", "g")), ("t5", ("t5xxl",)))
    elif isinstance(model, FluxClipModel):
        layout, groups = "flux", (("t5", ("t5xxl",)),)
    else:
        return None
    parts = []
    for part, keys in groups:
        views = tuple(_view(clip, tokens, key) for key in keys
                      if getattr(model, _DIT_ENCODERS[key][0], None) is not None)
        if views:
            parts.append(ContextPart(part, views))
    if not parts:
        raise CXRInputError("this SD3 text encoder has neither a CLIP nor a T5 loaded: its context is blank.",
                            input_name="clip", fix="Load CLIP-L, CLIP-G or T5-XXL (e.g. with TripleCLIPLoader).")
    return layout, parts


def locate_words(clip, text: str, anatomy: str, pathology: str) -> tuple[dict, TokenMap]:
    """Tokenise ``text`` once and locate the words; returns (tokens for encoding, token map).

    UNet encoders (layout "clip"): every tokenizer (SDXL has 'l' and 'g') must agree on the positions: they pad to
    the same 77-token chunks, so a disagreement means a tokenizer this pack does not understand. SD3 and Flux
    (layouts "sd3", "flux"): :func:`dit_context_parts`, each word located with every tokenizer whose encoder is
    loaded (:func:`..attention.tokens.build_context_token_map`).
    """
    tokens = clip.tokenize(text)
    dit = dit_context_parts(clip, tokens)
    if dit is not None:
        layout, parts = dit
        return tokens, build_context_token_map(layout, parts, parse_anatomy(anatomy), parse_words(pathology))
    maps = {}
    for key, chunks in tokens.items():
        ids = _chunk_ids(chunks)
        tok = _tokenizer_for(clip, key)
        maps[key] = build_token_map(ids, lambda w, tok=tok: _word_ids(tok, w), parse_anatomy(anatomy),
                                    parse_words(pathology))
    first = next(iter(maps.values()))
    for key, other in maps.items():
        if dict(other.positions) != dict(first.positions) or dict(other.spans) != dict(first.spans):
            raise CXRInputError(f"tokenizers disagree on word positions ('{key}').", input_name="clip")
    return tokens, first


def tokens_without(clip, tokens: dict, removed: tuple[int, ...]) -> dict:
    """``clip.tokenize``'s output with the context ``removed`` positions taken out of every tokenizer's chunks, each
    chunk padded back at its end with that tokenizer's padding (as it pads a shorter prompt)."""
    gone = set(removed)
    out = {}
    for key, chunks in tokens.items():
        tok = _tokenizer_for(clip, key)
        kept_chunks = []
        for c, chunk in enumerate(chunks):
            kept = [t for i, t in enumerate(chunk) if c * len(chunk) + i not in gone]
            pad = (tok.pad_token, 1.0, 0)[: len(chunk[-1])]
            kept_chunks.append(kept + [pad] * (len(chunk) - len(kept)))
        out[key] = kept_chunks
    return out


def prompt_encoder(clip, tokens: dict, token_map: TokenMap):
    """The ``encode_without(removed)`` of :class:`..attention.gating.PromptTokenMap` (anatomy_isolation "prompt").

    Only UNet prompts (layout "clip") can be re-encoded without some positions: a DiT's context joins CLIP and T5
    parts, and T5's encoder is bidirectional, so removing a word is a different edit there (not built yet). For
    them the returned function refuses, when the gate asks for it.
    """
    if token_map.layout == "clip":
        return lambda removed: clip.encode_from_tokens(tokens_without(clip, tokens, removed))
    family = {"sd3": "SD3", "flux": "Flux"}.get(token_map.layout, token_map.layout)

    def refuse(removed: tuple[int, ...]):
        raise CXRInputError(
            f"anatomy_isolation 'prompt' re-encodes the prompt without its anatomy words, which is built for UNet "
            f"models (SD1.x, SD2.x, SDXL) only; these tokens come from a {family} text encoder.",
            input_name="anatomy_isolation", fix="Use anatomy_isolation 'tokens'.")

    return refuse


class CXRTextEncode(io.ComfyNode):
    """Encodes the prompt like CLIP Text Encode and also finds where its anatomy words ('left lung', 'heart') and
    pathology words ('effusion') sit in the conditioning, so the gate and boost nodes can act on exactly those
    tokens. Type the prompt once."""

    TITLE = "CXR Text Encode (with token map)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRTextEncode",
            display_name=cls.TITLE,
            category=CATEGORY_TEXT,
            description=described(cls),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (from the checkpoint loader)."),
                io.String.Input(
                    "text", multiline=True, default="chest x-ray, left lung with large pleural effusion, normal heart",
                    tooltip="The prompt. Weights like (effusion:1.2) work; prompts over 75 tokens are fine.",
                ),
                io.String.Input(
                    "anatomy", default="left lung, heart",
                    tooltip="Anatomy words or phrases in the prompt, comma-separated, each tied to an organ: "
                    "'left lung' → left_lung, 'lungs' → both lungs, or explicit 'lungs=right_lung+left_lung'. "
                    "'left lung#2' names only the 2nd occurrence in the prompt (no '#' = every occurrence).",
                ),
                io.String.Input(
                    "pathology", default="effusion",
                    tooltip="Pathology words in the prompt (e.g. effusion, consolidation, pneumothorax). A word "
                    "stands for every occurrence; 'effusion#1' for only the 1st (counted from 1 in prompt order), "
                    "e.g. in 'left lung effusion, right lung clear, no effusion'.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The encoded prompt, as CLIP Text Encode."),
                TokensType.Output(display_name="tokens", tooltip="Where each anatomy and pathology word sits."),
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, anatomy: str, pathology: str) -> io.NodeOutput:
        if clip is None:
            raise CXRInputError("no text encoder.", node=cls.TITLE, input_name="clip",
                                fix="Connect the CLIP output of a checkpoint that has a text encoder.")
        with user_errors(cls.TITLE, "text"):
            tokens, token_map = locate_words(clip, text, anatomy, pathology)
        # The gate's anatomy_isolation "prompt" re-encodes the prompt without its anatomy words, lazily (only then).
        token_map = PromptTokenMap(**{f.name: getattr(token_map, f.name) for f in dataclasses.fields(token_map)},
                                   encode_without=prompt_encoder(clip, tokens, token_map))
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens), token_map)


NODES: list[type[io.ComfyNode]] = [CXRTextEncode]
