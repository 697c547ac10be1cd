"""``python -m cxr_counterfactual report`` on a REAL batch (fixture ``report_batch`` in tests/report_fixtures.py: the
runner on the tiny checkpoint and the two test radiographs, rows differing in stage switches and in the boost factor):
the page's numbers recomputed from results.csv, the untouched batch folder, the page without matplotlib, set-level
realism from the rows' classifier features, a 200-row batch's time, and the page in Chromium.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from report_fixtures import FACTOR, GATE, Page, results, tree_hash, values

from conftest import ROOT, need
from cxr_counterfactual.imaging.realism import frechet_distance
from cxr_counterfactual.report.cli import write_report
from cxr_counterfactual.report.stages import configuration

pytestmark = pytest.mark.slow


def configurations_of(out: Path, done: list[dict[str, str]]) -> dict[str, str]:
    return {r["key"]: configuration(json.loads((out / r["output_dir"] / "row.json").read_text())["graph"])
            for r in done}

def test_the_report_of_a_real_batch_holds_the_numbers_of_results_csv(report_batch):
    before = tree_hash(report_batch)
    start = time.perf_counter()
    path = write_report(report_batch)
    print(f"report of {len(results(report_batch))} rows: {time.perf_counter() - start:.2f} s, "
          f"{path.stat().st_size} bytes")
    assert tree_hash(report_batch) == before  # nothing in the batch folder changed
    assert path == report_batch.parent / f"{report_batch.name}-report.html"
    # never replaces a report
    assert write_report(report_batch) == report_batch.parent / f"{report_batch.name}-report-1.html"
    assert tree_hash(report_batch) == before

    done = [r for r in results(report_batch) if r["status"] == "done"]
    assert len(done) == 8
    configs = configurations_of(report_batch, done)
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


def test_without_matplotlib_the_report_keeps_its_tables(report_batch, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    text = write_report(report_batch, tmp_path / "plain.html").read_text(encoding="utf-8")
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


def test_set_level_realism_is_read_from_the_rows_metrics_json(report_batch, tmp_path):
    """The report's distance equals the Fréchet distance of the features the rows' metrics JSON hold, recomputed."""
    copy = tmp_path / "with-features"
    shutil.copytree(report_batch, copy)
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


def test_a_200_row_batch_renders_in_under_a_minute(report_batch, tmp_path):
    """The real batch expanded to 200 rows (each finished row copied under new keys, with classifier features): the
    report's time and size."""
    copy = tmp_path / "big"
    shutil.copytree(report_batch, copy)
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


def test_the_report_opens_offline_in_chromium_with_every_image(report_batch, tmp_path):
    """The page in the headless Chromium the browser tests drive (no network: every host but 127.0.0.1 fails to
    resolve): no error, every <img> decoded, the plots there. Screenshot under tmp_path and docs/images/report.png."""
    from cxr_counterfactual.testing.browser import FrontendPage, missing_browser

    reason = missing_browser()
    need(reason is None, str(reason))
    copy = tmp_path / "with-features"
    shutil.copytree(report_batch, copy)
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
