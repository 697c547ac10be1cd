"""The output folder: one folder per finished row, committed atomically, and a results CSV.

Layout of ``--out``::

    rows/<id>-<fingerprint>/   a finished row: its output files and row.json (inputs, graph, metrics)
    .partial/                  rows being written; a killed run leaves debris here, cleared at the next start
    results.csv                one line per manifest row: its values, status, folder, files, provenance hash, metrics

A row's files are written into ``.partial/`` and the folder is renamed into ``rows/`` only when all of it
is on disk (a rename within one file system is atomic), so ``rows/`` never holds half a row and a good row
is never overwritten. ``rows/`` is the record of what is finished; ``results.csv`` is a view of it, rebuilt at
every start, every few seconds while rows finish, and at the end (to a temporary file, then renamed), so a
batch of many rows does not rewrite it once per row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .manifest import RowJob
from .worker import RowOutcome

logger = logging.getLogger(__name__)

RECORD = "row.json"
CSV_EVERY_S = 5.0
STATUS_COLUMNS = ("key", "status", "attempts", "server", "output_dir", "files", "elapsed_s", "batch_size",
                  "batch_index", "batch_seed", "provenance_sha256", "error")


def commit(parent: Path, name: str, files: Mapping[str, bytes], record: Mapping[str, Any]) -> Path:
    """Write ``files`` and ``row.json`` into a new folder ``parent/name``, atomically.

    Raises:
        FileExistsError: ``parent/name`` exists (it is left as it was).
    """
    target = parent / name
    if target.exists():
        raise FileExistsError(f"{target} exists; refusing to overwrite it")
    tmp = parent.parent / ".partial" / f"{name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for file_name, data in files.items():
            (tmp / file_name).write_bytes(data)
        (tmp / RECORD).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, target)  # fails on a non-empty target: a good row is never replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def unique_name(parent: Path, stem: str) -> str:
    """``stem``, or ``stem-1``, ``stem-2``...: a name not yet used in ``parent``."""
    name, i = stem, 1
    while (parent / name).exists():
        name, i = f"{stem}-{i}", i + 1
    return name


def record_of(job: RowJob, outcome: RowOutcome, attempts: int) -> dict[str, Any]:
    """row.json: everything needed to know what produced the files, and to reproduce them."""
    return {"key": job.key, "index": job.index, "row": job.row, "server": outcome.server,
            "prompt_id": outcome.prompt_id, "elapsed_s": round(outcome.elapsed_s, 3), "attempts": attempts,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": sorted(outcome.files),
            "metrics": outcome.metrics, "outputs": outcome.outputs, "graph": job.graph,
            # The row alone is ``graph``; run in a batch, image ``batch.index`` of ``batch.graph`` (noise index).
            "batch": outcome.batch,
            # The export sidecars' provenance hashes: equal for rows made the same way (docs/audit.md).
            "provenance": list(outcome.provenance)}


def _slim(record: Mapping[str, Any]) -> dict[str, Any]:
    """What results.csv shows of a row.json (a batch of many rows keeps only this in memory)."""
    slim = {k: record.get(k) for k in ("attempts", "server", "files", "elapsed_s", "metrics", "provenance")}
    batch = record.get("batch") or {}
    slim["batch"] = {k: batch.get(k) for k in ("size", "index", "seeds")}
    return slim


class ResultsBook:
    """Which rows are done, failed or pending, kept on disk as ``rows/`` and ``results.csv``. Thread-safe.

    Args:
        out: The output folder.
        rows: The manifest's rows, in order.
        keys: Each row's folder name (:func:`~.manifest.row_key`), in the same order.
    """

    def __init__(self, out: Path, rows: Sequence[Mapping[str, str]], keys: Sequence[str]):
        self.out, self.rows, self.keys = out, list(rows), list(keys)
        self.rows_dir = out / "rows"
        self.done: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._written = 0.0
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / ".partial", ignore_errors=True)  # debris of a killed run: never a finished row
        for key in self.keys:
            record = self.rows_dir / key / RECORD
            if record.is_file():
                self.done[key] = _slim(json.loads(record.read_text(encoding="utf-8")))
        self._write_csv()

    def is_done(self, key: str) -> bool:
        return key in self.done

    def add_success(self, job: RowJob, outcome: RowOutcome) -> Path:
        """Commit a finished row and rewrite the results CSV."""
        with self._lock:
            attempts = self.attempts.get(job.key, 0) + 1
            self.attempts[job.key] = attempts
            record = record_of(job, outcome, attempts)
            try:
                folder = commit(self.rows_dir, job.key, outcome.files, record)
            except FileExistsError:  # finished meanwhile by another run on the same folder: keep that one
                logger.warning("row %s already has a result in %s; kept it", job.key, self.rows_dir / job.key)
                folder = self.rows_dir / job.key
            self.done[job.key] = _slim(record)
            self.failed.pop(job.key, None)
            self._write_csv(soon=True)
            return folder

    def add_failure(self, key: str, error: str, *, attempt: bool = True) -> None:
        with self._lock:
            if attempt:
                self.attempts[key] = self.attempts.get(key, 0) + 1
            self.failed[key] = error
            self._write_csv(soon=True)

    def write(self) -> Path:
        with self._lock:
            return self._write_csv()

    def _write_csv(self, soon: bool = False) -> Path:
        path = self.out / "results.csv"
        if soon and time.monotonic() - self._written < CSV_EVERY_S:
            return path
        self._written = time.monotonic()
        manifest_cols: list[str] = []
        for row in self.rows:
            manifest_cols += [c for c in row if c not in manifest_cols]
        metric_cols = sorted({m for rec in self.done.values() for m in rec.get("metrics") or {}})
        columns = manifest_cols + list(STATUS_COLUMNS) + [f"metric_{m}" for m in metric_cols]
        tmp = path.with_name(f".results.{uuid.uuid4().hex[:8]}.csv")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row, key in zip(self.rows, self.keys, strict=True):
                writer.writerow({**row, **self._status(key), **{
                    f"metric_{m}": v for m, v in (self.done.get(key, {}).get("metrics") or {}).items()}})
        os.replace(tmp, path)
        return path

    def _status(self, key: str) -> dict[str, Any]:
        rec = self.done.get(key)
        if rec is not None:
            batch = rec.get("batch") or {}
            return {"key": key, "status": "done", "attempts": rec.get("attempts", ""), "server": rec.get("server"),
                    "output_dir": f"rows/{key}", "files": ";".join(rec.get("files") or []),
                    "elapsed_s": rec.get("elapsed_s"), "batch_size": batch.get("size", ""),
                    "batch_index": batch.get("index", ""),
                    "batch_seed": ";".join(str(s) for s in batch.get("seeds") or []),
                    "provenance_sha256": ";".join(dict.fromkeys(rec.get("provenance") or [])), "error": ""}
        status = "failed" if key in self.failed else "pending"
        return {"key": key, "status": status, "attempts": self.attempts.get(key, 0),
                "error": self.failed.get(key, "").replace("\n", " | ")}
