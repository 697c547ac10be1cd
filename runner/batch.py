"""A manifest's rows over several servers: one thread per server, one prompt in flight on each.

One prompt per server because a ComfyUI runs its queue one prompt at a time anyway: queueing more would
only hide rows from idle servers. A failed row goes back to the queue until it has had ``1 + retries``
attempts; a graph the server rejects is not retried (it would be rejected again). A server that stops
answering loses its thread, and its row goes back to the queue for the others. With ``--batch-size`` a queue
item may be a batch of rows run in one graph (:mod:`.batching`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batching import BatchJob
from .manifest import RowJob
from .protocol import ComfyServerError, PromptRejected, ServerUnreachable
from .results import ResultsBook
from .worker import Worker

logger = logging.getLogger(__name__)


def classify_failure(err: BaseException, server_running: Callable[[], bool]) -> tuple[str, str]:
    """What a failed attempt means for the retry policy: ``(kind, message)`` with kind ``rejected`` (the server
    refused the graph), ``down`` (the server is unreachable or has stopped) or ``failed`` (this attempt failed)."""
    if isinstance(err, PromptRejected):
        return "rejected", str(err)
    down = isinstance(err, ServerUnreachable) or not server_running()
    return ("down" if down else "failed"), f"{type(err).__name__}: {err}"


def requeue_after_failure(book: ResultsBook, job: RowJob, kind: str, message: str, *, where: str,
                          retries: int) -> bool:
    """Record a failed attempt of ``job`` (see :func:`classify_failure`) and say whether it goes back to the queue.

    The retry policy of both backends, in one place: a row whose server went down goes back for the others (not the
    row's fault); a failed row goes back until it has had ``1 + retries`` attempts; a rejected graph never does (the
    same graph would be rejected again).
    """
    book.add_failure(job.key, message)
    again = kind == "down" or (kind == "failed" and book.attempts[job.key] <= retries)
    if again:
        logger.warning("row %s failed on %s (attempt %d): %s", job.key, where, book.attempts[job.key], message)
    return again


@dataclass
class BatchSummary:
    """How a batch ended. ``ok`` is True when every manifest row has a finished result."""

    total: int
    done: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    aborted: str = ""
    results: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending and not self.aborted

    def close(self, book: ResultsBook, todo: Sequence[RowJob], dead: Sequence[str], before: int,
              runner: str) -> BatchSummary:
        """Fill in how the batch ended (rows left in ``todo`` had no ``runner`` left) and write the results."""
        book.write()
        if todo:
            self.aborted = f"no {runner} is left to run the remaining rows: " + "; ".join(dead)
            self.pending = [job.key for job in todo]
        self.done = sum(1 for key in book.keys if book.is_done(key)) - before
        self.failed = {k: v for k, v in book.failed.items() if not book.is_done(k) and k not in self.pending}
        self.results = book.out / "results.csv"
        return self

    def lines(self) -> list[str]:
        """What the CLI prints at the end."""
        out = [f"rows: {self.total}; finished now: {self.done}; finished before: {self.skipped}; "
               f"failed: {len(self.failed)}; not run: {len(self.pending)}", f"results: {self.results}"]
        out += [f"FAILED {key}: {error}" for key, error in self.failed.items()]
        if self.aborted:
            out.append(f"STOPPED: {self.aborted}")
        if not self.ok:
            out.append("Finished rows are kept; run the same command again to retry the rest.")
        return out


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the whole batch: two runs on one folder would clear each other's partial rows.

    A ``flock`` is released by the kernel when its holder dies, even by SIGKILL, so a killed run never
    blocks the next one.
    """
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another run is writing into {out}; wait for it or use another --out") from None
        handle.write(str(os.getpid()))
        handle.flush()
        yield


class Progress:
    """A tqdm bar over rows when tqdm is installed (ComfyUI requires it), plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count, self.failed = total, 0, 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="row", desc="rows", dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, key: str, ok: bool, server: str) -> None:
        self.count += 1
        self.failed += 0 if ok else 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(failed=self.failed, refresh=False)
        else:
            logger.info("row %d/%d %s %s on %s", self.count, self.total, key, "done" if ok else "FAILED", server)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_batch(jobs: Sequence[RowJob | BatchJob], book: ResultsBook, workers: Sequence[Worker], *, retries: int = 1,
              timeout: float = 3600.0, progress: bool = True) -> BatchSummary:
    """Run every job not yet done in ``book`` on ``workers``; see the module docstring.

    A :class:`~.batching.BatchJob` (``--batch-size``) runs its rows in one graph. If it fails, its rows go back
    to the queue one by one (not counted as an attempt: a bad radiograph must not cost its neighbours a try);
    if its server went down, the batch goes back whole.
    """
    todo: deque[RowJob | BatchJob] = deque(j for j in (_not_done(job, book) for job in jobs) if j is not None)
    before = sum(1 for key in book.keys if book.is_done(key))
    summary = BatchSummary(total=len(book.keys), done=0, skipped=before, results=book.out)
    bar = Progress(sum(len(j.rows) if isinstance(j, BatchJob) else 1 for j in todo), progress)
    cond = threading.Condition()
    state = {"in_flight": 0}
    dead: list[str] = []

    def next_job() -> RowJob | BatchJob | None:
        with cond:
            while not todo and state["in_flight"]:
                cond.wait()  # a row in flight elsewhere may come back for a retry
            if not todo:
                return None
            state["in_flight"] += 1
            return todo.popleft()

    def finish(again: Sequence[RowJob | BatchJob] = ()) -> None:
        with cond:
            todo.extendleft(reversed(again))
            state["in_flight"] -= 1
            cond.notify_all()

    def attempt(worker: Worker, job: RowJob) -> tuple[list[RowJob | BatchJob], bool]:
        """Run one row; returns (what goes back to the queue, whether this server is down)."""
        try:
            outcome = worker.run(job, timeout=timeout)
        except (ComfyServerError, TimeoutError, OSError) as err:
            kind, message = classify_failure(err, worker.client.is_running)
            if requeue_after_failure(book, job, kind, message, where=worker.client.url, retries=retries):
                return [job], kind == "down"
            bar.step(job.key, False, worker.client.url)
            return [], False
        folder = book.add_success(job, outcome)
        logger.debug("row %s done in %.1f s on %s -> %s", job.key, outcome.elapsed_s, outcome.server, folder)
        bar.step(job.key, True, outcome.server)
        return [], False

    def attempt_batch(worker: Worker, batch: BatchJob) -> tuple[list[RowJob | BatchJob], bool]:
        """Run a batch; a failed one hands its rows back one by one (the whole batch when the server is down)."""
        try:
            outcomes = worker.run_batch(batch, timeout=timeout)
        except (ComfyServerError, TimeoutError, OSError) as err:
            kind, message = classify_failure(err, worker.client.is_running)
            logger.warning("batch of %d rows (%s) failed on %s: %s; %s", len(batch.rows), batch.key,
                           worker.client.url, message,
                           "it goes back whole" if kind == "down" else "its rows run again one at a time")
            return ([batch] if kind == "down" else list(batch.rows)), kind == "down"
        for job, outcome in zip(batch.rows, outcomes, strict=True):
            book.add_success(job, outcome)
            bar.step(job.key, True, outcome.server)
        return [], False

    def serve(worker: Worker) -> None:
        while (job := next_job()) is not None:
            requeue: list[RowJob | BatchJob] = [job]  # what an unexpected error (a bug, a full disk) leaves behind
            down = True
            try:
                requeue, down = attempt_batch(worker, job) if isinstance(job, BatchJob) else attempt(worker, job)
            except BaseException as err:  # noqa: BLE001 - reported, and this thread stops taking rows
                logger.exception("row %s: unexpected error on %s", job.key, worker.client.url)
                dead.append(f"{worker.client.url}: {type(err).__name__}: {err}")
            finally:
                finish(requeue)
            if down:
                logger.error("server %s is down; its rows go to the other servers", worker.client.url)
                if not dead or not dead[-1].startswith(worker.client.url):
                    reason = book.failed.get(job.key, "down") if isinstance(job, RowJob) else "down"
                    dead.append(f"{worker.client.url}: {reason}")
                return

    threads = [threading.Thread(target=serve, args=(w,), name=f"server-{i}", daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    rows_left = [row for job in todo for row in (job.rows if isinstance(job, BatchJob) else [job])]
    return summary.close(book, rows_left, dead, before, "server")


def _not_done(job: RowJob | BatchJob, book: ResultsBook) -> RowJob | BatchJob | None:
    """``job`` without its finished rows (None when all are finished): a batch is planned before it runs."""
    if isinstance(job, RowJob):
        return None if book.is_done(job.key) else job
    return None if all(book.is_done(r.key) for r in job.rows) else job
