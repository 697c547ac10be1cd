"""Per-run state of the CXR stages (pure torch, no ``comfy``): the holder a model carries and the store
that nodes after the sampler read.

- :class:`RunState` is the one per-run holder under ``transformer_options["cxr_counterfactual"]``; the host
  adapter replaces it by a fresh copy at the start of every run (``reset``), so queued runs never share state.
- :class:`ResultStore` keeps what the last runs produced (:class:`.run_record.RunRecord`: trace, conflicts,
  captured maps, refinement energies) and is shared, not copied, when ComfyUI deep-copies a model's options: a
  node after the sampler finds the run that produced its LATENT by the latent's fingerprint (:func:`find_run`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import CXRInputError
from .run_record import Capture, CaptureStep, Conflict, RunRecord, TraceEntry
from .stages import Grid, Key

logger = logging.getLogger("cxr_counterfactual")


class ResultStore:
    """What runs produced, for nodes after the sampler. Model copies share it (deep copy returns self)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.runs: list[RunRecord] = []
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> ResultStore:
        return self

    def new_run(self) -> RunRecord:
        record = RunRecord()
        with self._lock:
            self.runs.append(record)
            del self.runs[: -self.keep]
        return record

    def latest(self) -> RunRecord | None:
        return self.runs[-1] if self.runs else None

    def for_latent(self, samples: torch.Tensor) -> RunRecord | None:
        """The newest run whose sampler returned exactly ``samples`` (so a preview never shows a stale run)."""
        key = latent_fingerprint(samples)
        return next((r for r in reversed(self.runs) if r.latent == key), None)


def find_run(store: ResultStore | None, samples: torch.Tensor, needs: Literal["capture", "refine"], *, source: str,
             node: str, input_name: str, problem: str, fix: str) -> RunRecord:
    """The run of ``store`` that produced the latent ``samples`` and recorded what a node ``needs`` (its captures,
    or its refinement steps): the one lookup of every node after the sampler.

    Args:
        store: the result store of the model or sampler the node was given (None: it records no run).
        source: what the store belongs to, for the message ("model", "sampler").
        node, input_name, problem, fix: the node's error, which the lookup completes with what is missing.

    Raises:
        CXRInputError: no run of ``store`` produced ``samples``, or that run recorded nothing of ``needs``.
    """
    record = store.for_latent(samples) if store is not None else None
    if store is None:
        why = f"the {source} records no CXR run"
    elif record is None:
        why = f"none of the {source}'s last {len(store.runs)} recorded runs returned this LATENT"
    elif needs == "capture" and not record.capture:
        why = "its run recorded no capture"
    elif needs == "refine" and record.refine is None:
        why = "its run did no refinement"
    else:
        return record
    raise CXRInputError(f"{problem} ({why}).", node=node, input_name=input_name, fix=fix)


def latent_fingerprint(samples: torch.Tensor) -> str:
    """A digest of a latent's values: identifies the run that produced it."""
    data = samples.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(data.numpy().tobytes() + str(tuple(data.shape)).encode()).hexdigest()


@dataclass
class CondCall:
    """What the host's model-call wrapper saw of the current call of the conditionings (ComfyUI's
    ``calc_cond_batch``): the full latent, each conditioning's area by its id, and which of the call's lists of
    conditionings (``cond_or_uncond`` numbers them) are the positive prompt's."""

    latent: Grid
    areas: dict[Hashable, tuple[int, int, int, int]] = field(default_factory=dict)
    positive: tuple[bool, ...] | None = None


class RunState:
    """The one per-run holder: options, the current run's record, the shared result store."""

    def __init__(self, store: ResultStore | None = None, trace: bool = False) -> None:
        self.store = store or ResultStore()
        self.trace_enabled = trace
        self.installed: dict[str, set[Key]] = {"attn1": set(), "attn2": set()}
        self.record = RunRecord()
        self.reached: set[tuple[str, Key]] = set()  # (kind, key) of our replaces that ran in this run
        self.positive: frozenset | None = None  # conditioning ids of the positive prompt in this run
        self.call: CondCall | None = None  # the current call of the conditionings (areas, positive lists)
        self.guider: object | None = None  # the host's sampler object of this run (its positive conditionings)
        self._reported: set[tuple] = set()

    def clone(self) -> RunState:
        new = RunState(self.store, self.trace_enabled)
        new.installed = {k: set(v) for k, v in self.installed.items()}
        return new

    def reset(self) -> RunState:
        self.record = self.store.new_run()
        self.reached = set()
        self._reported = set()
        self.call = None
        self.guider = None
        return self

    def reach(self, kind: str, key: Key) -> None:
        """Our replace at ``key`` ran (directly, or called by a pack that wraps it)."""
        self.reached.add((kind, key))

    def trace(self, kind: str, key: Key, sigma: float, gated: bool) -> None:
        if self.trace_enabled:
            self.record.trace.append(TraceEntry(kind, key, sigma, gated))

    def capture(self, label: str, grid: Grid, sigma: float, maps: dict[str, torch.Tensor],
                share: float | None) -> None:
        """Add one layer's per-word maps (``[h, w]``) and in-target share at ``sigma`` (averaged later)."""
        run = self.record.capture.setdefault(label, Capture(grid))
        step = run.steps.setdefault(sigma, CaptureStep())
        for word, m in maps.items():
            step.maps[word] = step.maps[word] + m if word in step.maps else m
        step.layers += 1
        if share is not None:
            step.share_sum += share
            step.share_layers += 1

    def report(self, what: str, key: Key, message: str) -> None:
        if (what, key) in self._reported:
            return
        self._reported.add((what, key))
        self.record.conflicts.append(Conflict(what, key, message))
        logger.warning("CXR Counterfactual: %s", message)
