"""Token locator: which context indices of the prompt hold a word or phrase (host-agnostic).

A prompt is tokenised into chunks of 77 (start token, 75 text tokens, end/padding); prompts over 75
tokens make more chunks and the context index is ``chunk·77 + position``. A word is found by tokenising
it alone and searching that id sequence in the prompt's ids ("effusion" is two tokens; every occurrence
counts). Weighted syntax such as ``(left lung:1.2)`` changes weights, not ids, so it is found too.

``word#k`` names one occurrence: the k-th (from 1) in prompt order, counted across 77-token chunks, e.g.
``effusion#1`` in "left lung effusion, right lung clear, no effusion" is the first "effusion" only (both of its
tokens). :func:`resolve` is the one place such a name becomes context indices; a plain word is every occurrence.

Diffusion transformers lay their context out differently (:data:`LAYOUTS`): SD3 puts the CLIP-L ‖ CLIP-G chunks
(channel-concatenated, so the UNet's 77·k positions) first and T5's tokens after them on the token axis; Flux's
context is T5 alone. :func:`build_context_token_map` locates a word with every tokenizer present and joins the
parts, so a word's indices cover its CLIP tokens and its T5 tokens.
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


#: How a prompt's context is laid out. "clip": CLIP's 77-token chunks, which a UNet host may repeat up to the least
#: common multiple of the positive and negative lengths. "sd3": SD3's CLIP-L ‖ CLIP-G chunks (when a CLIP is loaded),
#: then T5's tokens (when T5 is loaded). "flux": T5's tokens only. A DiT never repeats its context (one pass per
#: context length), so for "sd3" and "flux" ``cond_len`` is the whole context.
LAYOUTS = ("clip", "sd3", "flux")


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
        layout: one of :data:`LAYOUTS`; "clip" for a UNet's CLIP chunks.
        parts: for a DiT layout, ``(part, start, length)`` per encoder in context order ("clip": SD3's CLIP-L ‖
            CLIP-G chunks, "t5": T5's tokens); ``()`` for "clip" (the whole conditioning is CLIP chunks). An
            occurrence's indices then hold its tokens in every part.
    """

    cond_len: int
    positions: Mapping[str, tuple[int, ...]]
    anatomy: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pathology: tuple[str, ...] = ()
    spans: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    layout: str = "clip"
    parts: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown token layout '{self.layout}' (known: {', '.join(LAYOUTS)})")

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
    ``p`` then ``j``). A DiT's token map has ``cond_len`` = its whole context, so each position comes once.
    """
    repeats = context_len // cond_len
    return torch.tensor([p + cond_len * j for p in positions for j in range(repeats)], dtype=torch.long)


def find_subsequence(ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Start offsets of every occurrence of ``pattern`` in ``ids``."""
    m = len(pattern)
    if m == 0:
        return []
    return [i for i in range(len(ids) - m + 1) if list(ids[i : i + m]) == list(pattern)]


def occurrences(chunks: Sequence[Sequence[int]], word_ids: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Context indices of each occurrence of ``word_ids`` in the prompt's chunks, in prompt order (maybe none)."""
    found: list[tuple[int, ...]] = []
    for c, chunk in enumerate(chunks):
        for start in find_subsequence(chunk, word_ids):
            found.append(tuple(c * len(chunk) + start + j for j in range(len(word_ids))))
    return tuple(found)


def _not_in_prompt(word: str) -> CXRInputError:
    return CXRInputError(
        f"the word '{word}' is not in the prompt.",
        input_name="text",
        fix=f"Add '{word}' to the prompt, or remove it from the word list.",
    )


def locate_spans(chunks: Sequence[Sequence[int]], word_ids: Sequence[int], word: str) -> tuple[tuple[int, ...], ...]:
    """Context indices of each occurrence of ``word_ids`` in the prompt's chunks, in prompt order.

    Raises:
        CXRInputError: the word does not occur in the prompt.
    """
    found = occurrences(chunks, word_ids)
    if not found:
        raise _not_in_prompt(word)
    return found


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


def _word_ids(encode_word: Callable[[str], Sequence[int]], word: str) -> list[int]:
    ids = list(encode_word(word))
    if not ids:
        raise CXRInputError(f"the word '{word}' has no tokens.", fix="Use a real word.")
    return ids


def _locate_names(
    anatomy: Mapping[str, tuple[str, ...]],
    pathology: Sequence[str],
    spans_of: Callable[[str], tuple[tuple[int, ...], ...]],
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[tuple[int, ...], ...]]]:
    """(positions, spans) of every anatomy and pathology name; ``spans_of(word)`` locates a word's occurrences."""
    positions: dict[str, tuple[int, ...]] = {}
    spans: dict[str, tuple[tuple[int, ...], ...]] = {}
    for input_name, names in (("anatomy", list(anatomy)), ("pathology", list(pathology))):
        for name in names:
            if name in positions:
                continue
            try:
                word, _ = parse_occurrence(name)
                if word not in spans:
                    spans[word] = spans_of(word)
                positions[name] = resolve(name, spans)
            except CXRInputError as err:
                raise err.located("", input_name) from None  # "not in the prompt" keeps its own input (text)
    return positions, spans


def build_token_map(
    chunks: Sequence[Sequence[int]],
    encode_word: Callable[[str], Sequence[int]],
    anatomy: Mapping[str, tuple[str, ...]],
    pathology: Sequence[str],
) -> TokenMap:
    """Locate every anatomy and pathology word in a tokenised prompt (a UNet's CLIP chunks: layout "clip").

    Args:
        chunks: the prompt's token ids per 77-token chunk (one tokenizer's view).
        encode_word: a word → its ids without start/end tokens, from the same tokenizer.
        anatomy: phrase → organs (:func:`parse_anatomy`); a phrase may name one occurrence (``left lung#1``).
        pathology: pathology words or phrases, each possibly ``word#k``.

    Raises:
        CXRInputError: a word not in the prompt (input ``text``), or a malformed or too large ``#k`` (input
            ``anatomy`` or ``pathology``, where it was written).
    """
    positions, spans = _locate_names(
        anatomy, pathology, lambda word: locate_spans(chunks, _word_ids(encode_word, word), word))
    cond_len = sum(len(c) for c in chunks)
    return TokenMap(cond_len, positions, dict(anatomy), tuple(pathology), spans)


@dataclass(frozen=True)
class TokenizerView:
    """One tokenizer's view of a prompt.

    Attributes:
        name: the tokenizer as a user knows it ("CLIP-L", "CLIP-G", "T5-XXL"), for messages.
        chunks: the prompt's token ids per chunk (CLIP: 77 each; T5: one chunk, padded to its minimum length).
        encode_word: a word → its ids alone, without start/end tokens (T5: without ``</s>``).
        continues: token id → whether that token continues the word before it (T5: :func:`continues_word` of its
            piece), so a match followed by one lies inside a longer word and does not count ('heart' in T5's
            '▁heart', 'beat'). CLIP needs none: its word-final pieces ('heart</w>') never match inside a longer word.
    """

    name: str
    chunks: Sequence[Sequence[int]]
    encode_word: Callable[[str], Sequence[int]]
    continues: Callable[[int], bool] | None = None

    def occurrences(self, word_ids: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """:func:`occurrences` of ``word_ids``, less those inside a longer word (see ``continues``)."""
        found: list[tuple[int, ...]] = []
        for c, chunk in enumerate(self.chunks):
            for start in find_subsequence(chunk, word_ids):
                end = start + len(word_ids)
                if self.continues is not None and end < len(chunk) and self.continues(chunk[end]):
                    continue
                found.append(tuple(c * len(chunk) + i for i in range(start, end)))
        return tuple(found)


def continues_word(piece: str) -> bool:
    """Whether a sentencepiece piece continues the word before it: it has no word-start mark '▁' and begins with a
    letter or digit ('beat' in '▁heart', 'beat'; not ',' or '</s>')."""
    return bool(piece) and not piece.startswith("\u2581") and piece[0].isalnum()


@dataclass(frozen=True)
class ContextPart:
    """One part of a DiT's context: tokenizers whose tokens sit at the same context indices (SD3's CLIP-L and
    CLIP-G are concatenated on the channel axis, so they share "clip"; T5 alone is "t5").

    The part is as long as its shortest view (SD3 cuts CLIP-L ‖ CLIP-G to the shorter).
    """

    name: str
    views: tuple[TokenizerView, ...]

    @property
    def length(self) -> int:
        return min(sum(len(c) for c in view.chunks) for view in self.views)


def _times(n: int) -> str:
    return f"{n} time{'s' if n != 1 else ''}"


def build_context_token_map(
    layout: str,
    parts: Sequence[ContextPart],
    anatomy: Mapping[str, tuple[str, ...]],
    pathology: Sequence[str],
) -> TokenMap:
    """Locate every anatomy and pathology word in a DiT's context: every part, every tokenizer.

    The parts follow each other on the context's token axis in the order given; an occurrence's indices are its
    tokens in the first part, then in the next ones (SD3: CLIP positions < 77·k, then T5's at 77·k + T5 index).
    Each tokenizer must find the word the same number of times, so ``word#k`` names the same occurrence in every
    part; a match inside a longer word does not count where the view can tell (``TokenizerView.continues``: T5's
    'heart' in 'heartbeat', which CLIP's 'heart</w>' does not match either). ``cond_len`` is the whole context (a
    DiT does not repeat it).

    Args:
        layout: "sd3" or "flux" (:data:`LAYOUTS`).
        parts: the context's parts in context order (at least one).
        anatomy, pathology: as for :func:`build_token_map`.

    Raises:
        CXRInputError: a word in no part (input ``text``); tokenizers that find a word a different number of times,
            e.g. T5 reads 'lung/heart' as '▁lung', '/', 'he', 'art' and finds no 'heart' where CLIP does (input
            ``text``); views of one part that disagree (input ``clip``); malformed ``#k`` as for
            :func:`build_token_map`.
    """
    if layout == "clip" or layout not in LAYOUTS:
        raise ValueError(f"build_context_token_map takes a DiT layout ({', '.join(LAYOUTS[1:])}), not '{layout}'")
    if not parts:
        raise ValueError("a DiT context needs at least one part")
    starts = [sum(p.length for p in parts[:i]) for i in range(len(parts))]

    def spans_of(word: str) -> tuple[tuple[int, ...], ...]:
        found: list[tuple[TokenizerView, tuple[tuple[int, ...], ...]]] = []
        for part, start in zip(parts, starts, strict=True):
            first: tuple[tuple[int, ...], ...] | None = None
            for view in part.views:
                spans = tuple(tuple(start + i for i in span)
                              for span in view.occurrences(_word_ids(view.encode_word, word)))
                if first is None:
                    first = spans
                    found.append((view, spans))
                elif spans != first:
                    raise CXRInputError(
                        f"the {part.views[0].name} and {view.name} tokenizers put '{word}' at different positions.",
                        input_name="clip", fix="Use a text encoder whose CLIP tokenizers agree (a stock SD3 one).")
        counts = [len(spans) for _, spans in found]
        if not any(counts):
            raise _not_in_prompt(word)
        if len(set(counts)) > 1:
            said = ", ".join(f"{view.name} {_times(len(spans))}" for view, spans in found)
            raise CXRInputError(
                f"the tokenizers find '{word}' a different number of times in this prompt: {said}. T5 tokenises a "
                "word glued to punctuation, a digit or another word differently from CLIP (in 'lung/heart', "
                "'heart2' or 'unheart' CLIP finds 'heart' and T5 does not).",
                input_name="text",
                fix=f"Write '{word}' as a separate word with a space on each side (e.g. 'lung / heart' rather than "
                "'lung/heart'), and not inside a longer word.")
        return tuple(tuple(i for _, spans in found for i in spans[k]) for k in range(counts[0]))

    positions, spans = _locate_names(anatomy, pathology, spans_of)
    table = tuple((part.name, start, part.length) for part, start in zip(parts, starts, strict=True))
    cond_len = starts[-1] + parts[-1].length
    return TokenMap(cond_len, positions, dict(anatomy), tuple(pathology), spans, layout, table)
