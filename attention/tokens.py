"""Token locator: which context indices of the prompt hold a word or phrase (host-agnostic).

A prompt is tokenised into chunks of 77 (start token, 75 text tokens, end/padding); prompts over 75
tokens make more chunks and the context index is ``chunk·77 + position``. A word is found by tokenising
it alone and searching that id sequence in the prompt's ids ("effusion" is two tokens; every occurrence
counts). Weighted syntax such as ``(left lung:1.2)`` changes weights, not ids, so it is found too.

``word#k`` names one occurrence: the k-th (from 1) in prompt order, counted across 77-token chunks, e.g.
``effusion#1`` in "left lung effusion, right lung clear, no effusion" is the first "effusion" only (both of its
tokens). :func:`resolve` is the one place such a name becomes context indices; a plain word is every occurrence.
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
        positions: word or phrase as given (``effusion`` or ``effusion#2``) → context indices of every token of
            every occurrence it names.
        anatomy: anatomy word → the organs it is tied to.
        pathology: pathology words, in the order given.
        spans: word or phrase without ``#k`` → the context indices of each occurrence, in prompt order (so a
            stage can name one occurrence, ``effusion#2``, of a word the text encoder was given).
    """

    cond_len: int
    positions: Mapping[str, tuple[int, ...]]
    anatomy: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pathology: tuple[str, ...] = ()
    spans: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def indices(self, word: str) -> tuple[int, ...]:
        """Context indices of ``word`` (every occurrence) or ``word#k`` (the k-th occurrence)."""
        if word in self.positions:  # a word as the text encoder was given it: the same indices it located
            return self.positions[word]
        base, k = parse_occurrence(word)
        if k is None or base not in self.spans:
            raise CXRInputError(
                f"'{base}' was not given to the text encoder (known: {', '.join(self.positions) or 'none'}).",
                fix="List the word in the text-encode node's anatomy or pathology words.",
            )
        return resolve(word, self.spans)


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


def locate_spans(chunks: Sequence[Sequence[int]], word_ids: Sequence[int], word: str) -> tuple[tuple[int, ...], ...]:
    """Context indices of each occurrence of ``word_ids`` in the prompt's chunks, in prompt order.

    Raises:
        CXRInputError: the word does not occur in the prompt.
    """
    found: list[tuple[int, ...]] = []
    for c, chunk in enumerate(chunks):
        for start in find_subsequence(chunk, word_ids):
            found.append(tuple(c * len(chunk) + start + j for j in range(len(word_ids))))
    if not found:
        raise CXRInputError(
            f"the word '{word}' is not in the prompt.",
            input_name="text",
            fix=f"Add '{word}' to the prompt, or remove it from the word list.",
        )
    return tuple(found)


def locate(chunks: Sequence[Sequence[int]], word_ids: Sequence[int], word: str) -> tuple[int, ...]:
    """Context indices of every token of every occurrence of ``word_ids`` in the prompt's chunks."""
    return tuple(i for span in locate_spans(chunks, word_ids, word) for i in span)


def parse_occurrence(name: str) -> tuple[str, int | None]:
    """``"effusion#2"`` → ``("effusion", 2)``; ``"effusion"`` → ``("effusion", None)`` (every occurrence).

    Raises:
        CXRInputError: a ``#`` not followed by a whole number from 1, or with no word before it.
    """
    base, sep, k = name.partition("#")
    base = base.strip()
    if not sep:
        return base, None
    if not base or not k.strip().isdigit() or int(k) < 1:
        raise CXRInputError(
            f"'{name.strip()}' is not word#k (k counts the word's occurrences in the prompt from 1).",
            fix=f"Write the word, '#' and which occurrence, e.g. {base or 'effusion'}#1 for the first; the word "
            "alone means every occurrence.",
        )
    return base, int(k)


def resolve(name: str, spans: Mapping[str, Sequence[Sequence[int]]]) -> tuple[int, ...]:
    """The context indices ``name`` names: every occurrence of a word, or its k-th with ``word#k``.

    The one resolver of occurrence names: the text encoder's word lists and the stages' word inputs use it.

    Args:
        name: ``word`` or ``word#k``.
        spans: word → the context indices of each occurrence, in prompt order (:func:`locate_spans`).

    Raises:
        CXRInputError: malformed ``#k``, or ``k`` beyond the word's occurrences (the message says how many).
    """
    base, k = parse_occurrence(name)
    found = spans[base]
    if k is None:
        return tuple(i for span in found for i in span)
    if k > len(found):
        choices = " or ".join(f"{base}#{j}" for j in range(1, len(found) + 1))
        raise CXRInputError(
            f"'{name.strip()}' asks for occurrence {k}, but '{base}' occurs {len(found)} time"
            f"{'s' if len(found) != 1 else ''} in the prompt.",
            fix=f"Use {choices} (counted in prompt order), or '{base}' for every occurrence.",
        )
    return tuple(found[k - 1])


def parse_anatomy(spec: str) -> dict[str, tuple[str, ...]]:
    """``"left lung, heart, lungs=right_lung+left_lung"`` → phrase → organs.

    Without ``=``, the organ is the phrase's own name (``left lung`` → ``left_lung``) or a known alias
    (``lungs`` → both lungs, ``cardiac silhouette`` → heart); ``left lung#2`` (one occurrence) is tied the same way.
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
            key = normalise_name(parse_occurrence(phrase)[0])
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
        anatomy: phrase → organs (:func:`parse_anatomy`); a phrase may name one occurrence (``left lung#1``).
        pathology: pathology words or phrases, each possibly ``word#k``.

    Raises:
        CXRInputError: a word not in the prompt (input ``text``), or a malformed or too large ``#k`` (input
            ``anatomy`` or ``pathology``, where it was written).
    """
    positions: dict[str, tuple[int, ...]] = {}
    spans: dict[str, tuple[tuple[int, ...], ...]] = {}
    for input_name, names in (("anatomy", list(anatomy)), ("pathology", list(pathology))):
        for name in names:
            if name in positions:
                continue
            try:
                word, _ = parse_occurrence(name)
                if word not in spans:
                    ids = list(encode_word(word))
                    if not ids:
                        raise CXRInputError(f"the word '{word}' has no tokens.", fix="Use a real word.")
                    spans[word] = locate_spans(chunks, ids, word)
                positions[name] = resolve(name, spans)
            except CXRInputError as err:
                raise err.located("", input_name) from None  # "not in the prompt" keeps its own input (text)
    cond_len = sum(len(c) for c in chunks)
    return TokenMap(cond_len, positions, dict(anatomy), tuple(pathology), spans)
