"""What the report shows, computed from a :class:`~.folder.Batch` (numbers only; :mod:`.page` renders them)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CXRInputError
from ..imaging.realism import Realism, frechet_distance
from .folder import Batch, Row, metrics_json
from .stages import STAGES, configuration, edit_mask_source, mask_source
from .stats import Estimate, cluster_bootstrap

logger = logging.getLogger(__name__)

# Metrics shown first (in this order) where present; any other numeric metric follows, sorted.
LEADING = ("classifier_target_source", "classifier_target_edit", "classifier_target_delta",
           "classifier_off_target_max_abs_delta", "keep_ssim", "keep_psnr_db", "keep_mad", "edit_mad",
           "change_in_edit_share", "edit_fraction")
DOSE_METRICS = ("classifier_target_edit", "keep_ssim", "keep_psnr_db")  # plus every organ_dice_<organ>
DICE = "organ_dice_"
ALL_ROWS = "all finished rows"
# Thumbnail rankings: metric, worst first = lowest (True) or highest (False).
RANKINGS = (("keep_ssim", True), ("classifier_off_target_max_abs_delta", False), ("change_in_edit_share", True),
            ("keep_psnr_db", True))
NO_FEATURES = ("not available (no classifier features in this batch: run with --classifier ... so each row's "
               "metrics JSON holds the classifier's features of source and edit)")
ATLAS_LIMITS = ("The atlas is a registration fit of a statistical outline (CheXmask mean shape and its modes), "
                "not a segmentation of the edited pixels: it has no appearance model, so an edit that changes what "
                "is inside a lung can leave the fitted outline (and Dice) unchanged, and a change of the lung border "
                "moves it only as far as the shape prior allows. Read its Dice as 'the outline the atlas fits did not "
                "move', not as a verified anatomy.")
SEGMENTATION_LIMITS = ("The segmentation node (TorchXRayVision PSPNet) segments the edited pixels themselves; a "
                       "finding that hides an organ border (e.g. an effusion over the diaphragm) can lower Dice "
                       "because the finding is there, not because the anatomy moved.")


def config_order(name: str) -> tuple[int, list[int]]:
    parts = [] if name == "stock" else name.split(" + ")
    return len(parts), [STAGES.index(p) if p in STAGES else len(STAGES) for p in parts]


NOT_METRICS = ("image",)  # the pair's index in a CXR Save Metrics JSON: a number, not a measurement


def metric_order(names: Sequence[str]) -> list[str]:
    return [m for m in LEADING if m in names] + sorted(m for m in names if m not in LEADING and m not in NOT_METRICS)


def per_pathology(metric: str) -> bool:
    """A classifier probability of one named pathology (``classifier_<name>_source/_edit``): shown apart."""
    return metric.startswith("classifier_") and metric not in LEADING


def estimate(rows: Sequence[Row], metric: str) -> Estimate | None:
    have = [r for r in rows if metric in r.metrics]
    return cluster_bootstrap([r.metrics[metric] for r in have], [r.cluster for r in have])


@dataclass
class Ablation:
    configurations: list[str]
    metrics: list[str]
    cells: dict[tuple[str, str], Estimate | None]
    counts: dict[str, tuple[int, int]]  # configuration -> (rows, radiographs)


def ablation(batch: Batch, configs: dict[str, str]) -> Ablation:
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in batch.done:
        groups[configs[row.key]].append(row)
    names = sorted(groups, key=config_order)
    metrics = metric_order(sorted({m for r in batch.done for m in r.metrics}))
    if len(names) > 1:
        names.append(ALL_ROWS)
        groups[ALL_ROWS] = batch.done
    cells = {(c, m): estimate(groups[c], m) for c in names for m in metrics}
    counts = {c: (len(groups[c]), len({r.cluster for r in groups[c]})) for c in names}
    return Ablation(names, metrics, cells, counts)


@dataclass
class DoseResponse:
    """One swept setting: x values, and per metric a line per combination of the other swept settings."""

    setting: str
    numeric: bool
    panels: dict[str, dict[str, list[tuple[float, Estimate]]]]
    labels: list[str]  # x tick labels when not numeric


def swept_settings(batch: Batch) -> list[str]:
    """``Title.input`` columns with ≥ 2 values among finished rows, and the sweep axes batch.json records."""
    recorded = [k for run in batch.runs for k in (run.get("sweep") or {})]
    columns = [c for c in batch.manifest_columns if "." in c]
    varied = [c for c in columns if len({r.manifest.get(c, "") for r in batch.done}) > 1]
    return list(dict.fromkeys([c for c in recorded if c in columns] + varied))


def _x(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def dose_response(batch: Batch, setting: str, others: Sequence[str]) -> DoseResponse:
    """Per metric, a line per combination of the ``others`` (the other swept settings held fixed) along ``setting``.
    A line needs two or more x values: a setting that only ever changes together with another one (e.g. two
    switches flipped at once) has no line, as its effect cannot be told apart from the other's."""
    rows = [r for r in batch.done if r.manifest.get(setting, "") != ""]
    values = sorted({r.manifest[setting] for r in rows}, key=lambda v: (_x(v) is None, _x(v) or 0.0, v))
    numeric = all(_x(v) is not None for v in values)
    position = {v: (_x(v) if numeric else float(i)) for i, v in enumerate(values)}
    metrics = [m for m in DOSE_METRICS if any(m in r.metrics for r in rows)]
    metrics += sorted({m for r in rows for m in r.metrics if m.startswith(DICE)})
    groups: dict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.manifest.get(o, "") for o in others)].append(row)
    groups = {k: v for k, v in groups.items() if len({r.manifest[setting] for r in v}) > 1}
    # Name a line by the other settings that differ between the lines (the ones held equal say nothing).
    differ = [i for i, _ in enumerate(others) if len({k[i] for k in groups}) > 1]
    panels: dict[str, dict[str, list[tuple[float, Estimate]]]] = {}
    for metric in metrics:
        series = {}
        for key, members in sorted(groups.items()):
            points = []
            for v in values:
                e = estimate([r for r in members if r.manifest[setting] == v], metric)
                if e is not None:
                    points.append((float(position[v]), e))  # type: ignore[arg-type]
            if len(points) > 1:
                series[", ".join(f"{others[i]}={key[i]}" for i in differ)] = points
        if series:
            panels[metric] = series
    return DoseResponse(setting, numeric, panels, values)


@dataclass
class RealismSection:
    available: bool
    note: str
    classifier: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Realism] = field(default_factory=dict)  # "all configurations" / per configuration
    skipped: dict[str, str] = field(default_factory=dict)


def _features(row: Row) -> tuple[list[float], list[float], dict[str, Any]] | None:
    data = metrics_json(row)
    block = (data or {}).get("classifier")
    if not isinstance(block, dict):
        return None
    pairs = block.get("features") or []
    if not pairs or not isinstance(pairs[0], dict) or "source" not in pairs[0] or "edit" not in pairs[0]:
        return None
    # The row's first image pair, as the runner's per-row metrics are (one pair per row in a batch).
    return pairs[0]["source"], pairs[0]["edit"], {k: v for k, v in block.items() if k != "features"}


def realism(batch: Batch, configs: dict[str, str]) -> RealismSection:
    found = {r.key: f for r in batch.done if (f := _features(r)) is not None}
    if not found:
        return RealismSection(False, NO_FEATURES)
    missing = len(batch.done) - len(found)
    note = "" if not missing else f"{missing} finished row(s) have no classifier features and are left out."
    sources: dict[str, list[float]] = {}
    for row in batch.done:  # the reference set: each radiograph once (a sweep repeats its source)
        if row.key in found:
            sources.setdefault(row.cluster, found[row.key][0])
    reference = torch.tensor(list(sources.values()), dtype=torch.float64)
    section = RealismSection(True, note, classifier=next(iter(found.values()))[2])
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for row in batch.done:
        if row.key in found:
            groups["all configurations"].append(found[row.key][1])
            groups[configs[row.key]].append(found[row.key][1])
    if len(groups) == 2:  # one configuration: the per-configuration line would repeat the overall one
        groups = {k: v for k, v in groups.items() if k == "all configurations"}
    for name in sorted(groups, key=lambda n: (n != "all configurations", config_order(n))):
        try:
            section.results[name] = frechet_distance(reference, torch.tensor(groups[name], dtype=torch.float64))
        except CXRInputError as err:
            section.skipped[name] = str(err)
    return section


@dataclass
class Anatomy:
    organs: list[str]
    configurations: list[str]
    cells: dict[tuple[str, str], Estimate | None]
    mask_sources: dict[str, int]  # edit-mask source description -> rows
    limits: list[str]
    source_mask_sources: dict[str, int] = field(default_factory=dict)  # the source's masks, likewise
    mixed_rows: int = 0  # rows with Dice whose source and edit masks come from different methods


def anatomy(batch: Batch, configs: dict[str, str], names: list[str]) -> Anatomy:
    organs = sorted({m for r in batch.done for m in r.metrics if m.startswith(DICE)})
    sources: dict[str, int] = defaultdict(int)
    source_sides: dict[str, int] = defaultdict(int)
    mixed = 0
    for row in batch.done:
        edit_side, source_side = edit_mask_source(row.graph), mask_source(row.graph, "organ_masks")
        sources[edit_side] += 1
        source_sides[source_side] += 1
        mixed += any(m.startswith(DICE) for m in row.metrics) and edit_side != source_side
    limits = [text for prefix, text in (("weight-free atlas", ATLAS_LIMITS), ("segmentation", SEGMENTATION_LIMITS))
              if any(s.startswith(prefix) for s in sources)]
    cells = {(organ, c): estimate([r for r in batch.done if c in (ALL_ROWS, configs[r.key])], organ)
             for organ in organs for c in names}
    return Anatomy(organs, list(names), cells, dict(sources), limits, dict(source_sides), mixed)


def rankings(batch: Batch, top: int) -> list[tuple[str, bool, list[Row]]]:
    """Per ranking metric present: the ``top`` worst finished rows, worst first."""
    out = []
    for metric, lowest_first in RANKINGS:
        rows = [r for r in batch.done if metric in r.metrics]
        if rows:
            rows.sort(key=lambda r: r.metrics[metric], reverse=not lowest_first)
            out.append((metric, lowest_first, rows[:top]))
    return out


def configurations(batch: Batch) -> dict[str, str]:
    return {r.key: configuration(r.graph) for r in batch.done}
