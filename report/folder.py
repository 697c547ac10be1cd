"""Reading a batch's output folder (read-only): the rows of ``results.csv`` with their ``row.json`` and files.

The layout is the runner's (``runner/results.py``): ``results.csv`` holds the manifest's columns, then the status
columns from ``key`` on (``status`` is done / failed / pending, ``error``), then ``metric_<name>`` columns;
``rows/<key>/`` holds a finished row's files and ``row.json`` (``row``, ``graph``, ``outputs``, ``files``).
``batch.json`` (written by runs that record provenance) lists each run's argv, workflow, manifest path, sweep.
Nothing here imports the runner: the report must work without its network dependencies.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS = "results.csv"
ROWS = "rows"
RECORD = "row.json"
PROVENANCE = "batch.json"
FIRST_STATUS_COLUMN = "key"  # the runner's status columns start here; manifest columns come before
METRIC_PREFIX = "metric_"
# The bootstrap's resampling unit, first non-empty of: the radiograph a row edits; the original row of a sweep's
# expanded row (``source_row``, every expanded row of one original row edits one radiograph); the row itself. The
# radiograph comes first: two manifest rows of one radiograph (two seeds, or two sweeps) are not independent either.
CLUSTER_COLUMNS = ("radiograph", "source_row")


class BatchFolderError(ValueError):
    """The folder is not a batch output (the message names what is missing and how a batch folder is made)."""


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class Row:
    """One manifest row as the batch left it."""

    key: str
    status: str
    error: str
    manifest: dict[str, str]
    metrics: dict[str, float]
    folder: Path | None
    cluster: str
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def graph(self) -> dict[str, Any]:
        return self.record.get("graph") or {}

    @property
    def files(self) -> list[str]:
        return list(self.record.get("files") or [])

    @property
    def name(self) -> str:
        return self.manifest.get("id") or self.key


@dataclass
class Batch:
    """A batch output folder: its rows in manifest order, its manifest columns, its provenance."""

    path: Path
    rows: list[Row]
    manifest_columns: list[str]
    metric_names: list[str]
    provenance: dict[str, Any] | None
    cluster_column: str

    @property
    def done(self) -> list[Row]:
        return [r for r in self.rows if r.status == "done" and r.folder is not None]

    @property
    def not_done(self) -> list[Row]:
        return [r for r in self.rows if not (r.status == "done" and r.folder is not None)]

    @property
    def runs(self) -> list[dict[str, Any]]:
        return list((self.provenance or {}).get("runs") or [])

    @cached_property
    def manifest_folders(self) -> list[Path]:
        """Folders of the manifests the runs read (relative radiograph paths are relative to them)."""
        return [Path(run["manifest"]).parent for run in self.runs if run.get("manifest")]

    def radiograph_path(self, row: Row) -> Path | None:
        """The row's radiograph file on this machine: the manifest's value, absolute or relative to a run's manifest."""
        value = row.manifest.get("radiograph", "")
        if not value:
            return None
        path = Path(value)
        candidates = [path] if path.is_absolute() else [folder / path for folder in self.manifest_folders]
        return next((c for c in candidates if c.is_file()), None)


def read_batch(path: Path) -> Batch:
    """Read ``path`` (never written). Raises :class:`BatchFolderError` when it is not a batch output folder."""
    path = Path(path)
    if not path.is_dir():
        raise BatchFolderError(f"{path} is not a folder: give the --out folder of a `python -m cxr_counterfactual "
                               "run ... --manifest ...` batch.")
    results = path / RESULTS
    if not results.is_file():
        raise BatchFolderError(f"{path} is not a batch output folder: it has no {RESULTS} (a batch run with "
                               f"--manifest ... --out {path.name} writes {RESULTS} and {ROWS}/).")
    with results.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        table = list(reader)
    missing = [c for c in (FIRST_STATUS_COLUMN, "status") if c not in columns]
    if missing:
        raise BatchFolderError(f"{results} is not a runner's results table: it lacks the column(s) "
                               f"{', '.join(missing)} (has {', '.join(columns[:8]) or 'no header'}).")
    manifest_columns = columns[:columns.index(FIRST_STATUS_COLUMN)]
    metric_columns = [c for c in columns if c.startswith(METRIC_PREFIX)]
    rows_dir = path / ROWS
    if any(r.get("status") == "done" for r in table) and not rows_dir.is_dir():
        raise BatchFolderError(f"{path} has {RESULTS} with finished rows but no {ROWS}/ folder holding them: "
                               "copy the whole output folder, not only its table.")
    cluster_column = next((c for c in CLUSTER_COLUMNS if c in manifest_columns), FIRST_STATUS_COLUMN)
    rows = []
    for line in table:
        key, status = line.get(FIRST_STATUS_COLUMN, ""), line.get("status", "")
        folder = rows_dir / key if key else None
        record: dict[str, Any] = {}
        error = line.get("error", "")
        if status == "done":
            try:
                record = json.loads((folder / RECORD).read_text(encoding="utf-8"))  # type: ignore[operator]
            except (OSError, json.JSONDecodeError, TypeError) as err:
                error, folder = f"marked done but its {ROWS}/{key}/{RECORD} is unreadable ({type(err).__name__})", None
        else:
            folder = None
        metrics = {c[len(METRIC_PREFIX):]: v for c in metric_columns if (v := _number(line.get(c, ""))) is not None}
        manifest = {c: line.get(c, "") for c in manifest_columns}
        cluster = next((f"{c}:{line[c]}" for c in CLUSTER_COLUMNS if line.get(c)), "")
        rows.append(Row(key=key or manifest.get("id", ""), status=status or "pending", error=error, manifest=manifest,
                        metrics=metrics, folder=folder, cluster=cluster or key, record=record))
    provenance = None
    if (path / PROVENANCE).is_file():
        try:
            provenance = json.loads((path / PROVENANCE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            logger.warning("%s is not valid JSON (%s); the report shows no provenance", path / PROVENANCE, err)
    return Batch(path=path, rows=rows, manifest_columns=manifest_columns,
                 metric_names=[c[len(METRIC_PREFIX):] for c in metric_columns], provenance=provenance,
                 cluster_column=cluster_column)


def metrics_json(row: Row) -> dict[str, Any] | None:
    """The row's CXR Save Metrics JSON (the file with an ``images`` list), or None."""
    if row.folder is None:
        return None
    for name in row.files:
        if name.endswith(".json") and name != RECORD:
            try:
                data = json.loads((row.folder / name).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and "images" in data:
                return data
    return None
