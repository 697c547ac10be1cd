"""The report's bootstrap intervals: clusters are radiographs, not rows (on the real batch of tests/report_fixtures.py
and on made-up numbers), and seeded, so reproducible to the bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from report_fixtures import Page, results, values

from cxr_counterfactual.report.cli import write_report
from cxr_counterfactual.report.stats import RESAMPLES, SEED, cluster_bootstrap

pytestmark = pytest.mark.slow


def test_the_bootstrap_resamples_radiographs_and_is_reproducible(report_batch, tmp_path):
    done = [r for r in results(report_batch) if r["status"] == "done"]  # 4 rows of each of 2 radiographs
    ssim = values(done, "keep_ssim")
    by_radiograph = cluster_bootstrap(ssim, [r["radiograph"] for r in done])
    by_row = cluster_bootstrap(ssim, [r["key"] for r in done])
    assert by_radiograph is not None and by_row is not None
    page = Page(write_report(report_batch, tmp_path / "a.html").read_text(encoding="utf-8"))
    assert page.tables["ablation"][0][-1]["text"] == "all finished rows (8 rows, 2 radiographs)"
    cell = page.by_first_column("ablation")["keep_ssim"][-1]
    assert (float(cell["data-low"]), float(cell["data-high"])) == (by_radiograph.low, by_radiograph.high)
    # The rows of one radiograph move together (its anatomy decides most of keep SSIM), so resampling rows as if
    # independent would understate the spread: the radiograph interval is wider.
    assert by_radiograph.high - by_radiograph.low > by_row.high - by_row.low
    # Seeded: a second report gives the same intervals to the bit.
    again = Page(write_report(report_batch, tmp_path / "b.html").read_text(encoding="utf-8"))
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
