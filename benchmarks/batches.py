"""Rows per minute of the headless runner at ``--batch-size`` 1, 4 and 8 on one local ComfyUI (tiny checkpoint).

    python benchmarks/batches.py [--rows 8] [--px 64] [--steps 3] [--sizes 1,4,8] [--gpu]

The same manifest (the NIH radiograph and mirrored / flipped / inverted copies of it, one seed for all, so every
row may share a batch) runs through the runner's own planning and batch code at each batch size, on one server
warmed up first (checkpoint loaded). The workflow is the shipped ``cxr_chexmask_edit`` when the server can run it
as a batch (it needs the ORGAN_MASKS batch node and batch-aware stages), else a plain img2img graph (Load Image
→ scale → VAE Encode → KSampler → VAE Decode → Save Image, CXR Evaluate Edit); the ``workflow=`` line says which
and why. Prints ``rows_per_min=`` per batch size and ``speedup_<N>=`` against batch size 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_LINK = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
_LINK.symlink_to(HERE.parent, target_is_directory=True)
sys.path.insert(0, str(_LINK.parent))

from cxr_counterfactual.demo.run import tiny_checkpoint  # noqa: E402
from cxr_counterfactual.runner import graph as g  # noqa: E402
from cxr_counterfactual.runner.batch import run_batch  # noqa: E402
from cxr_counterfactual.runner.batching import BatchJob, CannotBatch, batch_graph, plan  # noqa: E402
from cxr_counterfactual.runner.comfyui_path import require_comfyui  # noqa: E402
from cxr_counterfactual.runner.manifest import prepare, read_manifest, row_key  # noqa: E402
from cxr_counterfactual.runner.results import ResultsBook  # noqa: E402
from cxr_counterfactual.runner.server import ComfyServer  # noqa: E402
from cxr_counterfactual.runner.worker import Worker  # noqa: E402
from cxr_counterfactual.testing.batch_graphs import (  # noqa: E402
    img2img_graph,
    same_size_radiographs,
    small_chexmask_overrides,
)
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402


def manifest(folder: Path, images: list[Path], rows: int, tag: str, chexmask: bool) -> Path:
    data = test_data_dir() / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"
    with data.open(newline="") as f:
        image_id = next(r["Image Index"] for r in csv.DictReader(f) if float(r["Dice RCA (Mean)"]) >= 0.7
                        and float(r["Height"] or 1024) == float(r["Width"] or 1024))
    path = folder / f"rows-{tag}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "radiograph", "chexmask_csv", "chexmask_id"] if chexmask else ["id", "radiograph"])
        for i in range(rows):
            extra = [data, image_id] if chexmask else []
            writer.writerow([f"{tag}-{i}", images[i % len(images)], *extra])
    return path


def timed(server: ComfyServer, base: g.Graph, rows_csv: Path, out: Path, size: int) -> tuple[float, list[int]]:
    """Seconds to run every row of ``rows_csv`` at batch size ``size``, and the batch sizes that ran."""
    rows = read_manifest(rows_csv)
    info = server.object_info()
    jobs, problems = prepare(base, rows, rows_csv.parent, info)
    assert not problems, problems
    book = ResultsBook(out, rows, [row_key(r, i, base) for i, r in enumerate(rows, start=1)])
    start = time.perf_counter()
    units = plan(jobs, size, info)
    summary = run_batch(units, book, [Worker(server)], progress=False)
    elapsed = time.perf_counter() - start
    assert summary.ok, summary.lines()
    return elapsed, [len(u.rows) if isinstance(u, BatchJob) else 1 for u in units]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--px", type=int, default=64, help="image side on the model grid")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sizes", default="1,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--gpu", action="store_true", help="the server uses the GPU")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-batches-"))
    comfyui = require_comfyui()
    ckpt = tiny_checkpoint(Path(os.environ.get("CXR_DEMO_CACHE", Path.home() / ".cache" / "cxr-counterfactual")),
                           comfyui)
    images = same_size_radiographs(work)
    shipped = g.apply_overrides(g.load_workflow("cxr_chexmask_edit"),
                                small_chexmask_overrides(ckpt.name, args.px, args.steps))
    g.add_metrics_saver(shipped)
    server = ComfyServer(comfyui, checkpoints=[ckpt], base_dir=work / "server", cpu=not args.gpu)
    try:
        server.start()
        info = server.object_info()
        probe = manifest(work, images, 2, "probe", chexmask=True)
        jobs, _ = prepare(shipped, read_manifest(probe), work, info)
        try:
            batch_graph(jobs, info)
            base, chexmask, why = shipped, True, "it batches on this server"
        except CannotBatch as err:
            base, chexmask = img2img_graph(ckpt.name, args.px, args.steps), False
            why = f"cxr_chexmask_edit cannot: {err}"
            g.add_metrics_saver(base)
        for size in (1, 2):  # load the checkpoint; the first runs at a new batch shape are slower on CPU
            timed(server, base, manifest(work, images, 2, f"warm{size}", chexmask), work / f"warm{size}", size)
        # A size may repeat (1,4,8,1: a busy machine's drift shows as two different figures for one size).
        seconds = [(size, *timed(server, base, manifest(work, images, args.rows, f"run{k}", chexmask),
                                 work / f"out{k}", size)) for k, size in enumerate(sizes)]
    finally:
        server.stop()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"workflow={'cxr_chexmask_edit' if chexmask else 'img2img'} ({why})")
    print(f"rows={args.rows} px={args.px} steps={args.steps} device={'gpu' if args.gpu else 'cpu'} "
          f"cpu_cores={cores} load_avg={os.getloadavg()[0]:.2f}")
    for size, elapsed, ran in seconds:
        print(f"batch_size={size} rows_per_min={60 * args.rows / elapsed:.1f} seconds={elapsed:.1f} "
              f"batches={json.dumps(ran)}")
    first = seconds[0][1]
    for size, elapsed, _ in seconds[1:]:
        print(f"speedup_{size}_vs_{sizes[0]}={first / elapsed:.2f}")


if __name__ == "__main__":
    main()
