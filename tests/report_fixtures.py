"""The real batch the report tests read (tests/test_report_*.py), registered in conftest.py so that it runs once per
session whichever of those files run, and how the tests read a batch and its report.

- ``report_batch``: the runner on the tiny checkpoint and the two test radiographs (shrunk), rows differing in stage
  switches and in the boost factor, plus one row the gate refuses; the batch's output folder.
- :func:`results` (results.csv's rows), :func:`values` (one metric's numbers), :func:`tree_hash` (a folder's files'
  hashes), :class:`Page` (the report's tables and images).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT

GATE, BOOST = "Stage 2: anatomy gate", "Stage 3: pathology boost"
FACTOR = f"{BOOST}.factor"
# (row suffix, stage values): stock (both stages neutral), gate alone, gate + boost at factors 2 and 5 (with the gate
# alone at factor 1: the dose axis).
OFF = {f"{GATE}.strength": "0", f"{GATE}.token_strength": "0"}
ON = {f"{GATE}.strength": "1", f"{GATE}.token_strength": "1"}
CONFIGS = [("stock", {**OFF, FACTOR: "1"}), ("gate", {**ON, FACTOR: "1"}),
           *((f"boost{f}", {**ON, FACTOR: f}) for f in ("2", "5"))]
RADIOGRAPH_PX = 160


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def workflow(path: Path) -> Path:
    """cxr_chexmask_edit with the atlas fitted to the source giving the source's masks (in place of the CheXmask row);
    the batch's --organ-dice atlas fits the atlas to the composited edit for the edit's masks."""
    graph = json.loads((ROOT / "workflows" / "api" / "cxr_chexmask_edit.json").read_text())
    graph["2"] = {"class_type": "CXRAtlasOrgans", "_meta": {"title": "Organ masks of the source (atlas)"},
                  "inputs": {"image": ["1", 0], "min_quality": 0.5}}
    path.write_text(json.dumps(graph))
    return path


def small_radiographs(data_dir: Path, example: Path, folder: Path) -> list[tuple[str, Path]]:
    """The two test radiographs shrunk to RADIOGRAPH_PX on the long side (PNG): the atlas fits and the native-size
    evaluation then take a fraction of a second, and the atlas still fits them (quality ≥ 0.5)."""
    out = []
    originals = (("nih", data_dir / "cxr" / "nih" / "00000001_000.png"), ("example", example / "utils_example1.jpg"))
    for name, path in originals:
        with Image.open(path) as im:
            grey = im.convert("L")
            scale = RADIOGRAPH_PX / max(grey.size)
            grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.Resampling.LANCZOS)
            grey.save(folder / f"{name}.png")
        out.append((name, folder / f"{name}.png"))
    return out


def manifest_rows(radiographs: list[tuple[str, Path]]) -> list[dict[str, str]]:
    # Paths relative to the manifest (the report finds the sources through batch.json's manifest path).
    rows = [{"id": f"{name}-{suffix}", "radiograph": path.name, **values}
            for name, path in radiographs for suffix, values in CONFIGS]
    # A row the gate refuses (an unknown background): it fails and the report must list it.
    rows.append({"id": "bad-gate", "radiograph": radiographs[1][1].name, **CONFIGS[1][1],
                 f"{GATE}.background": "nowhere"})
    return rows


@pytest.fixture(scope="session")
def report_batch(comfy_server, tiny_checkpoint, pack_import_path, data_dir, chexmask_example, tmp_path_factory) -> Path:
    """A real batch: 8 rows (2 radiographs × stock / gate / gate + boost at factors 2 and 5) and one failing row."""
    from test_runner import cli, small
    from test_runner_graph import write_manifest

    root = tmp_path_factory.mktemp("report-batch")
    rows = manifest_rows(small_radiographs(data_dir, chexmask_example, root))
    manifest = write_manifest(root / "rows.csv", rows)
    out = root / "out"
    start = time.perf_counter()
    run = cli(pack_import_path, str(workflow(root / "wf.json")), "--manifest", str(manifest), "--server",
              comfy_server.url, "--out", str(out), "--retries", "0", "--no-progress", "--organ-dice", "atlas",
              *small(tiny_checkpoint))
    print(f"batch of {len(rows)} rows: {time.perf_counter() - start:.1f} s")
    assert run.returncode == 1, run.stdout + run.stderr  # the bad row fails; the others finish
    # cxr_chexmask_edit has no export node: the runner says its rows carry no audit trail (docs/audit.md).
    assert "has no CXR Export Counterfactual node: its rows carry no audit trail" in run.stderr
    if not (out / "batch.json").exists():  # a runner without provenance: write what a recording run writes
        (out / "batch.json").write_text(json.dumps({"runs": [{
            "argv": ["run", "wf.json", "--manifest", str(manifest)], "workflow": str(root / "wf.json"),
            "manifest": str(manifest), "overrides": {}, "sweep": {}, "started_at": "2026-12-04T07:00:00+0000",
            "pack_version": "0.1.0", "comfyui_version": "0.3.64", "rows": len(rows)}]}))
    return out


def results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


class Page(HTMLParser):
    """The report's tables (by class; dose tables as ``dose:<setting>``) as rows of cells (attributes + ``text``)
    and its <img> attributes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[dict[str, str]]]] = {}
        self.images: list[dict[str, str]] = []
        self._table: str | None = None
        self._cell: dict[str, str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._table = a.get("class", "") + (f":{a['data-setting']}" if "data-setting" in a else "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {**a, "text": ""}
            self.tables[self._table][-1].append(self._cell)
        elif tag == "img":
            self.images.append(a)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "table":
            self._table = None

    def by_first_column(self, name: str) -> dict[str, list[dict[str, str]]]:
        return {row[0]["text"]: row[1:] for row in self.tables[name][1:]}


def values(done: list[dict[str, str]], metric: str, keep=lambda r: True) -> list[float]:
    return [float(r[f"metric_{metric}"]) for r in done if keep(r) and r.get(f"metric_{metric}", "") not in ("", "None")]
