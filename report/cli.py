"""``python -m cxr_counterfactual report OUT_DIR [--html FILE]``: write the batch report, never into OUT_DIR."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .folder import BatchFolderError, read_batch

logger = logging.getLogger(__name__)


def free_path(path: Path) -> Path:
    """``path``, or ``stem-1.html``, ``stem-2.html``...: the first name not taken (never replaces a file)."""
    candidate, i = path, 1
    while candidate.exists():
        candidate, i = path.with_name(f"{path.stem}-{i}{path.suffix}"), i + 1
    return candidate


def report_path(out_dir: Path, html: Path | None) -> Path:
    """Where the report goes: ``html`` or ``<OUT_DIR>-report.html`` beside the folder, numbered if taken.

    Raises:
        BatchFolderError: ``html`` lies inside the batch folder (the report never changes it).
    """
    target = Path(html) if html is not None else out_dir.parent / f"{out_dir.name}-report.html"
    if target.resolve().is_relative_to(out_dir.resolve()):
        raise BatchFolderError(f"--html {target} lies inside the batch folder {out_dir}; the report never writes "
                               "there: give a path outside it (default: beside the folder).")
    return free_path(target)


def write_report(out_dir: Path, html: Path | None = None, top: int = 12) -> Path:
    """Render the report of ``out_dir`` and write it; returns the file written."""
    from .page import render  # after the folder check: a wrong folder errors before matplotlib or torch load

    batch = read_batch(Path(out_dir))
    target = report_path(batch.path, html)
    text = render(batch, top=top)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("x", encoding="utf-8") as f:  # "x": fails rather than replace a file made meanwhile
        f.write(text)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_counterfactual report",
                                     description="One self-contained HTML report of a batch output folder.")
    parser.add_argument("out_dir", type=Path, help="the --out folder of a batch run (results.csv, rows/)")
    parser.add_argument("--html", type=Path, help="report file (default: <OUT_DIR>-report.html beside the folder; "
                        "an existing file is never replaced: -1, -2... is added)")
    parser.add_argument("--top", type=int, default=12, help="worst rows shown per metric in the thumbnail grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        path = write_report(args.out_dir, args.html, args.top)
    except BatchFolderError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    logger.info("wrote %s in %.1f s", path, time.perf_counter() - start)
    sys.stdout.write(f"{path}\n")
    return 0
