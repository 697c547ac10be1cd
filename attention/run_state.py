"""Per-run state of the CXR stages (pure torch, no ``comfy``): the holder a model carries and the store
that nodes after the sampler read.

- :class:`RunState` is the one per-run holder under ``transformer_options["cxr_counterfactual"]``; the host
  adapter replaces it by a fresh copy at the start of every run (``reset``), so queued runs never share state.
- :class:`ResultStore` keeps what the last runs produced (trace, conflicts, captured maps, refinement energies)
  and is shared, not copied, when ComfyUI deep-copies a model's options: a node after the sampler finds the
  run that produced its LATENT by the latent's fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import threading

import torch

logger = logging.getLogger("cxr_counterfactual")

Key = tuple[str, int, int]


def empty_record() -> dict:
    """What one run records, before it runs."""
    return {"trace": [], "conflicts": [], "capture": {}, "latent": None}


class ResultStore:
    """What runs produced, for nodes after the sampler. Model copies share it (deep copy returns self)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.runs: list[dict] = []
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> ResultStore:
        return self

    def new_run(self) -> dict:
        record = empty_record()
        with self._lock:
            self.runs.append(record)
            del self.runs[: -self.keep]
        return record

    def latest(self) -> dict | None:
        return self.runs[-1] if self.runs else None

    def for_latent(self, samples: torch.Tensor) -> dict | None:
        """The newest run whose sampler returned exactly ``samples`` (so a preview never shows a stale run)."""
        key = latent_fingerprint(samples)
        return next((r for r in reversed(self.runs) if r.get("latent") == key), None)


def latent_fingerprint(samples: torch.Tensor) -> str:
    """A digest of a latent's values: identifies the run that produced it."""
    data = samples.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(data.numpy().tobytes() + str(tuple(data.shape)).encode()).hexdigest()


class RunState:
    """The one per-run holder: options, the current run's record, the shared result store."""

    def __init__(self, store: ResultStore | None = None, trace: bool = False) -> None:
        self.store = store or ResultStore()
        self.trace_enabled = trace
        self.installed: dict[str, set[Key]] = {"attn1": set(), "attn2": set()}
        self.record: dict = empty_record()
        self.reached: set[tuple[str, Key]] = set()  # (kind, key) of our replaces that ran in this run
        self.positive: frozenset | None = None  # conditioning ids of the positive prompt in this run
        self._reported: set[tuple] = set()

    def clone(self) -> RunState:
        new = RunState(self.store, self.trace_enabled)
        new.installed = {k: set(v) for k, v in self.installed.items()}
        return new

    def reset(self) -> RunState:
        self.record = self.store.new_run()
        self.reached = set()
        self._reported = set()
        return self

    def to(self, device: torch.device) -> RunState:
        return self  # nothing device-bound: region tensors live in the stages' caches, per device

    def reach(self, kind: str, key: Key) -> None:
        """Our replace at ``key`` ran (directly, or called by a pack that wraps it)."""
        self.reached.add((kind, key))

    def trace(self, kind: str, key: Key, sigma: float, gated: bool) -> None:
        if self.trace_enabled:
            self.record["trace"].append((kind, key, sigma, gated))

    def capture(self, label: str, grid: tuple[int, int], sigma: float, maps: dict[str, torch.Tensor],
                share: float | None) -> None:
        """Add one layer's per-word maps (``[h, w]``) and in-target share at ``sigma`` (averaged later)."""
        run = self.record["capture"].setdefault(label, {"grid": grid, "steps": {}})
        step = run["steps"].setdefault(sigma, {"maps": {}, "layers": 0, "share_sum": 0.0, "share_layers": 0})
        for word, m in maps.items():
            step["maps"][word] = step["maps"].get(word, 0) + m
        step["layers"] += 1
        if share is not None:
            step["share_sum"] += share
            step["share_layers"] += 1

    def report(self, what: str, key: Key, message: str) -> None:
        if (what, key) in self._reported:
            return
        self._reported.add((what, key))
        self.record["conflicts"].append({"kind": what, "key": key, "message": message})
        logger.warning("CXR Counterfactual: %s", message)
