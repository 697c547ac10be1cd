"""Stage builders for scripts (the diffusers host): the core builders (:mod:`...attention.stage_builders`, the
ones the ComfyUI nodes call, with the same checks and messages) with a diffusers scheduler's windows and a
transformers tokenizer's token map. Windows are in ComfyUI's percent convention.

    schedule = DiscreteSchedule.from_scheduler(pipe.scheduler)
    tokens = token_map(pipe.tokenizer, prompt, anatomy="left lung, heart", pathology="effusion")
    target = target_region(masks, "left_lung")          # from attention.stage_builders
    stages = [gate_stage(masks, schedule, tokens=tokens), boost_stage(tokens, target, schedule)]

Errors name the nodes' inputs: ``factors`` is the boost node's ``words``, ``damping`` its ``outside_damping``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ...attention import stage_builders as build
from ...attention.organs import OrganMasks
from ...attention.schedule import DiscreteSchedule
from ...attention.stages import BoostStage, CaptureStage, GateStage
from ...attention.tokens import TokenMap, build_token_map, parse_anatomy, parse_words


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


def gate_stage(masks: OrganMasks, schedule: DiscreteSchedule, *, tokens: TokenMap | None = None,
               strength: float = 1.0, token_strength: float = 1.0, organs: str = "right_lung, left_lung, heart",
               background: str = "free", margin_px: int = 0, blocks: str | Iterable[str] = "all",
               start_percent: float = 0.0, end_percent: float = 1.0, apply_to_uncond: bool = build.GATE_APPLY_TO_UNCOND,
               title: str = "CXR gate", anatomy_isolation: str = "tokens") -> GateStage:
    """The anatomy gate (as the CXR Anatomy Attention Gate node): ``strength`` confines self-attention to
    organs (1 = hard), ``token_strength`` hides anatomy words from tokens outside their organ.
    ``anatomy_isolation`` "prompt" is ComfyUI's only: refused here (:class:`.CXRInputError`)."""
    return build.gate_stage(masks, schedule.percent_to_sigma, tokens=tokens, strength=strength,
                            token_strength=token_strength, organs=organs, background=background, margin_px=margin_px,
                            blocks=blocks, start_percent=start_percent, end_percent=end_percent,
                            apply_to_uncond=apply_to_uncond, title=title, anatomy_isolation=anatomy_isolation)


def boost_stage(tokens: TokenMap, target: OrganMasks, schedule: DiscreteSchedule, *, factor: float = 3.0,
                factors: Mapping[str, float] | None = None, damping: float = 1.0,
                blocks: str | Iterable[str] = "all", start_percent: float = 0.0, end_percent: float = 0.4,
                title: str = "CXR boost") -> BoostStage:
    """Pathology boosting (as the CXR Pathology Boost node): every pathology word (or ``factors``) weighted
    ``factor`` inside ``target`` (:func:`.stage_builders.target_region`) and ``damping`` outside, in the early
    steps."""
    return build.boost_stage(tokens, target, schedule.percent_to_sigma, factor=factor, words=factors or "",
                             outside_damping=damping, blocks=blocks, start_percent=start_percent,
                             end_percent=end_percent, title=title)


def capture_stage(tokens: TokenMap, schedule: DiscreteSchedule, *, label: str = "run", grid_factor: int = 2,
                  target: OrganMasks | None = None, start_percent: float = 0.0, end_percent: float = 1.0,
                  title: str = "CXR capture") -> CaptureStage:
    """Attention capture (as the CXR Capture Attention node): per-word maps at the grid ``latent / grid_factor``
    and, with a target, the pathology words' share inside it, per step, into the run's record."""
    return build.capture_stage(tokens, schedule.percent_to_sigma, label=label, grid_factor=grid_factor,
                               target=target, start_percent=start_percent, end_percent=end_percent, title=title)
