"""Text encoding that also records where the anatomy and pathology words sit (``CXR_TOKENS``)."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..attention.gating import PromptTokenMap
from ..attention.tokens import TokenMap, build_token_map, parse_anatomy, parse_words
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


def locate_words(clip, text: str, anatomy: str, pathology: str) -> tuple[dict, TokenMap]:
    """Tokenise ``text`` once and locate the words; returns (tokens for encoding, token map).

    Every tokenizer of the encoder (SDXL has 'l' and 'g') must agree on the positions: they pad to the same
    77-token chunks, so a disagreement means a tokenizer this pack does not understand.
    """
    tokens = clip.tokenize(text)
    maps = {}
    for key, chunks in tokens.items():
        ids = [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in chunks]
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
                                   encode_without=lambda removed: clip.encode_from_tokens(
                                       tokens_without(clip, tokens, removed)))
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens), token_map)


NODES: list[type[io.ComfyNode]] = [CXRTextEncode]
