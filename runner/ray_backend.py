"""The batch on a Ray cluster: one actor per GPU (or CPU actors without GPUs), each owning a headless ComfyUI.

Ray places the actors (``num_gpus=1`` gives each its own GPU through ``CUDA_VISIBLE_DEVICES``, which the
ComfyUI subprocess inherits); this module only hands each idle actor the next row and waits with
``ray.wait``. Inputs travel through Ray's object store (put once per file) and outputs come back as bytes,
so the driver alone writes the output folder: the manifest, resume and retry semantics are those of
:mod:`.batch`. Checkpoints and ComfyUI must exist at the same paths on every node.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from .batch import BatchSummary, Progress, classify_failure, requeue_after_failure
from .manifest import RowJob, Upload
from .results import ResultsBook

logger = logging.getLogger(__name__)


class ComfyActorImpl:
    """The body of a Ray actor: a private headless ComfyUI and a :class:`~.worker.Worker` on it."""

    def __init__(self, comfyui: str | None, checkpoints: list[str], cpu: bool, startup_timeout: float = 300.0):
        from .server import ComfyServer
        from .worker import Worker

        self._refs: dict[str, Any] = {}
        started = threading.Event()
        errors: list[BaseException] = []
        base = Path(tempfile.mkdtemp(prefix="cxr-ray-comfy-"))
        self.server = ComfyServer(Path(comfyui) if comfyui else None, checkpoints=[Path(c) for c in checkpoints],
                                  base_dir=base, cpu=cpu, startup_timeout=startup_timeout)

        # The server dies with the thread that started it (parent-death signal): start it from a thread
        # that lives as long as the actor, whichever thread Ray runs this constructor on.
        def keep() -> None:
            try:
                self.server.start()
            except BaseException as err:  # reported to the constructor below
                errors.append(err)
            started.set()
            threading.Event().wait()

        threading.Thread(target=keep, name="comfyui-keeper", daemon=True).start()
        started.wait()
        if errors:
            raise errors[0]
        self.worker = Worker(self.server, read=self._read)

    def _read(self, upload: Upload) -> bytes:
        import ray

        return ray.get(self._refs[upload.name])

    def url(self) -> str:
        return f"{os.uname().nodename} {self.server.url}"

    def run(self, job: RowJob, refs: dict[str, Any], timeout: float) -> tuple[str, Any]:
        """``("ok", RowOutcome)``, or ``(kind, message)`` with kind ``rejected``, ``down`` or ``failed``.

        Errors come back as values: a Ray-wrapped exception may not rebuild our exception classes.
        """
        self._refs.update(refs)
        try:
            return "ok", self.worker.run(job, timeout=timeout)
        except Exception as err:  # noqa: BLE001 - every failure is reported to the driver with its type
            return classify_failure(err, self.server.is_running)

    def stop(self) -> None:
        self.server.stop()


def init_ray(address: str) -> None:
    """Join a cluster (``auto`` or an address), or start a local instance on loopback (``local``).

    A local instance binds 127.0.0.1 only, without the dashboard, and with usage stats off. By default Ray
    binds the machine's outward address, and it resolves ``_node_ip_address="127.0.0.1"`` to that address
    too, unless cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which despite its name applies
    on Linux as well: Ray then takes the loopback address for the node and every process binds it).
    """
    if address == "local":
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported, and by its children
    import ray

    if ray.is_initialized():
        return
    if address != "local":
        ray.init(address=address)
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
    import cxr_counterfactual

    # Workers must import this package the way the driver did (e.g. through a PYTHONPATH link).
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(cxr_counterfactual.__file__)))
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}})
    logger.info("local Ray instance on %s (loopback only)", ray.get_runtime_context().gcs_address)


def run_batch_ray(jobs: list[RowJob], book: ResultsBook, *, actors: int | None, comfyui: Path | None,
                  checkpoints: list[Path], retries: int = 1, timeout: float = 3600.0,
                  progress: bool = True) -> BatchSummary:
    """Run every job not yet done in ``book`` on Ray actors (see the module docstring)."""
    import ray

    todo = deque(job for job in jobs if not book.is_done(job.key))
    before = sum(1 for key in book.keys if book.is_done(key))
    summary = BatchSummary(total=len(book.keys), done=0, skipped=before)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = actors or max(gpus, 1)
    options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    logger.info("starting %d Ray actor(s) with %s, each with its own ComfyUI", count, options)
    actor_cls: Any = ray.remote(ComfyActorImpl).options(**options)  # type: ignore[attr-defined]
    pool: list[Any] = [actor_cls.remote(str(comfyui) if comfyui else None, [str(c) for c in checkpoints], cpu=not gpus)
            for _ in range(count if todo else 0)]
    names = ray.get([a.url.remote() for a in pool])
    refs: dict[str, Any] = {}
    idle: list[tuple[Any, str]] = list(zip(pool, names, strict=True))
    flying: dict[Any, tuple[Any, str, RowJob]] = {}
    dead: list[str] = []
    bar = Progress(len(todo), progress)
    try:
        while todo or flying:
            while idle and todo:
                actor, name = idle.pop()
                job = todo.popleft()
                for up in job.uploads:
                    if up.name not in refs:  # each file enters the object store once
                        refs[up.name] = ray.put(up.path.read_bytes())
                job_refs = {up.name: refs[up.name] for up in job.uploads}
                flying[actor.run.remote(job, job_refs, timeout)] = (actor, name, job)
            if not flying:
                break
            (ready,), _ = ray.wait(list(flying), num_returns=1)
            actor, name, job = flying.pop(ready)
            try:
                kind, value = ray.get(ready)
            except ray.exceptions.RayActorError as err:
                kind, value = "down", f"Ray actor died: {err}"
            if kind == "ok":
                book.add_success(job, value)
                bar.step(job.key, True, name)
                idle.append((actor, name))
                continue
            if requeue_after_failure(book, job, kind, value, where=name, retries=retries):
                todo.appendleft(job)
            else:
                bar.step(job.key, False, name)
            if kind == "down":
                logger.error("actor on %s lost its ComfyUI; its rows go to the others", name)
                dead.append(f"{name}: {value}")
            else:
                idle.append((actor, name))
    finally:
        bar.close()
        for actor in pool:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to stop
                pass
            ray.kill(actor)
    return summary.close(book, todo, dead, before, "Ray actor")
