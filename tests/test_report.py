"""``python -m cxr_counterfactual report``: the HTML report of a REAL batch (the runner on the tiny checkpoint and the
two test radiographs, rows differing in stage switches and in the boost factor), its numbers recomputed from
results.csv, its bootstrap unit, the untouched batch folder, bad folders, unfinished rows, and the page in Chromium."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_runner import cli, small
from test_runner_graph import write_manifest

from conftest import ROOT, need
from cxr_counterfactual.imaging.realism import frechet_distance
from cxr_counterfactual.report.cli import write_report
from cxr_counterfactual.report.folder import BatchFolderError, read_batch
from cxr_counterfactual.report.stages import configuration
from cxr_counterfactual.report.stats import RESAMPLES, SEED, cluster_bootstrap

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def batch(comfy_server, tiny_checkpoint, pack_import_path, data_dir, chexmask_example, tmp_path_factory) -> Path:
    """A real batch: 8 rows (2 radiographs × stock / gate / gate + boost at factors 2 and 5) and one failing row."""
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


def configurations_of(out: Path, done: list[dict[str, str]]) -> dict[str, str]:
    return {r["key"]: configuration(json.loads((out / r["output_dir"] / "row.json").read_text())["graph"])
            for r in done}


def values(done: list[dict[str, str]], metric: str, keep=lambda r: True) -> list[float]:
    return [float(r[f"metric_{metric}"]) for r in done if keep(r) and r.get(f"metric_{metric}", "") not in ("", "None")]


def test_the_report_of_a_real_batch_holds_the_numbers_of_results_csv(batch):
    before = tree_hash(batch)
    start = time.perf_counter()
    path = write_report(batch)
    print(f"report of {len(results(batch))} rows: {time.perf_counter() - start:.2f} s, {path.stat().st_size} bytes")
    assert tree_hash(batch) == before  # nothing in the batch folder changed
    assert path == batch.parent / f"{batch.name}-report.html"
    assert write_report(batch) == batch.parent / f"{batch.name}-report-1.html"  # never replaces a report
    assert tree_hash(batch) == before

    done = [r for r in results(batch) if r["status"] == "done"]
    assert len(done) == 8
    configs = configurations_of(batch, done)
    # The rows' graphs say which stages ran: both neutral = stock, the gate alone, gate + boost (factor > 1).
    assert {r["id"].split("-", 1)[1]: configs[r["key"]] for r in done} == {
        "stock": "stock", "gate": "gate", "boost2": "gate + boost", "boost5": "gate + boost"}
    page = Page(path.read_text(encoding="utf-8"))
    header = [c["text"] for c in page.tables["ablation"][0][1:]]
    assert header == ["stock (2 rows, 2 radiographs)", "gate (2 rows, 2 radiographs)",
                      "gate + boost (4 rows, 2 radiographs)", "all finished rows (8 rows, 2 radiographs)"]
    ablation = page.by_first_column("ablation")
    assert {"keep_ssim", "keep_psnr_db", "organ_dice_left_lung", "change_in_edit_share"} <= set(ablation)
    assert "image" not in ablation  # the pair index is not a metric
    for metric, cells in ablation.items():
        for config, cell in zip(["stock", "gate", "gate + boost", "all"], cells, strict=True):
            expected = values(done, metric, lambda r, c=config: c in ("all", configs[r["key"]]))
            if not expected:
                assert "data-mean" not in cell
                continue
            # The same float64 numbers averaged in another order: equal to a few ulps.
            assert float(cell["data-mean"]) == pytest.approx(float(np.mean(expected)), rel=1e-12, abs=1e-12)
            assert float(cell["data-low"]) <= float(cell["data-mean"]) <= float(cell["data-high"])
            assert cell["data-clusters"] == "2" and cell["data-rows"] == str(len(expected))
    # Dose–response over the boost factor: a plot, and per factor the mean of results.csv's keep SSIM over the rows
    # with the gate on (the one line with 2+ factors: stock rows have factor 1 only). The gate's two switches always
    # flip together, so they get no line of their own, and the page says so.
    assert [img["alt"] for img in page.images if img.get("class") == "plot"] == [f"dose-response: {FACTOR}"]
    dose = page.tables[f"dose:{FACTOR}"][1:]
    ssim = {float(row[2]["data-x"]): row[3] for row in dose if row[0]["text"] == "keep_ssim"}
    assert {row[1]["text"] for row in dose} == {"–"}
    for factor in (1.0, 2.0, 5.0):
        expected = values(done, "keep_ssim", lambda r, f=factor: float(r[FACTOR]) == f and r[f"{GATE}.strength"] == "1")
        assert float(ssim[factor]["data-mean"]) == pytest.approx(float(np.mean(expected)), rel=1e-12)
    assert {row[0]["text"] for row in dose} >= {"keep_ssim", "keep_psnr_db", "organ_dice_left_lung"}
    text = path.read_text(encoding="utf-8")
    assert f"no dose–response line: {GATE}.strength, {GATE}.token_strength" in text
    # Unfinished rows listed with their error; provenance from batch.json; the classifier's absence said plainly.
    unfinished = page.by_first_column("unfinished")
    assert unfinished["bad-gate"][0]["text"] == "failed" and "background" in unfinished["bad-gate"][2]["text"]
    assert page.tables["provenance"][1][4]["text"].endswith("rows.csv")
    text = path.read_text(encoding="utf-8")
    assert "no classifier features in this batch: run with --classifier" in text
    assert "weight-free atlas" in text and "registration fit" in text
    # --organ-dice atlas: both sides' masks from the atlas (one method), so no mixed-methods note.
    assert "Source masks from: weight-free atlas" in text and "come from different methods" not in text
    thumbs = [i for i in page.images if i.get("class") == "thumb"]
    assert {i["alt"] for i in thumbs} == {"source", "edit", "|difference|"}  # sources found via batch.json
    assert "manifest radiograph" in text


def test_the_bootstrap_resamples_radiographs_and_is_reproducible(batch, tmp_path):
    done = [r for r in results(batch) if r["status"] == "done"]  # 4 rows of each of 2 radiographs
    ssim = values(done, "keep_ssim")
    by_radiograph = cluster_bootstrap(ssim, [r["radiograph"] for r in done])
    by_row = cluster_bootstrap(ssim, [r["key"] for r in done])
    assert by_radiograph is not None and by_row is not None
    page = Page(write_report(batch, tmp_path / "a.html").read_text(encoding="utf-8"))
    assert page.tables["ablation"][0][-1]["text"] == "all finished rows (8 rows, 2 radiographs)"
    cell = page.by_first_column("ablation")["keep_ssim"][-1]
    assert (float(cell["data-low"]), float(cell["data-high"])) == (by_radiograph.low, by_radiograph.high)
    # The rows of one radiograph move together (its anatomy decides most of keep SSIM), so resampling rows as if
    # independent would understate the spread: the radiograph interval is wider.
    assert by_radiograph.high - by_radiograph.low > by_row.high - by_row.low
    # Seeded: a second report gives the same intervals to the bit.
    again = Page(write_report(batch, tmp_path / "b.html").read_text(encoding="utf-8"))
    assert again.tables["ablation"] == page.tables["ablation"]


def test_one_radiograph_with_many_rows_widens_the_interval():
    """Ten rows of one radiograph and one row of each of four others: counted as rows, the ten would pin the mean
    down; counted as one radiograph, they are one draw among five."""
    rng = np.random.default_rng(0)
    many = list(0.9 + 0.001 * rng.standard_normal(10))
    others = [0.6, 0.7, 0.8, 0.95]
    clusters = ["a"] * 10 + ["b", "c", "d", "e"]
    by_radiograph = cluster_bootstrap(many + others, clusters)
    by_row = cluster_bootstrap(many + others, [str(i) for i in range(14)])
    assert by_radiograph.rows == by_row.rows == 14 and (by_radiograph.clusters, by_row.clusters) == (5, 14)
    assert by_radiograph.mean == by_row.mean
    assert by_radiograph.high - by_radiograph.low > 1.5 * (by_row.high - by_row.low)
    assert cluster_bootstrap(many + others, clusters) == by_radiograph  # seeded: reproducible to the bit
    assert cluster_bootstrap(many + others, clusters, seed=SEED + 1) != by_radiograph  # the seed is what fixes it
    assert cluster_bootstrap([0.5, 0.7], ["a", "a"]).low is None  # one radiograph: no interval
    assert RESAMPLES >= 1000


def test_a_folder_that_is_not_a_batch_is_refused_by_name(tmp_path, pack_import_path, batch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BatchFolderError, match="no results.csv"):
        read_batch(empty)
    (empty / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BatchFolderError, match="lacks the column"):
        read_batch(empty)
    with pytest.raises(BatchFolderError, match="inside the batch folder"):
        write_report(batch, batch / "report.html")
    run = subprocess.run([sys.executable, "-m", "cxr_counterfactual", "report", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(pack_import_path)},
                         timeout=120)
    assert run.returncode == 2 and "is not a folder" in run.stderr and not list(tmp_path.glob("*.html"))


def test_a_half_finished_batch_lists_its_unfinished_rows(batch, tmp_path):
    """A copy of the batch as a killed run leaves it (one finished row back to pending) and without batch.json."""
    copy = tmp_path / "half"
    shutil.copytree(batch, copy)
    (copy / "batch.json").unlink()
    table = results(copy)
    victim = next(r for r in table if r["id"] == "nih-boost2")
    shutil.rmtree(copy / victim["output_dir"])
    for column in ("output_dir", "files", "elapsed_s", "server"):
        victim[column] = ""
    victim["status"] = "pending"
    with (copy / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    before = tree_hash(copy)
    path = write_report(copy, tmp_path / "half.html")
    assert tree_hash(copy) == before
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    unfinished = page.by_first_column("unfinished")
    assert [unfinished[i][0]["text"] for i in ("nih-boost2", "bad-gate")] == ["pending", "failed"]
    assert "7 done, 1 failed, 1 pending" in text
    assert "no batch.json: batch made before provenance was recorded" in text
    assert "source not found (no batch.json" in text  # relative radiograph paths need the manifest's folder


def test_without_matplotlib_the_report_keeps_its_tables(batch, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    text = write_report(batch, tmp_path / "plain.html").read_text(encoding="utf-8")
    assert "matplotlib is not installed" in text and "cxr-counterfactual[report]" in text
    page = Page(text)
    assert not [i for i in page.images if i.get("class") == "plot"] and page.tables[f"dose:{FACTOR}"]


def pixel_features(path: Path) -> list[float]:
    """A 1024-long feature of a real image (its 32×32 grey thumbnail): stands in for the classifier's features."""
    with Image.open(path) as im:
        return list(np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64).ravel() / 255)


def add_features(copy: Path) -> tuple[list[list[float]], list[list[float]]]:
    """Write classifier features into each finished row's metrics JSON as the classifier step writes them (a top-level
    ``classifier`` block, one source/edit pair per image pair); returns (one source per radiograph, the edits)."""
    manifest_folder = Path(json.loads((copy / "batch.json").read_text())["runs"][0]["manifest"]).parent
    sources, edits = {}, []
    for row in (r for r in results(copy) if r["status"] == "done"):
        folder = copy / row["output_dir"]
        pair = {"source": pixel_features(manifest_folder / row["radiograph"]),
                "edit": pixel_features(folder / "save-counterfactual.png")}
        metrics = folder / "save-metrics-runner.json"
        data = json.loads(metrics.read_text())
        data["classifier"] = {"weights": "densenet121-res224-all.pt", "sha256": "0" * 64, "target": "Effusion",
                              "pathologies": ["Effusion"], "calibrated": True, "features": [pair]}
        metrics.write_text(json.dumps(data))
        sources.setdefault(row["radiograph"], pair["source"])
        edits.append(pair["edit"])
    return list(sources.values()), edits


def test_set_level_realism_is_read_from_the_rows_metrics_json(batch, tmp_path):
    """The report's distance equals the Fréchet distance of the features the rows' metrics JSON hold, recomputed."""
    copy = tmp_path / "with-features"
    shutil.copytree(batch, copy)
    sources, edits = add_features(copy)
    text = write_report(copy, tmp_path / "fid.html").read_text(encoding="utf-8")
    page = Page(text)
    realism = page.by_first_column("realism")
    expected = frechet_distance(torch.tensor(sources), torch.tensor(edits))
    cells = realism["all configurations"]
    # The same float64 computation on the same numbers (read back from JSON, which round-trips floats exactly).
    assert float(cells[0]["data-fid"]) == pytest.approx(expected.distance, rel=1e-9)
    assert (cells[1]["text"], cells[2]["text"]) == ("2", "8")
    assert "n = 2 ≤ 1024" in cells[3]["text"] and "biased upward" in cells[3]["text"]
    assert set(realism) == {"all configurations", "stock", "gate", "gate + boost"}
    assert "target: Effusion" in text and "calibrated: True" in text  # what the classifier block says of itself


def test_a_200_row_batch_renders_in_under_a_minute(batch, tmp_path):
    """The real batch expanded to 200 rows (each finished row copied under new keys, with classifier features): the
    report's time and size."""
    copy = tmp_path / "big"
    shutil.copytree(batch, copy)
    add_features(copy)
    table = results(copy)
    done = [r for r in table if r["status"] == "done"]
    big = [r for r in table if r["status"] != "done"]
    copies = -(-(200 - len(big)) // len(done))
    for i in range(copies):
        for row in done:
            if len(big) == 200:
                break
            key = f"{row['key']}-x{i}"
            if i:
                shutil.copytree(copy / row["output_dir"], copy / "rows" / key)
            big.append({**row, "id": f"{row['id']}-x{i}", "key": key if i else row["key"],
                        "output_dir": f"rows/{key}" if i else row["output_dir"]})
    with (copy / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(big)
    start = time.perf_counter()
    path = write_report(copy, tmp_path / "big.html")
    seconds = time.perf_counter() - start
    print(f"200-row report: {seconds:.1f} s, {path.stat().st_size / 1e6:.2f} MB")
    assert seconds < 60
    text = path.read_text(encoding="utf-8")
    assert "199 done, 1 failed, 0 pending" in text and "data-fid" in text


def test_the_report_opens_offline_in_chromium_with_every_image(batch, tmp_path):
    """The page in the headless Chromium the browser tests drive (no network: every host but 127.0.0.1 fails to
    resolve): no error, every <img> decoded, the plots there. Screenshot under tmp_path and docs/images/report.png."""
    from cxr_counterfactual.testing.browser import FrontendPage, missing_browser

    reason = missing_browser()
    need(reason is None, str(reason))
    copy = tmp_path / "with-features"
    shutil.copytree(batch, copy)
    add_features(copy)
    path = write_report(copy, tmp_path / "report.html")
    with FrontendPage(path.as_uri(), tmp_path / "profile", size=(1400, 2200)) as page:
        page.driver.get(path.as_uri())
        images = page.driver.execute_script(
            "return [...document.images].map(i => [i.className, i.alt, i.complete, i.naturalWidth]);")
        errors = page.driver.execute_script("return window.__cxrErrors;")
        shot = tmp_path / "report.png"
        assert page.driver.save_screenshot(str(shot))
    assert errors == []
    assert images and all(done and width > 0 for _, _, done, width in images), images
    assert sum(kind == "plot" for kind, *_ in images) == 1  # the boost factor
    assert sum(kind == "thumb" for kind, *_ in images) >= 3
    print(f"screenshot: {shot}")
    shutil.copyfile(shot, ROOT / "docs" / "images" / "report.png")
