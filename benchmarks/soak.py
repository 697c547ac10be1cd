"""Soak check: the server's memory stays flat over a long batch (issue 22: at most 0.2 MB per row).

    python benchmarks/soak.py --rows 200 --json soak.json [--px 64] [--steps 2]

Runs ``--rows`` rows of the shipped ``cxr_chexmask_edit`` (every stage: anatomy gate, pathology boost, keep
region, metrics at native size) on one real radiograph with its CheXmask row, a new seed per row, through the
runner's own code (manifest → job → worker → results folder) on a headless ComfyUI started here with the tiny
checkpoint. After every row it reads the server process's resident memory (RSS) and fits a least-squares line over
the rows after warm-up (:func:`window`: rows 20–200 of 200, 10–30 of 30). Prints the slope and its standard error
and writes every row's RSS and time to ``--json``. ``tests/test_soak.py`` runs :func:`soak` with 30 rows in CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable as the package it is
    _LINK = Path(tempfile.mkdtemp(prefix="cxr-soak-")) / "cxr_counterfactual"
    _LINK.symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
    sys.path.insert(0, str(_LINK.parent))

from cxr_counterfactual.runner import graph as g  # noqa: E402
from cxr_counterfactual.runner.manifest import prepare, row_key  # noqa: E402
from cxr_counterfactual.runner.results import ResultsBook  # noqa: E402
from cxr_counterfactual.runner.server import ComfyServer  # noqa: E402
from cxr_counterfactual.runner.worker import Worker  # noqa: E402
from cxr_counterfactual.testing.batch_graphs import small_chexmask_overrides  # noqa: E402
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402

logger = logging.getLogger("cxr_counterfactual.soak")

#: Issue 22's target: RSS growth after warm-up, MB per row.
TARGET_MB_PER_ROW = 0.2


@dataclass
class SoakResult:
    """RSS (MB) and seconds of each row, and the least-squares slope over :func:`window`."""

    rows: int
    px: int
    steps: int
    first: int
    last: int
    slope_mb_per_row: float
    slope_stderr: float
    rss_mb: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def line(self) -> str:
        return (f"rows={self.rows} px={self.px} steps={self.steps} window={self.first}-{self.last} "
                f"slope_mb_per_row={self.slope_mb_per_row:.4f} stderr={self.slope_stderr:.4f} "
                f"rss_mb first={self.rss_mb[0]:.1f} at_{self.first}={self.rss_mb[self.first - 1]:.1f} "
                f"last={self.rss_mb[-1]:.1f} s_per_row={sum(self.seconds) / len(self.seconds):.2f} "
                f"target<={TARGET_MB_PER_ROW}")


def window(rows: int) -> tuple[int, int]:
    """The rows (1-based, inclusive) the slope is fitted over: after a warm-up of a tenth of the batch, at least
    10 rows (the first rows load the checkpoint, index the CheXmask CSV and fill the allocators' pools)."""
    return min(max(10, rows // 10), rows - 2), rows


def slope(values: list[float], first: int, last: int) -> tuple[float, float]:
    """Least-squares slope of ``values[first-1:last]`` against row number, and its standard error."""
    ys = values[first - 1:last]
    xs = list(range(first, first + len(ys)))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return b, math.sqrt(resid / max(len(xs) - 2, 1) / sxx)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux ``/proc``; psutil elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def manifest_rows(rows: int, seed0: int = 0) -> list[dict[str, str]]:
    """``rows`` rows: the NIH radiograph with a good CheXmask row of the test data, one seed each."""
    data = test_data_dir() / "cxr"
    table = data / "chexmask-rows" / "ChestX-Ray8.csv"
    with table.open(newline="") as f:
        image_id = next(r["Image Index"] for r in csv.DictReader(f) if float(r["Dice RCA (Mean)"]) >= 0.7
                        and float(r["Height"] or 1024) == float(r["Width"] or 1024))
    return [{"id": f"soak{i:04d}", "radiograph": str(data / "nih" / "00000001_000.png"), "chexmask_csv": str(table),
             "chexmask_id": image_id, "seed": str(seed0 + i)} for i in range(rows)]


def soak(server: ComfyServer, checkpoint: str, rows: int, out: Path, px: int = 64, steps: int = 2,
         on_row: Callable[[int, float], None] | None = None) -> SoakResult:
    """Run ``rows`` rows on ``server`` one after another and measure its RSS after each (see the module doc)."""
    assert server.pid is not None, "the server is not running"
    base = g.apply_overrides(g.load_workflow("cxr_chexmask_edit"), small_chexmask_overrides(checkpoint, px, steps))
    g.add_metrics_saver(base)
    manifest = manifest_rows(rows)
    jobs, problems = prepare(base, manifest, Path.cwd())
    assert not problems, problems
    book = ResultsBook(out, manifest, [row_key(r, i, base) for i, r in enumerate(manifest, start=1)])
    worker = Worker(server)
    rss, seconds = [], []
    for job in jobs:
        start = time.perf_counter()
        book.add_success(job, worker.run(job, timeout=600))
        seconds.append(time.perf_counter() - start)
        rss.append(rss_mb(server.pid))
        if on_row:
            on_row(len(rss), rss[-1])
    book.write()
    first, last = window(rows)
    b, se = slope(rss, first, last)
    return SoakResult(rows, px, steps, first, last, b, se, [round(v, 3) for v in rss],
                      [round(s, 3) for s in seconds])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--px", type=int, default=64, help="CXR Fit To Model max_side")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True, help="where to write every row's RSS and time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from cxr_counterfactual.demo.run import tiny_checkpoint
    from cxr_counterfactual.runner.comfyui_path import require_comfyui

    comfyui = require_comfyui()
    ckpt = tiny_checkpoint(Path(os.environ.get("CXR_DEMO_CACHE", Path.home() / ".cache" / "cxr-counterfactual")),
                           comfyui)
    work = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    so_far: list[float] = []

    def on_row(n: int, mb: float) -> None:  # a stopped run still leaves every row measured so far
        so_far.append(round(mb, 3))
        args.json.write_text(json.dumps({"partial": True, "rows_done": n, "rss_mb": so_far}))
        if n % 10 == 0:
            logger.info("row %d rss %.1f MB", n, mb)

    with ComfyServer(comfyui, checkpoints=[ckpt], base_dir=work / "server") as server:
        result = soak(server, ckpt.name, args.rows, work / "out", args.px, args.steps, on_row=on_row)
    args.json.write_text(json.dumps({**asdict(result), "target_mb_per_row": TARGET_MB_PER_ROW,
                                     "load_avg": os.getloadavg()[0]}, indent=1))
    print(result.line())
    return 0 if result.slope_mb_per_row <= TARGET_MB_PER_ROW else 1


if __name__ == "__main__":
    sys.exit(main())
