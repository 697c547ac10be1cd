"""What one sampling run records, as types (pure torch, no host import).

A run's :class:`RunRecord` is written by the hosts while the run samples (captures, trace, conflicts; the
refinement loop's steps) and read by the nodes after the sampler (previews, evaluation), which find it by the
fingerprint of the latent the run returned (:func:`.run_state.find_run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .stages import Grid, Key


class TraceEntry(NamedTuple):
    """One attention call our replace saw: ``gated`` = a stage acted there (else stock attention ran)."""

    kind: str
    key: Key
    sigma: float
    gated: bool


@dataclass(frozen=True)
class Conflict:
    """Another pack's patch that kept a stage from acting at ``key`` (reported once per kind and key)."""

    kind: str
    key: Key
    message: str


@dataclass
class CaptureStep:
    """The per-word maps (``[h, w]``, summed over ``layers``) and in-target shares captured at one sigma."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: int = 0
    share_sum: float = 0.0
    share_layers: int = 0


@dataclass
class Capture:
    """What one capture stage recorded in a run: its grid, and per sigma what the layers saw."""

    grid: Grid
    steps: dict[float, CaptureStep] = field(default_factory=dict)

    def mean_maps(self) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Per-word maps averaged over layers and captured steps, and the in-target share per step (early, high
        sigma, first)."""
        steps = [self.steps[s] for s in sorted(self.steps, reverse=True)]
        words = list(steps[0].maps)
        maps = {}
        for w in words:
            total = steps[0].maps[w] / steps[0].layers
            for st in steps[1:]:
                total = total + st.maps[w] / st.layers
            maps[w] = total / len(steps)
        shares = [st.share_sum / st.share_layers for st in steps if st.share_layers]
        return maps, shares


@dataclass(frozen=True)
class RefineStep:
    """One sampling step's refinement: the energy measured before each gradient iteration and after the last
    (at 0 iterations, of the unrefined latent), and the latent before and after (on the CPU)."""

    step: int
    sigma: float
    energies: tuple[float, ...]
    iterations: int
    latent_before: torch.Tensor
    latent_after: torch.Tensor

    @property
    def before(self) -> float:
        return self.energies[0]

    @property
    def after(self) -> float:
        return self.energies[-1]


@dataclass
class RunRecord:
    """What one run produced, for nodes after the sampler.

    Attributes:
        trace: attention calls seen (only when the holder's ``trace_enabled``).
        conflicts: patches of other packs that kept a stage from acting.
        capture: capture label → what it recorded.
        latent: fingerprint of the latent the run returned (None while it runs).
        refine: the refinement sampler's steps (None: no refinement sampler ran).
        weights_copied_mb: size of the weight clones the refinement's gradient pass made.
        attention: which attention kernel each kind of gated call ran on (``"hard gating"`` / ``"soft gating"`` →
            the host's backend name, e.g. ComfyUI's ``attention_sub_quad``).
    """

    trace: list[TraceEntry] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    capture: dict[str, Capture] = field(default_factory=dict)
    latent: str | None = None
    refine: list[RefineStep] | None = None
    weights_copied_mb: float = 0.0
    attention: dict[str, str] = field(default_factory=dict)

    def audit(self) -> dict[str, object]:
        """What the export's audit trail keeps of this run: the refinement's energy trace (per sampling step: sigma,
        iterations, the energy before each iteration and after the last), the attention kernels, conflicts."""
        out: dict[str, object] = {"attention_kernels": dict(self.attention),
                                  "conflicts": [f"{c.kind} {c.key}: {c.message}" for c in self.conflicts]}
        if self.refine is not None:
            out["refinement_energy"] = [{"step": s.step, "sigma": s.sigma, "iterations": s.iterations,
                                         "energies": list(s.energies)} for s in self.refine]
        return out
