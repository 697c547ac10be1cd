"""``python -m cxr_counterfactual report`` on folders that are not a finished batch: a folder that is no batch (and a
report path inside the batch) refused by name, and a half-finished batch (a killed run's, without batch.json) whose
unfinished rows the page lists; the batch is tests/report_fixtures.py's ``report_batch``.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest
from report_fixtures import Page, results, tree_hash

from cxr_counterfactual.report.cli import write_report
from cxr_counterfactual.report.folder import BatchFolderError, read_batch

pytestmark = pytest.mark.slow


def test_a_folder_that_is_not_a_batch_is_refused_by_name(tmp_path, pack_import_path, report_batch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BatchFolderError, match="no results.csv"):
        read_batch(empty)
    (empty / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BatchFolderError, match="lacks the column"):
        read_batch(empty)
    with pytest.raises(BatchFolderError, match="inside the batch folder"):
        write_report(report_batch, report_batch / "report.html")
    run = subprocess.run([sys.executable, "-m", "cxr_counterfactual", "report", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(pack_import_path)},
                         timeout=120)
    assert run.returncode == 2 and "is not a folder" in run.stderr and not list(tmp_path.glob("*.html"))


def test_a_half_finished_batch_lists_its_unfinished_rows(report_batch, tmp_path):
    """A copy of the batch as a killed run leaves it (one finished row back to pending) and without batch.json."""
    copy = tmp_path / "half"
    shutil.copytree(report_batch, copy)
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
