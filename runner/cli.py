"""``python -m cxr_counterfactual run``: one API workflow, or a manifest of rows, on headless ComfyUI servers.

    run cxr_dicom_masked_edit --input RG1_UNCR.dcm --set "Sampler.steps=8" --out runs
    run cxr_chexmask_edit --manifest rows.csv --out dataset --server http://127.0.0.1:8188 --server ...
    run cxr_chexmask_edit --manifest rows.csv --out dataset --ray auto
    run cxr_chexmask_edit --manifest rows.csv --out dataset --batch-size 4 --gpu
    run cxr_chexmask_edit --manifest rows.csv --out sweep --sweep "Stage 3: pathology boost.factor=1,2,3,5"

Without ``--server`` it starts its own headless ComfyUI(s) with this pack (ComfyUI found like the tests
find it: ``--comfyui``, ``COMFYUI_PATH``, the ComfyUI holding the pack, ``~/comfy/ComfyUI``).
Exit status: 0 when everything finished, 1 when a run or a row failed (finished rows are kept), 2 for a
usage error (bad workflow, override or manifest; unreachable server).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import graph as g
from . import sweep as sw
from .client import ComfyClient
from .manifest import ManifestError, build_job, prepare, read_manifest, row_key
from .protocol import ComfyServerError, ProgressEvent
from .results import ResultsBook, commit, record_of, unique_name
from .worker import EXPORT_NODE, Worker

logger = logging.getLogger("cxr_counterfactual.runner")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cxr_counterfactual run", description=__doc__.split("\n")[0])
    p.add_argument("workflow", help="API workflow file, or a shipped one by name (e.g. cxr_dicom_masked_edit)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="'TITLE.INPUT=VALUE'",
                   help="set a widget value of the node with that title (repeatable)")
    p.add_argument("--manifest", type=Path, help="batch mode: a CSV with one edit per row (see docs/runner.md)")
    p.add_argument("--sweep", action="append", default=[], metavar="'TITLE.INPUT=V1,V2,...'",
                   help="run every radiograph row once per value (repeatable: the cartesian product); a batch, "
                        "resumable; a value with a comma goes in double quotes (docs/runner.md)")
    p.add_argument("--out", type=Path, default=Path("cxr-runs"), help="output folder (never overwritten)")
    one = p.add_argument_group("single run")
    one.add_argument("--input", action="append", default=[], type=Path, metavar="FILE",
                     help="copy/upload a file into the server's input folder under its own name (repeatable)")
    one.add_argument("--radiograph", type=Path, help="radiograph (PNG/JPEG or DICOM) for the workflow's loader")
    one.add_argument("--prompt", help="edit prompt")
    one.add_argument("--pathology", help="pathology words (CXR Text Encode)")
    one.add_argument("--seed", help="seed of every sampler")
    batch = p.add_argument_group("batch")
    batch.add_argument("--retries", type=int, default=1, help="extra attempts for a failed row (default 1)")
    batch.add_argument("--timeout", type=float, default=3600.0, help="seconds one row may run (default 3600)")
    batch.add_argument("--batch-size", type=int, default=1, metavar="N",
                       help="run up to N rows as one batch in one graph (rows with the same workflow, values and "
                            "radiograph size; only their radiograph and masks differ). Image i of a batch gets "
                            "noise index i of the batch's seed, so a row's result depends on its batch: see "
                            "docs/runner.md. A graph that cannot batch runs its rows one at a time (logged). "
                            "Default 1")
    batch.add_argument("--ray", metavar="ADDRESS", help="run on Ray: 'auto' (a cluster) or 'local' (this machine)")
    batch.add_argument("--ray-actors", type=int, help="Ray actors (default: one per GPU, else 1)")
    servers = p.add_argument_group("servers")
    servers.add_argument("--server", action="append", default=[], metavar="URL",
                         help="a running ComfyUI with this pack (repeatable: rows are spread over them)")
    servers.add_argument("--comfyui", type=Path, help="ComfyUI folder for the servers started here")
    servers.add_argument("--checkpoint", action="append", default=[], type=Path, metavar="FILE",
                         help="checkpoint linked into the servers started here; with one, every ckpt_name uses it")
    servers.add_argument("--servers", type=int, default=1, help="how many servers to start here (default 1)")
    servers.add_argument("--gpu", action="store_true", help="servers started here use the GPU (default: CPU)")
    scoring = p.add_argument_group("classifier view (CXR Evaluate Edit)")
    scoring.add_argument("--classifier", type=Path, metavar="FILE",
                         help="TorchXRayVision DenseNet weights scoring source and edit: linked into the servers "
                              "started here; with --server, a file name the server lists in models/cxr_classifiers")
    scoring.add_argument("--target-pathology", metavar="NAME",
                         help="the classifier's target (e.g. effusion); default: each row's pathology words")
    scoring.add_argument("--organ-dice", metavar="atlas|FILE",
                         help="per-organ Dice of source vs edit: organ masks of the edited image from the weight-free "
                              "atlas ('atlas') or from the segmentation node on PSPNet weights FILE (linked into the "
                              "servers started here; with --server, a name in its models/cxr_segmentation)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


@contextlib.contextmanager
def open_servers(args: argparse.Namespace) -> Iterator[list[ComfyClient]]:
    """The ``--server`` clients, or ``--servers`` headless ComfyUIs started here (stopped on exit)."""
    if args.server:
        yield [ComfyClient(url) for url in args.server]
        return
    from .comfyui_path import find_comfyui
    from .server import ComfyServer

    comfyui = args.comfyui or find_comfyui()
    if comfyui is None:
        raise SystemExit("error: ComfyUI not found: pass --comfyui, set COMFYUI_PATH, or give --server URL")
    started: list[ComfyServer] = []
    bases: list[Path] = []
    try:
        for _ in range(max(args.servers, 1)):  # from this thread: a server dies with the thread that started it
            bases.append(Path(tempfile.mkdtemp(prefix="cxr-run-comfy-")))
            server = ComfyServer(comfyui, checkpoints=args.checkpoint, base_dir=bases[-1], cpu=not args.gpu,
                                 models=model_files(args))
            started.append(server.start())
        yield list(started)
    finally:
        for server in started:
            server.stop()
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)


def segmentation_file(args: argparse.Namespace) -> Path | None:
    """``--organ-dice FILE`` (PSPNet weights); None for ``atlas`` or without the option."""
    return None if args.organ_dice in (None, g.ATLAS) else Path(args.organ_dice)


def model_files(args: argparse.Namespace) -> dict[str, list[Path]]:
    """Weight files the servers started here need in their models folders."""
    files = {"cxr_classifiers": [args.classifier] if args.classifier else [],
             "cxr_segmentation": [f] if (f := segmentation_file(args)) else []}
    return {folder: paths for folder, paths in files.items() if paths}


def base_graph(args: argparse.Namespace, object_info: dict[str, Any] | None) -> g.Graph:
    """The workflow with ``--checkpoint`` and ``--set`` applied (every error names the titles)."""
    graph = g.load_workflow(args.workflow)
    if len(args.checkpoint) == 1 and not args.server:
        for node in graph.values():
            if "ckpt_name" in node["inputs"]:
                node["inputs"]["ckpt_name"] = args.checkpoint[0].name
    graph = g.apply_overrides(graph, args.overrides, object_info)
    if args.classifier:
        g.add_classifier(graph, args.classifier.name, args.target_pathology, args.workflow, object_info)
    if args.organ_dice:
        seg = segmentation_file(args)
        g.add_organ_dice(graph, seg.name if seg else g.ATLAS, args.workflow, object_info)
    g.add_metrics_saver(graph)
    return graph


def check_scoring(args: argparse.Namespace) -> None:
    """``--classifier``, ``--target-pathology`` and ``--organ-dice`` make sense, before any server starts."""
    if args.target_pathology and not args.classifier:
        raise g.GraphError("--target-pathology is the target of --classifier; pass both")
    if args.classifier and args.ray:
        raise g.GraphError("--classifier is not supported with --ray yet; use --server or the servers started here")
    if args.classifier and not args.server and not args.classifier.is_file():
        raise g.GraphError(f"--classifier {args.classifier} does not exist (it is linked into the servers started "
                           "here; with --server, name a file the server lists)")
    if args.classifier:  # a workflow that cannot take it fails before any server starts
        g.add_classifier(g.load_workflow(args.workflow), args.classifier.name, args.target_pathology, args.workflow)
    seg = segmentation_file(args)
    if seg and args.ray:
        raise g.GraphError("--organ-dice FILE is not supported with --ray yet; use --organ-dice atlas, --server or the "
                           "servers started here")
    if seg and not args.server and not seg.is_file():
        raise g.GraphError(f"--organ-dice {seg} is neither 'atlas' nor an existing PSPNet weight file (it is linked "
                           "into the servers started here)")
    if args.organ_dice:
        g.add_organ_dice(g.load_workflow(args.workflow), seg.name if seg else g.ATLAS, args.workflow)


def check_servers(clients: Sequence[ComfyClient], graph: g.Graph) -> dict[str, Any]:
    """Every server answers and knows the workflow's node types; returns the first one's node definitions."""
    infos = []
    for client in clients:
        try:
            infos.append(client.object_info())
        except ComfyServerError as err:
            raise SystemExit(f"error: {err}. Is ComfyUI running there?") from None
        g.check_types(graph, infos[-1], client.url)
    return infos[0]


class StepBar:
    """Sampling steps of one run as a tqdm bar (log lines without tqdm)."""

    def __init__(self, enabled: bool):
        self.bar: Any = None
        self.enabled = enabled

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            logger.info("step %d/%d", event.value, event.max)
            return
        if self.bar is None or self.bar.total != event.max or event.value < self.bar.n:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=event.max, unit="step", desc=f"node {event.node}", dynamic_ncols=True)
        self.bar.update(event.value - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_single(args: argparse.Namespace, client: ComfyClient, base: g.Graph, info: dict[str, Any]) -> int:
    row = {k: str(v) for k, v in (("radiograph", args.radiograph), ("prompt", args.prompt),
                                   ("pathology", args.pathology), ("seed", args.seed)) if v is not None}
    job = build_job(base, row, 1, Path.cwd(), _plain_namer, info)
    worker = Worker(client)
    for path in args.input:
        if not path.is_file():
            raise ManifestError(f"--input {path} does not exist")
        client.upload_bytes(path.name, path.read_bytes())
    bar = StepBar(not args.no_progress)
    try:
        outcome = worker.run(job, timeout=args.timeout, on_progress=bar)
    finally:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    name = unique_name(args.out, f"{Path(args.workflow).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    folder = commit(args.out, name, outcome.files, record_of(job, outcome, 1))
    sys.stdout.write(f"{folder}\n")
    for key, value in outcome.metrics.items():
        sys.stdout.write(f"  {key}: {value}\n")
    return 0


def _plain_namer(path: Path) -> Any:
    """A single run's files keep their own names (the graph may already name them)."""
    from .manifest import Upload

    if not path.is_file():
        raise ManifestError(f"{path} does not exist")
    return Upload(path.name, path)


def batch_rows(args: argparse.Namespace, base: g.Graph, info: dict[str, Any] | None,
               clients: Sequence[ComfyClient]) -> tuple[list[dict[str, str]], Path]:
    """The manifest's rows (a single run's as one row), expanded by ``--sweep``, and the folder paths start from."""
    if args.manifest:
        rows, root = read_manifest(args.manifest), args.manifest.resolve().parent
    else:  # a single run as a one-row manifest: resumable, and its sweep rows run like any batch
        rows, root = [{k: str(Path(v).resolve()) if k == "radiograph" else str(v) for k, v in (
            ("radiograph", args.radiograph), ("prompt", args.prompt), ("pathology", args.pathology),
            ("seed", args.seed)) if v is not None}], Path.cwd()
    settings = sw.parse_all(args.sweep)
    sw.validate(settings, base, info, list(rows[0]) if rows else [], args.overrides)
    for path in [] if args.manifest else args.input:
        if not path.is_file():
            raise ManifestError(f"--input {path} does not exist")
        for client in clients:
            client.upload_bytes(path.name, path.read_bytes())
    return (sw.expand(rows, settings) if settings else rows), root


def run_manifest(args: argparse.Namespace, base: g.Graph, info: dict[str, Any] | None,
                 clients: Sequence[ComfyClient], argv: Sequence[str]) -> int:
    from .batch import output_lock, run_batch
    from .batching import plan
    from .provenance import record_run, run_entry

    rows, root = batch_rows(args, base, info, clients)
    keys = [row_key(row, i, base) for i, row in enumerate(rows, start=1)]
    if not g.nodes_of(base, [EXPORT_NODE]):
        logger.warning("the workflow has no CXR Export Counterfactual node: its rows carry no audit trail (no "
                       "provenance sidecar; results.csv's provenance_sha256 stays empty). Add the export node to "
                       "keep one.")
    with output_lock(args.out):
        record_run(args.out, run_entry(argv, args.workflow, args.manifest, root, args.overrides,
                                       sw.spec(sw.parse_all(args.sweep)), len(rows), clients))
        book = ResultsBook(args.out, rows, keys)
        jobs, problems = prepare(base, rows, root, info, skip=book.is_done)
        for index, reason in problems.items():
            logger.error("%s", reason)
            book.add_failure(keys[index - 1], reason, attempt=False)
        if args.ray:
            from .ray_backend import init_ray, run_batch_ray

            init_ray(args.ray)  # before anything imports ray: it sets Ray's environment
            import ray

            try:
                summary = run_batch_ray(jobs, book, actors=args.ray_actors, comfyui=args.comfyui,
                                        checkpoints=args.checkpoint, retries=args.retries, timeout=args.timeout,
                                        progress=not args.no_progress)
            finally:
                ray.shutdown()
        else:
            units = plan(jobs, args.batch_size, info or {}) if args.batch_size > 1 else jobs
            workers = [Worker(c) for c in clients]
            summary = run_batch(units, book, workers, retries=args.retries, timeout=args.timeout,
                                progress=not args.no_progress)
    sys.stdout.write("\n".join(summary.lines()) + "\n")
    return 0 if summary.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.ray and not args.manifest:
        raise SystemExit("error: --ray runs a --manifest batch")
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be 1 or more")
    if args.batch_size > 1 and not (args.manifest or args.sweep):
        raise SystemExit("error: --batch-size batches the rows of a --manifest or --sweep")
    if args.batch_size > 1 and args.ray:
        raise SystemExit("error: --batch-size is not supported with --ray yet; use --server or local servers")
    if args.ray and args.server:
        raise SystemExit("error: --ray starts a ComfyUI in every actor; it takes no --server")
    try:
        check_scoring(args)
        if args.ray:
            graph = base_graph(args, None)  # actors check their own servers when they start
            return run_manifest(args, graph, None, [], argv)
        g.load_workflow(args.workflow)  # a wrong name fails before any server starts
        with open_servers(args) as clients:
            info = check_servers(clients, g.load_workflow(args.workflow))
            graph = base_graph(args, info)
            g.check_types(graph, info, clients[0].url)
            if args.manifest or args.sweep:
                return run_manifest(args, graph, info, clients, argv)
            return run_single(args, clients[0], graph, info)
    except (g.GraphError, ManifestError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except ComfyServerError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("stopped; finished rows are kept: run the same command again to resume\n")
        return 130
