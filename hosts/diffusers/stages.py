"""Stage builders for scripts (the diffusers host): the same stages the ComfyUI nodes build, from plain
arguments, with windows in ComfyUI's percent convention (pure torch; no host import).

    schedule = DiscreteSchedule.from_scheduler(pipe.scheduler)
    tokens = token_map(pipe.tokenizer, prompt, anatomy="left lung, heart", pathology="effusion")
    target = target_region(masks, "left_lung")
    stages = [gate_stage(masks, schedule, tokens=tokens), boost_stage(tokens, target, schedule)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ...attention.organs import OrganMasks, parse_names
from ...attention.schedule import DiscreteSchedule
from ...attention.stages import BoostStage, CaptureStage, GateStage
from ...attention.tokens import TokenMap, build_token_map, parse_anatomy, parse_words
from ...errors import CXRInputError

ALL_BLOCKS = ("input", "middle", "output")
BACKGROUNDS = ("free", "confined")


def token_map(tokenizer, prompt: str, anatomy: str = "", pathology: str = "") -> TokenMap:
    """Where the anatomy and pathology words sit in ``prompt`` as a CLIP tokenizer (transformers'
    ``CLIPTokenizer``, a diffusers pipeline's ``tokenizer``) encodes it: one padded chunk of
    ``model_max_length`` (77) tokens, as SD pipelines do.

    Args:
        anatomy: ``"left lung, heart, lungs=right_lung+left_lung"`` (see :func:`.tokens.parse_anatomy`).
        pathology: ``"effusion, consolidation"``.

    Raises:
        CXRInputError: a word is not in the (truncated) prompt.
    """
    length = int(getattr(tokenizer, "model_max_length", 77))
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)["input_ids"]

    def encode_word(word: str) -> list[int]:
        return list(tokenizer(word)["input_ids"][1:-1])  # without the start and end tokens

    return build_token_map([list(ids)], encode_word, parse_anatomy(anatomy), parse_words(pathology))


def target_region(masks: OrganMasks, organs: str | Iterable[str]) -> OrganMasks:
    """The one-region target (union of ``organs``) that boosting, capture and refinement take."""
    return OrganMasks(("target",), masks.union(parse_names(organs))[None])


def _window(schedule: DiscreteSchedule, start: float, end: float) -> tuple[float, float]:
    if not 0.0 <= start <= end <= 1.0:
        raise CXRInputError(f"the window {start}..{end} is not 0 ≤ start ≤ end ≤ 1.", input_name="start_percent",
                            fix="Use start_percent ≤ end_percent, both in [0, 1].")
    return schedule.percent_to_sigma(start), schedule.percent_to_sigma(end)


def _blocks(blocks: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(blocks)
    if not chosen or not chosen <= set(ALL_BLOCKS):
        raise CXRInputError(f"blocks {sorted(chosen)} are not among {ALL_BLOCKS}.", input_name="blocks",
                            fix="Use any of input, middle, output.")
    return chosen


def gate_stage(masks: OrganMasks, schedule: DiscreteSchedule, *, tokens: TokenMap | None = None,
               strength: float = 1.0, token_strength: float = 1.0, organs: str = "right_lung, left_lung, heart",
               background: str = "free", margin_px: int = 0, blocks: Iterable[str] = ALL_BLOCKS,
               start_percent: float = 0.0, end_percent: float = 1.0, apply_to_uncond: bool = False,
               title: str = "CXR gate") -> GateStage:
    """The anatomy gate (as the CXR Anatomy Attention Gate node): ``strength`` confines self-attention to
    organs (1 = hard), ``token_strength`` hides anatomy words from tokens outside their organ."""
    for name, value in (("strength", strength), ("token_strength", token_strength)):
        if not 0.0 <= value <= 1.0:
            raise CXRInputError(f"{name} {value} is outside [0, 1].", input_name=name, fix="Use 0 (off) to 1 (hard).")
    if background not in BACKGROUNDS:
        raise CXRInputError(f"background '{background}' is not one of {BACKGROUNDS}.", input_name="background",
                            fix="Use free or confined.")
    names = tuple(parse_names(organs))
    masks.select(names)  # every organ must be present
    words: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    if tokens is not None and token_strength > 0:
        for word, tied in tokens.anatomy.items():
            missing = [o for o in tied if o not in masks]
            if missing:
                raise CXRInputError(
                    f"the anatomy word '{word}' is tied to {', '.join(missing)}, which the masks lack.",
                    input_name="tokens", fix="Tie the word to a present organ (lungs=right_lung+left_lung).")
            words.append((tokens.indices(word), tied))
    sigma_start, sigma_end = _window(schedule, start_percent, end_percent)
    return GateStage(title=title, sigma_start=sigma_start, sigma_end=sigma_end, blocks=_blocks(blocks), masks=masks,
                     organs=names, self_leak=1.0 - strength, token_leak=1.0 - token_strength, background=background,
                     margin_px=margin_px, apply_to_uncond=apply_to_uncond,
                     cond_len=tokens.cond_len if tokens else 77, token_words=tuple(words))


def boost_stage(tokens: TokenMap, target: OrganMasks, schedule: DiscreteSchedule, *, factor: float = 3.0,
                factors: Mapping[str, float] | None = None, damping: float = 1.0, blocks: Iterable[str] = ALL_BLOCKS,
                start_percent: float = 0.0, end_percent: float = 0.4, title: str = "CXR boost") -> BoostStage:
    """Pathology boosting (as the CXR Pathology Boost node): every pathology word (or ``factors``) weighted
    ``factor`` inside ``target`` (:func:`target_region`) and ``damping`` outside, in the early steps."""
    chosen = dict(factors) if factors else {w: factor for w in tokens.pathology}
    if not chosen:
        raise CXRInputError("no pathology word to boost.", input_name="tokens",
                            fix="Give pathology words to token_map (e.g. effusion).")
    if any(f <= 0 for f in chosen.values()) or not 0.0 <= damping <= 1.0:
        raise CXRInputError("a factor is not positive or damping is outside [0, 1].", input_name="factor",
                            fix="Use factors above 0 (1 = unchanged) and damping in [0, 1].")
    sigma_start, sigma_end = _window(schedule, start_percent, end_percent)
    return BoostStage(title, sigma_start, sigma_end, _blocks(blocks), target=target,
                      positions={w: tokens.indices(w) for w in chosen}, factors=chosen, damping=damping,
                      cond_len=tokens.cond_len)


def capture_stage(tokens: TokenMap, schedule: DiscreteSchedule, *, label: str = "run", grid_factor: int = 2,
                  target: OrganMasks | None = None, start_percent: float = 0.0, end_percent: float = 1.0,
                  title: str = "CXR capture") -> CaptureStage:
    """Attention capture (as the CXR Capture Attention node): per-word maps at the grid ``latent / grid_factor``
    and, with a target, the pathology words' share inside it, per step, into the run's record."""
    if grid_factor not in (1, 2, 4, 8):
        raise CXRInputError(f"grid_factor {grid_factor} is not 1, 2, 4 or 8.", input_name="grid_factor",
                            fix="Use 2 (half the latent) or 4.")
    sigma_start, sigma_end = _window(schedule, start_percent, end_percent)
    return CaptureStage(title, sigma_start, sigma_end, frozenset(ALL_BLOCKS), label=label,
                        positions=dict(tokens.positions), pathology=tuple(tokens.pathology), grid_factor=grid_factor,
                        target=target, cond_len=tokens.cond_len)
