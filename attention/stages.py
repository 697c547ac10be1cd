"""The regulation stages a node adds to a model: immutable settings plus per-grid caches.

Every stage follows the :class:`Stage` protocol: it states which attention kinds it acts on, its sigma window,
the UNet parts it covers and when it is neutral, and it answers the per-call hooks that :mod:`.layer_call` (the
one row rule both hosts run) calls. Hosts never ask which type a stage is, so a new stage type is a subclass
here, a builder in :mod:`.stage_builders` and one node; the hosts stay as they are.

Stages are shared, not copied, when a host deep-copies model options: their settings never change and
their caches derive from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import CXRInputError
from .boosting import pathology_boost_bias
from .field import Field, field_masks
from .gating import PromptIsolation, anatomy_token_bias, isolation_groups
from .mask_batch import AnyOrganMasks, check_mask_count, mask_count
from .regions import RegionCache, coverage, partition
from .tokens import token_columns

logger = logging.getLogger("cxr_counterfactual")
Key = tuple[str, int, int]
Grid = tuple[int, int]


@dataclass(eq=False)
class Stage:
    """The stage protocol: what a stage needs from a host, and the hooks the per-call rule calls.

    What it needs (read by the hosts when they install it and at every attention call):

    - ``kinds``: the attention kinds it acts on, ``"attn1"`` (self-attention) and/or ``"attn2"``
      (cross-attention); a host patches those layers of every transformer block the stage ``covers``;
    - its window: active while ``sigma_end ≤ σ ≤ sigma_start`` (:meth:`active`), and the UNet parts
      (``blocks``: input, middle, output) it covers (:meth:`covers`);
    - ``neutral``: the settings cannot change any attention, so hosts never select it.

    Hooks, called by :mod:`.layer_call` for the active stages of one layer call, in install order (the base
    answers "nothing"; a stage overrides those it acts through):

    - :meth:`self_gate`: the gate that confines this self-attention (the first one wins), or None;
    - :meth:`cross_bias`: an additive ``[N, T]`` cross-attention bias, or None (the active stages' biases add up);
    - :meth:`capture_at`: the capture that records this cross-attention grid, or None (it only observes).

    The region hooks take the rows' :class:`.field.Field` (the full latent, the area of their conditioning, their
    image of the batch) and cache per field; :attr:`mask_count` and :meth:`check_batch` tell a host whether the
    stage holds one mask set per image.

    ``title`` names the node (or builder) in errors raised while sampling.
    """

    #: The attention kinds every stage of this type acts on (a stage whose kinds depend on its settings
    #: overrides :attr:`kinds`).
    KINDS: ClassVar[tuple[str, ...]] = ()

    title: str
    sigma_start: float
    sigma_end: float
    blocks: frozenset[str]
    cache: RegionCache = field(default_factory=RegionCache, kw_only=True)

    def __deepcopy__(self, memo: dict) -> Stage:
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """The attention kinds this stage acts on (``"attn1"``, ``"attn2"``): the layers a host patches."""
        return self.KINDS

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def covers(self, key: Key) -> bool:
        return key[0] in self.blocks

    @property
    def neutral(self) -> bool:
        """True when the stage cannot change any attention (strength 0, factor 1, ...). Hosts then never
        select it, so a neutral stage runs the layer's original code path: "neutral = stock" holds by
        construction, not because two kernels happen to round alike."""
        return False

    def located(self, err: CXRInputError, input_name: str) -> CXRInputError:
        return err.located(self.title, input_name, "Use the organ masks of 'Fit Radiograph to Model' for this latent.")

    @property
    def mask_count(self) -> int:
        """Images with their own mask set in this stage (1: one set every image shares)."""
        return 1

    def check_batch(self, images: int) -> None:
        """Refuse a batch of ``images`` images that this stage's per-image masks do not match."""

    # ---- hooks of the per-call rule (:mod:`.layer_call`) ----
    def self_gate(self) -> GateStage | None:
        """The gate confining self-attention at this call (None: this stage leaves self-attention)."""
        return None

    def cross_bias(self, h: int, w: int, field: Field, context_len: int, device) -> torch.Tensor | None:
        """The additive ``[N, T]`` bias on this cross-attention's scores for rows of ``field`` (None: no bias)."""
        return None

    def capture_at(self, h: int, w: int, field: Field) -> CaptureStage | None:
        """The capture recording this ``h×w`` cross-attention grid (None: this stage records nothing here)."""
        return None


@dataclass(eq=False)
class GateStage(Stage):
    """Anatomy gating. ``token_words`` holds (positions, organs) per anatomy word."""

    masks: AnyOrganMasks = None  # type: ignore[assignment]
    organs: tuple[str, ...] = ()
    self_leak: float = 1.0
    token_leak: float = 1.0
    background: str = "free"
    margin_px: int = 0
    apply_to_uncond: bool = False
    cond_len: int = 77
    token_words: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...] = ()
    #: anatomy_isolation "prompt": outside queries attend over the prompt encoded without their words (None: "tokens")
    isolation: PromptIsolation | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        # self-attention when it confines, cross-attention when anatomy words are hidden (cross_bias's own rule)
        return tuple(k for k, on in (("attn1", self.self_leak < 1.0),
                                     ("attn2", bool(self.token_words) and self.token_leak < 1.0)) if on)

    @property
    def neutral(self) -> bool:
        return self.self_leak >= 1.0 and (not self.token_words or self.token_leak >= 1.0)

    def self_gate(self) -> GateStage | None:
        return self if self.self_leak < 1.0 else None

    @property
    def mask_count(self) -> int:
        return mask_count(self.masks)

    def check_batch(self, images: int) -> None:
        check_mask_count(self.masks, images, node=self.title, input_name="organ_masks")

    def partition(self, h: int, w: int, field: Field, device):
        """The region partition of rows of ``field`` at this ``h×w`` grid (cached per field)."""
        field = field.for_masks(self.masks)

        def build():
            try:
                part = partition(field_masks(self.masks, field), self.organs, h, w, margin_px=self.margin_px,
                                 latent=field.size, fit=field.fit)
            except CXRInputError as err:
                raise self.located(err, "organ_masks") from None
            if part.missing():
                logger.info("%s: %s cover no token at the %dx%d grid (their cells go to neighbours)",
                            self.title, ", ".join(part.missing()), h, w)
            return part.to(device)
        return self.cache.get(("part", h, w, field, str(device)), build)

    def word_cover(self, h: int, w: int, field: Field) -> torch.Tensor:
        """``[words, N]`` bool: the tokens of rows of ``field`` inside each anatomy word's organs (cached per field)."""
        field = field.for_masks(self.masks)

        def build():
            masks = field_masks(self.masks, field)
            try:
                return torch.stack([coverage(masks, organs, h, w, margin_px=self.margin_px, latent=field.size,
                                             fit=field.fit)
                                    for _, organs in self.token_words])
            except CXRInputError as err:
                raise self.located(err, "organ_masks") from None
        return self.cache.get(("cover", h, w, field), build)

    def cross_bias(self, h: int, w: int, field: Field, context_len: int, device) -> torch.Tensor | None:
        if not self.token_words or self.token_leak == 1.0:
            return None

        cover = self.word_cover(h, w, field)  # (outside the build below: the cache's lock is not re-entrant)

        def build():
            positions = [pos for pos, _ in self.token_words]
            return anatomy_token_bias(cover, positions, self.cond_len, context_len, self.token_leak).to(device)
        return self.cache.get(("tok", h, w, field.for_masks(self.masks), context_len, str(device)), build)

    def isolation_groups(self, h: int, w: int, field: Field, device) -> list[tuple[frozenset[int], torch.Tensor]]:
        """Prompt isolation at this grid: (the words a query group is outside of, its query indices), per group."""
        cover = self.word_cover(h, w, field)

        def build():
            return [(s, rows.to(device)) for s, rows in isolation_groups(cover)]
        return self.cache.get(("iso", h, w, field.for_masks(self.masks), str(device)), build)


def _target_tokens(stage: Stage, target: AnyOrganMasks, h: int, w: int, field: Field) -> torch.Tensor:
    """``[N]`` bool: tokens of rows of ``field`` at least half inside the stage's one-region target (that image's
    target, for a target per image)."""
    try:
        region = field_masks(target, field)
        inside = coverage(region, region.names, h, w, latent=field.size, fit=field.fit)
    except CXRInputError as err:
        raise stage.located(err, "target") from None
    return inside


class _PerImageTarget:
    """Boost and capture: a one-region ``target`` (one per image, or one every image shares)."""

    TARGET_INPUT: ClassVar[str] = "organ_masks"
    target: AnyOrganMasks | None
    title: str

    @property
    def mask_count(self) -> int:
        return 1 if self.target is None else mask_count(self.target)

    def check_batch(self, images: int) -> None:
        if self.target is not None:
            check_mask_count(self.target, images, node=self.title, input_name=self.TARGET_INPUT)


@dataclass(eq=False)
class BoostStage(_PerImageTarget, Stage):
    """Pathology boosting: ``positions`` word → indices, ``factors`` word → f, ``damping`` outside."""

    KINDS = ("attn2",)
    TARGET_INPUT = "organ_masks / target_mask"

    target: AnyOrganMasks | None = None  # None only for a neutral boost (factors 1, damping 1): it never runs
    positions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    damping: float = 1.0
    cond_len: int = 77

    @property
    def neutral(self) -> bool:
        return self.damping == 1.0 and all(f == 1.0 for f in self.factors.values())

    def cross_bias(self, h: int, w: int, field: Field, context_len: int, device) -> torch.Tensor | None:
        field = field.for_masks(self.target)

        def build():
            if self.target is None:
                raise ValueError(f"{self.title}: a boost with no target can only be neutral")
            inside = _target_tokens(self, self.target, h, w, field)
            if not inside.any():
                logger.info("%s: the target covers no token at the %dx%d grid: no boost there", self.title, h, w)
                if self.damping == 1.0:  # nothing inside to boost, nothing outside to damp: stock at this grid
                    return (None,)
            return (pathology_boost_bias(inside, self.positions, self.factors, self.cond_len, context_len,
                                         self.damping).to(device),)
        # cached in a 1-tuple so that "no bias at this grid" is cached too
        return self.cache.get(("boost", h, w, field, context_len, str(device)), build)[0]


@dataclass(eq=False)
class CaptureStage(_PerImageTarget, Stage):
    """Records per-word cross-attention maps at one grid (``latent // grid_factor``) and, with a target,
    the pathology words' attention share inside it, per step."""

    KINDS = ("attn2",)

    label: str = "capture"
    positions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pathology: tuple[str, ...] = ()
    grid_factor: int = 2
    target: AnyOrganMasks | None = None
    cond_len: int = 77

    def wants(self, h: int, w: int, latent: Grid) -> bool:
        return (-(-latent[0] // self.grid_factor), -(-latent[1] // self.grid_factor)) == (h, w)

    def capture_at(self, h: int, w: int, field: Field) -> CaptureStage | None:
        # Maps are recorded on the whole latent's grid: rows of an area-conditioned prompt see a crop, whose maps
        # would not add up with them, so they are not recorded.
        return self if field.area is None and self.wants(h, w, field.latent) else None

    def target_tokens(self, h: int, w: int, field: Field, device) -> torch.Tensor | None:
        if self.target is None:
            return None
        field = field.for_masks(self.target)

        def build():
            if self.target is None:
                raise ValueError(f"{self.title}: a boost with no target can only be neutral")
            inside = _target_tokens(self, self.target, h, w, field)
            if not inside.any():
                raise CXRInputError(
                    f"the target covers no token of the captured {h}×{w} grid.", node=self.title,
                    input_name="target_organs", fix="Use a larger target, or a smaller grid_factor (finer grid).",
                )
            return inside.to(device)
        return self.cache.get(("target", h, w, field, str(device)), build)

    def columns(self, context_len: int) -> dict[str, torch.Tensor]:
        """Word → its key columns (repeated every ``cond_len`` up to ``context_len``)."""
        return {w: token_columns(idx, self.cond_len, context_len) for w, idx in self.positions.items()}
