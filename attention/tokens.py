"""Token locator: which context indices of the prompt hold a word or phrase (host-agnostic).

A prompt is tokenised into chunks of 77 (start token, 75 text tokens, end/padding); prompts over 75
tokens make more chunks and the context index is ``chunk·77 + position``. A word is found by tokenising
it alone and searching that id sequence in the prompt's ids ("effusion" is two tokens; every occurrence
counts). Weighted syntax such as ``(left lung:1.2)`` changes weights, not ids, so it is found too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import CXRInputError
from .organs import normalise_name

# Anatomy words whose organ is not simply their own normalised name.
ORGAN_ALIASES: dict[str, tuple[str, ...]] = {
    "lung": ("right_lung", "left_lung"),
    "lungs": ("right_lung", "left_lung"),
    "both_lungs": ("right_lung", "left_lung"),
    "cardiac": ("heart",),
    "cardiac_silhouette": ("heart",),
    "heart_shadow": ("heart",),
}


@dataclass(frozen=True)
class TokenMap:
    """Words of one prompt and their context indices (the ``CXR_TOKENS`` link type).

    Attributes:
        cond_len: length of the prompt's conditioning (77 per chunk).
        positions: word or phrase → context indices of every token of every occurrence.
        anatomy: anatomy word → the organs it is tied to.
        pathology: pathology words, in the order given.
    """

    cond_len: int
    positions: Mapping[str, tuple[int, ...]]
    anatomy: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pathology: tuple[str, ...] = ()

    def indices(self, word: str) -> tuple[int, ...]:
        if word not in self.positions:
            raise CXRInputError(
                f"'{word}' was not given to the text encoder (known: {', '.join(self.positions) or 'none'}).",
                fix="List the word in the text-encode node's anatomy or pathology words.",
            )
        return self.positions[word]


def token_columns(positions: Iterable[int], cond_len: int, context_len: int) -> torch.Tensor:
    """The key columns of prompt ``positions`` in an attention call whose context holds ``context_len`` tokens.

    A host may repeat a prompt's conditioning up to the least common multiple of the positive and negative
    lengths, so position ``p`` also sits at ``p + cond_len·j`` for every repeat ``j`` (columns in the order
    ``p`` then ``j``).
    """
    repeats = context_len // cond_len
    return torch.tensor([p + cond_len * j for p in positions for j in range(repeats)], dtype=torch.long)


def find_subsequence(ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Start offsets of every occurrence of ``pattern`` in ``ids``."""
    m = len(pattern)
    if m == 0:
        return []
    return [i for i in range(len(ids) - m + 1) if list(ids[i : i + m]) == list(pattern)]


def locate(chunks: Sequence[Sequence[int]], word_ids: Sequence[int], word: str) -> tuple[int, ...]:
    """Context indices of every token of every occurrence of ``word_ids`` in the prompt's chunks.

    Raises:
        CXRInputError: the word does not occur in the prompt.
    """
    found: list[int] = []
    for c, chunk in enumerate(chunks):
        for start in find_subsequence(chunk, word_ids):
            found.extend(c * len(chunk) + start + j for j in range(len(word_ids)))
    if not found:
        raise CXRInputError(
            f"the word '{word}' is not in the prompt.",
            input_name="text",
            fix=f"Add '{word}' to the prompt, or remove it from the word list.",
        )
    return tuple(found)


def parse_anatomy(spec: str) -> dict[str, tuple[str, ...]]:
    """``"left lung, heart, lungs=right_lung+left_lung"`` → phrase → organs.

    Without ``=``, the organ is the phrase's own name (``left lung`` → ``left_lung``) or a known alias
    (``lungs`` → both lungs, ``cardiac silhouette`` → heart).
    """
    out: dict[str, tuple[str, ...]] = {}
    for part in re.split(r"[,;\n]+", spec):
        if not part.strip():
            continue
        phrase, _, organs = part.partition("=")
        phrase = phrase.strip()
        if organs.strip():
            out[phrase] = tuple(normalise_name(o) for o in re.split(r"[+&]", organs) if o.strip())
        else:
            key = normalise_name(phrase)
            out[phrase] = ORGAN_ALIASES.get(key, (key,))
    return out


def parse_words(spec: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in re.split(r"[,;\n]+", spec) if w.strip())


def build_token_map(
    chunks: Sequence[Sequence[int]],
    encode_word: Callable[[str], Sequence[int]],
    anatomy: Mapping[str, tuple[str, ...]],
    pathology: Sequence[str],
) -> TokenMap:
    """Locate every anatomy and pathology word in a tokenised prompt.

    Args:
        chunks: the prompt's token ids per 77-token chunk (one tokenizer's view).
        encode_word: a word → its ids without start/end tokens, from the same tokenizer.
        anatomy: phrase → organs (:func:`parse_anatomy`).
        pathology: pathology words or phrases.
    """
    positions: dict[str, tuple[int, ...]] = {}
    for word in [*anatomy, *pathology]:
        if word in positions:
            continue
        ids = list(encode_word(word))
        if not ids:
            raise CXRInputError(f"the word '{word}' has no tokens.", fix="Use a real word.")
        positions[word] = locate(chunks, ids, word)
    cond_len = sum(len(c) for c in chunks)
    return TokenMap(cond_len, positions, dict(anatomy), tuple(pathology))
