"""One builder per stage: plain values in, a validated stage out (pure torch; no host import).

Both hosts build their stages here (the ComfyUI nodes and the diffusers builders of
:mod:`..hosts.diffusers.stages`), so they refuse the same inputs with the same message: every check a user can
trip (NaN and infinity, ranges, windows, choices, words, organs) is made once, here, before anything long runs.
Errors are :class:`.CXRInputError` naming the input (by the node's input name) and the fix; a node adds its title.

Windows are percents of the model's noise range (ComfyUI's convention); the host turns them into sigmas with its
``to_sigma`` (the model's ``percent_to_sigma``, or a diffusers scheduler's :class:`.schedule.DiscreteSchedule`).
The choice tuples below are the ones the nodes list, in the order they show them (saved workflows store the value).

    stage = gate_stage(masks, schedule.percent_to_sigma, tokens=tokens, strength=1.0, background="free")
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import CXRInputError
from .gating import BACKGROUNDS, ISOLATION_MAX_WORDS, ISOLATIONS, PromptIsolation
from .mask_batch import AnyOrganMasks, batch_masks, mask_sets, sample_masks
from .organs import OrganMasks, parse_names
from .stages import BoostStage, CaptureStage, GateStage
from .tokens import TokenMap

ToSigma = Callable[[float], float]

#: The UNet parts a stage can cover, and the nodes' ``blocks`` choices of them.
UNET_PARTS = ("input", "middle", "output")
#: A diffusion transformer's block kinds (ComfyUI's block replace keys): "all" covers them; the other choices name
#: UNet parts, which a DiT does not have (the nodes refuse them there).
DIT_PARTS = ("double_block", "single_block")
BLOCK_CHOICES: dict[str, tuple[str, ...]] = {
    "all": UNET_PARTS + DIT_PARTS,
    "input+middle": ("input", "middle"),
    "middle+output": ("middle", "output"),
    "input": ("input",),
    "middle": ("middle",),
    "output": ("output",),
}
#: Capture and refinement grids: the latent ÷ this (the nodes' combo values, in their order).
GRID_FACTORS = ("2", "1", "4", "8")
#: Boost factors (the node's ``factor`` range; per-word factors may go lower, down to anything above 0).
FACTOR_MIN, FACTOR_MAX = 0.05, 50.0
#: The gate's default for the negative prompt's pass (self-attention gating on both passes): decided by the rule in
#: README, "Defaults for the negative prompt's pass" (benchmarks/defaults.py); every host and the node use it.
GATE_APPLY_TO_UNCOND = True
#: Organ growth before labelling tokens, in pixels of the masks' grid.
MARGIN_MAX = 256


# --------------------------------------------------------------------------------------------------
# the checks every builder uses
def check_number(name: str, value: float, lo: float | None, hi: float | None) -> None:
    """Refuse NaN, infinity and anything outside ``[lo, hi]`` (None: unbounded on that side). Every comparison
    with NaN is false, so a plain range test would let it through."""
    if math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi):
        return
    if lo is not None and hi is not None:
        span = f"between {lo:g} and {hi:g}"
    elif lo is not None or hi is not None:
        span = f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
    else:
        span = "that is finite"
    raise CXRInputError(f"{value} is not a number {span}.", input_name=name, fix=f"Use a number {span}.")


def check_choice(name: str, value: str, options: Iterable[str]) -> None:
    """Refuse a value that is not one of ``options`` (ComfyUI 0.3.64 checks no V3 combo value)."""
    options = tuple(options)
    if value not in options:
        listed = ", ".join(options)
        raise CXRInputError(f"'{value}' is not one of {listed}.", input_name=name,
                            fix=f"Pick a value from the list: {listed} (an API prompt may hold any string).")


def check_window(start_percent: float, end_percent: float) -> None:
    """Both ends in [0, 1] and the start not after the end."""
    check_number("start_percent", start_percent, 0.0, 1.0)
    check_number("end_percent", end_percent, 0.0, 1.0)
    if start_percent > end_percent:
        raise CXRInputError(f"start {start_percent} is after end {end_percent}.", input_name="start_percent",
                            fix="Use start_percent ≤ end_percent.")


def _strength(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise CXRInputError(f"{value} is outside [0, 1].", input_name=name, fix="Use 0 (off) to 1 (hard).")
    return value


def unet_parts(blocks: str | Iterable[str]) -> frozenset[str]:
    """The UNet parts of a ``blocks`` choice (``"all"``, ``"input+middle"``, ...) or of a list of parts."""
    if isinstance(blocks, str):
        check_choice("blocks", blocks, BLOCK_CHOICES)
        return frozenset(BLOCK_CHOICES[blocks])
    chosen = frozenset(blocks)
    if not chosen or not chosen <= set(UNET_PARTS + DIT_PARTS):
        raise CXRInputError(f"blocks {sorted(chosen)} are not among {', '.join(UNET_PARTS)}.", input_name="blocks",
                            fix="Use any of input, middle, output.")
    return chosen


def parse_grid_factor(value: int | str) -> int:
    """A capture or refinement grid factor (``2`` or ``"2"``) as an int."""
    check_choice("grid_factor", str(value), GRID_FACTORS)
    return int(value)


def _located(err: CXRInputError, input_name: str) -> CXRInputError:
    return err.located("", input_name)


def target_region(masks: AnyOrganMasks | None, organs: str | Iterable[str] = "",
                  mask: torch.Tensor | None = None) -> AnyOrganMasks:
    """The one-region target that boosting, capture and refinement take: ``mask`` when given (values 0 to 1, not
    empty), else the union of ``organs`` from ``masks``.

    Per image where the input is per image: a MASK batch of ``n > 1`` masks (one per image) or an
    :class:`.mask_batch.OrganMaskBatch` gives an ``OrganMaskBatch`` of one-region targets, image ``i``'s from its own
    mask (set); one mask (set) gives one target that every image shares.
    """
    if mask is not None:
        batch = mask.reshape(-1, *mask.shape[-2:]).float().cpu()
        targets = []
        for i, m in enumerate(batch):
            which = "the target mask" if batch.shape[0] == 1 else f"target mask {i + 1} of {batch.shape[0]}"
            if not bool(torch.isfinite(m).all()):
                raise CXRInputError(f"{which} contains NaN or infinite values.", input_name="target_mask",
                                    fix="Fix the node that made the MASK (values must be 0 to 1).")
            if float(m.max()) <= 0:
                raise CXRInputError(f"{which} is empty.", input_name="target_mask",
                                    fix="Connect a mask that marks the target region (1 = inside), one per image "
                                        "of the batch or one for all.")
            targets.append(OrganMasks(("target",), m.clamp(0, 1)[None]))
        return batch_masks(targets)
    if masks is None:
        raise CXRInputError("no target region.", input_name="organ_masks",
                            fix="Connect the fitted organ masks (and name target organs) or a target MASK.")
    try:
        names = parse_names(organs)
        return batch_masks([OrganMasks(("target",), m.union(names)[None]) for m in mask_sets(masks)])
    except CXRInputError as err:
        raise _located(err, "target_organs") from None


def word_factors(words: str | Mapping[str, float], tokens: TokenMap, default: float) -> dict[str, float]:
    """Per-word boost factors: ``"effusion=3, consolidation"`` (a bare word gets ``default``) or a mapping;
    empty = every pathology word of ``tokens`` at ``default``. A word may name one occurrence, ``effusion#1=3``
    (resolved by :meth:`.TokenMap.indices`). Each factor in ``(0, FACTOR_MAX]``."""
    chosen: dict[str, float] = {}
    if isinstance(words, str):
        for part in re.split(r"[,;\n]+", words):
            if not part.strip():
                continue
            word, _, value = part.partition("=")
            try:
                chosen[word.strip()] = float(value) if value.strip() else default
            except ValueError:
                raise CXRInputError(f"'{value.strip()}' is not a number.", input_name="words",
                                    fix="Write word=factor, e.g. effusion=3.") from None
    else:
        chosen = {w: float(f) for w, f in words.items()}
    if not chosen:
        chosen = {w: default for w in tokens.pathology}
    if not chosen:
        raise CXRInputError("no pathology word to boost.", input_name="words",
                            fix="List pathology words with the prompt (CXR Text Encode, or token_map's pathology), "
                            "e.g. effusion.")
    for w, f in chosen.items():
        if not 0 < f <= FACTOR_MAX:  # also refuses NaN and infinity, which would make every share NaN
            raise CXRInputError(f"factor {f} for '{w}' is not a number above 0 and at most {FACTOR_MAX:g}.",
                                input_name="words",
                                fix=f"Use a factor above 0 and at most {FACTOR_MAX:g} (1 = unchanged, 2–5 = boost).")
    return chosen


# --------------------------------------------------------------------------------------------------
# the builders
def gate_stage(masks: AnyOrganMasks, to_sigma: ToSigma, *, tokens: TokenMap | None = None, strength: float = 1.0,
               token_strength: float = 1.0, organs: str | Iterable[str] = "right_lung, left_lung, heart",
               background: str = "free", margin_px: int = 0, blocks: str | Iterable[str] = "all",
               start_percent: float = 0.0, end_percent: float = 1.0, apply_to_uncond: bool = GATE_APPLY_TO_UNCOND,
               title: str = "", anatomy_isolation: str = "tokens", project: Callable | None = None) -> GateStage:
    """The anatomy gate: ``strength`` confines self-attention to organs (1 = hard), ``token_strength`` hides
    anatomy words of ``tokens`` from image tokens outside their organ. Neutral (``stage.neutral``) at 0 and 0.

    ``anatomy_isolation="prompt"`` (token strength 1): outside queries attend over the prompt encoded without their
    words instead (:class:`.gating.PromptIsolation`); it needs a token map that can re-encode its prompt (CXR Text
    Encode's) and the host's ``project`` (a layer's ``to_k``/``to_v``)."""
    check_choice("background", background, BACKGROUNDS)
    check_choice("anatomy_isolation", anatomy_isolation, ISOLATIONS)
    if anatomy_isolation == "prompt" and project is None:
        raise CXRInputError("anatomy_isolation 'prompt' is not supported by this host (it needs each layer's key and "
                            "value projections at sampling time; the ComfyUI gate node has them).",
                            input_name="anatomy_isolation", fix="Use anatomy_isolation 'tokens' here.")
    parts = unet_parts(blocks)
    _strength("strength", strength)
    _strength("token_strength", token_strength)
    check_number("margin_px", margin_px, 0, MARGIN_MAX)
    check_window(start_percent, end_percent)
    first = sample_masks(masks, 0)  # every set of a batch has the same organs
    try:
        names = tuple(parse_names(organs))
        first.select(names)  # every organ must be present
    except CXRInputError as err:
        raise _located(err, "organs") from None
    words: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
    if tokens is not None and token_strength > 0:
        for word, tied in tokens.anatomy.items():
            missing = [o for o in tied if o not in first]
            if missing:
                raise CXRInputError(
                    f"the anatomy word '{word}' is tied to {', '.join(missing)}, which the organ masks lack "
                    f"(present: {', '.join(masks.names)}).", input_name="tokens",
                    fix="Tie the word to a present organ where the anatomy words are given (CXR Text Encode, or "
                    "token_map's anatomy), e.g. 'lungs=right_lung+left_lung'.")
            words.append((tokens.indices(word), tied))
    isolation = None
    if anatomy_isolation == "prompt" and words:
        isolation = _prompt_isolation(tokens, words, token_strength, project)
    sigma_start, sigma_end = to_sigma(start_percent), to_sigma(end_percent)
    return GateStage(title=title, sigma_start=sigma_start, sigma_end=sigma_end, blocks=parts, masks=masks,
                     organs=names, self_leak=1.0 - strength, token_leak=1.0 - token_strength, background=background,
                     margin_px=margin_px, apply_to_uncond=apply_to_uncond,
                     cond_len=tokens.cond_len if tokens else 77, token_words=tuple(words), isolation=isolation)


def _prompt_isolation(tokens, words, token_strength: float, project: Callable | None) -> PromptIsolation:
    """The prompt encoded without each non-empty subset of the anatomy words (refusals first: encoding is the cost)."""
    encode = getattr(tokens, "encode_without", None)
    if encode is None:
        raise CXRInputError("anatomy_isolation 'prompt' re-encodes the prompt, and these tokens cannot (they do not "
                            "come from CXR Text Encode).", input_name="tokens",
                            fix="Connect the tokens output of CXR Text Encode, or use anatomy_isolation 'tokens'.")
    if token_strength != 1.0:
        raise CXRInputError(f"anatomy_isolation 'prompt' removes the anatomy words outright; token_strength "
                            f"{token_strength} asks for a partial mask.", input_name="token_strength",
                            fix="Use token_strength 1 with 'prompt', or anatomy_isolation 'tokens' for a partial mask.")
    if len(words) > ISOLATION_MAX_WORDS:
        raise CXRInputError(f"anatomy_isolation 'prompt' encodes the prompt once per subset of anatomy words; "
                            f"{len(words)} words would need {2 ** len(words) - 1} encodes.", input_name="tokens",
                            fix=f"Use at most {ISOLATION_MAX_WORDS} anatomy words with 'prompt', or 'tokens'.")
    if project is None:  # a host that cannot project a layer's keys and values (the diffusers builders refuse first)
        raise CXRInputError("anatomy_isolation 'prompt' needs the host to project the shortened prompts through each "
                            "layer; this host cannot.", input_name="anatomy_isolation",
                            fix="Use anatomy_isolation 'tokens' here, or the ComfyUI nodes.")
    return PromptIsolation.build([pos for pos, _ in words], tokens.cond_len, encode, project)


def boost_stage(tokens: TokenMap, target: AnyOrganMasks | None, to_sigma: ToSigma, *, factor: float = 3.0,
                words: str | Mapping[str, float] = "", outside_damping: float = 1.0,
                blocks: str | Iterable[str] = "all", start_percent: float = 0.0, end_percent: float = 0.4,
                title: str = "") -> BoostStage:
    """Pathology boosting: the words (:func:`word_factors`) weighted by their factor inside ``target``
    (:func:`target_region`) and by ``outside_damping`` outside. Neutral at factors 1 and damping 1, where a
    missing target is accepted (a boost switched off by its factor needs no region, as before the builders)."""
    parts = unet_parts(blocks)
    check_number("factor", factor, FACTOR_MIN, FACTOR_MAX)
    check_number("outside_damping", outside_damping, 0.0, 1.0)
    check_window(start_percent, end_percent)
    factors = word_factors(words, tokens, factor)
    try:
        positions = {w: tokens.indices(w) for w in factors}
    except CXRInputError as err:
        raise _located(err, "words") from None
    _disjoint(positions)
    if target is None and not (all(f == 1.0 for f in factors.values()) and outside_damping == 1.0):
        target_region(None)  # refuses: "no target region"
    sigma_start, sigma_end = to_sigma(start_percent), to_sigma(end_percent)
    return BoostStage(title, sigma_start, sigma_end, parts, target=target, positions=positions, factors=factors,
                      damping=outside_damping, cond_len=tokens.cond_len)


def _disjoint(positions: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse two boosted names for the same token ('effusion' and 'effusion#1'): one factor would silently win."""
    seen: dict[int, str] = {}
    for word, idx in positions.items():
        for i in idx:
            if i in seen:
                base = word.partition("#")[0].strip()
                raise CXRInputError(f"'{seen[i]}' and '{word}' name the same tokens.", input_name="words",
                                    fix=f"Name each token once: '{base}' (every occurrence) or its occurrences "
                                    f"'{base}#1', '{base}#2', ... each with its own factor.")
            seen[i] = word


def capture_stage(tokens: TokenMap, to_sigma: ToSigma, *, label: str = "run", grid_factor: int | str = 2,
                  target: AnyOrganMasks | None = None, start_percent: float = 0.0, end_percent: float = 1.0,
                  title: str = "") -> CaptureStage:
    """Attention capture: per-word maps at the grid ``latent ÷ grid_factor`` and, with a ``target``, the
    pathology words' share inside it, per step, into the run's record. Never changes the result."""
    factor = parse_grid_factor(grid_factor)
    check_window(start_percent, end_percent)
    if not tokens.positions:
        raise CXRInputError("the token map has no words.", input_name="tokens",
                            fix="List anatomy or pathology words with the prompt (CXR Text Encode, or token_map).")
    sigma_start, sigma_end = to_sigma(start_percent), to_sigma(end_percent)
    return CaptureStage(title, sigma_start, sigma_end, frozenset(BLOCK_CHOICES["all"]), label=label or "run",
                        positions=dict(tokens.positions), pathology=tuple(tokens.pathology), grid_factor=factor,
                        target=target, cond_len=tokens.cond_len)
