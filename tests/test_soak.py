"""The server's memory stays flat over a batch: the 30-row version of ``benchmarks/soak.py`` (issue 22; the benchmark
runs 200 rows and holds them to 0.2 MB per row)."""

from __future__ import annotations

import pytest

from cxr_counterfactual.benchmarks.soak import soak, window

pytestmark = pytest.mark.slow

ROWS = 30
#: MB per row over rows 10–30. Not the benchmark's 0.2: measured here (docs/performance.md), the server's RSS still
#: settles over the first rows (slope over rows 10–30: 0.56 ± 0.11 in a 30-row run, 0.43 and 0.32 in two 200-row
#: runs), and after-row RSS jitters by ~6 MB (ComfyUI collects garbage at most every 10 s), so any 21-row window
#: after warm-up ranges −0.55…+0.60 MB/row (sd 0.24). 2.0 is warm-up plus ~6 sd, and still fails on a per-row leak
#: of an image-sized buffer (the NIH radiograph as RGB float32 is 3 MB), the kind a short run can see; slow leaks
#: are the benchmark's.
LIMIT_MB_PER_ROW = 2.0


def test_server_memory_stays_flat_over_a_batch(comfy_server, tiny_checkpoint, tmp_path):
    assert window(ROWS) == (10, 30) and window(200) == (20, 200)  # the benchmark's window, scaled
    result = soak(comfy_server, tiny_checkpoint.name, ROWS, tmp_path / "out")
    assert len(result.rss_mb) == ROWS and all(mb > 100 for mb in result.rss_mb)  # a real ComfyUI with torch loaded
    assert result.slope_mb_per_row <= LIMIT_MB_PER_ROW, result.line()
    assert len(list((tmp_path / "out" / "rows").iterdir())) == ROWS  # every row went through the runner's results
