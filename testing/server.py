"""Run a real headless ComfyUI as a subprocess and drive it over its HTTP and websocket API.

Used by the end-to-end tests and the demo. Stdlib plus ``websocket-client`` only: this module must not
import ``comfy`` or ``torch`` (the demo imports it outside ComfyUI)::

    with ComfyServer(checkpoints=[ckpt]) as server:
        result = server.run(api_prompt)
        png = result.files("9")[0]

The server gets a private base directory (``--base-directory``) holding links to this pack and to the
given checkpoints, so the host's ComfyUI install, models and outputs are never touched, and an in-memory
database. It listens on 127.0.0.1 only and every request goes there.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

from .paths import PACK_ROOT, require_comfyui

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PACK_NAME = "cxr_counterfactual"
LOG_NAME = "comfyui-server.log"

# Every flag below exists in ComfyUI v0.3.64's comfy/cli_args.py. --cpu keeps it off any GPU (tests must
# not depend on one), --disable-api-nodes keeps it from loading the paid cloud-API nodes, and the
# in-memory database keeps it from writing a user database into the host install.
_FIXED_ARGS = (
    "--cpu",
    "--disable-auto-launch",
    "--disable-api-nodes",
    "--database-url",
    "sqlite:///:memory:",
)


class ComfyServerError(RuntimeError):
    """The server could not be started, died, or answered something unexpected."""


class PromptRejected(ComfyServerError):
    """``POST /prompt`` answered 400: the graph failed ComfyUI's validation and never ran.

    Attributes:
        error: ComfyUI's ``error`` object (``type``, ``message``, ``details``).
        node_errors: ``{node_id: {"errors": [...], "class_type": ..., ...}}`` as ComfyUI sent it.
    """

    def __init__(self, error: Mapping[str, Any], node_errors: Mapping[str, Any]):
        self.error = dict(error) if isinstance(error, Mapping) else {"message": str(error)}
        self.node_errors = dict(node_errors)
        super().__init__(_describe_rejection(self.error, self.node_errors))


class ExecutionFailed(ComfyServerError):
    """The graph was accepted but a node raised while it ran (websocket ``execution_error``)."""

    def __init__(self, prompt_id: str, data: Mapping[str, Any]):
        self.prompt_id = prompt_id
        self.node_id = str(data.get("node_id", ""))
        self.node_type = str(data.get("node_type", ""))
        self.exception_type = str(data.get("exception_type", ""))
        self.exception_message = str(data.get("exception_message", "")).strip()
        self.traceback = "".join(data.get("traceback") or [])
        super().__init__(
            f"node {self.node_id} ({self.node_type}) failed: {self.exception_type}: {self.exception_message}"
        )


class ExecutionInterrupted(ComfyServerError):
    """The run was interrupted (``POST /interrupt``) before it finished."""

    def __init__(self, prompt_id: str, data: Mapping[str, Any]):
        self.prompt_id = prompt_id
        self.node_id = str(data.get("node_id", ""))
        self.node_type = str(data.get("node_type", ""))
        super().__init__(f"run {prompt_id} interrupted at node {self.node_id} ({self.node_type})")


@dataclass(frozen=True)
class ProgressEvent:
    """One websocket ``progress`` message: step ``value`` of ``max`` in ``node``."""

    node: str | None
    value: int
    max: int


@dataclass
class RunResult:
    """What one finished run produced.

    Attributes:
        prompt_id: The id the server ran the graph under.
        outputs: ``GET /history/{id}``'s ``outputs``: ``{node_id: ui_output}`` (e.g. ``{"images": [...]}``).
        progress: Every ``progress`` event of this run, in order.
        executed: Node ids in the order the server reported executing them.
        cached: Node ids the server reused from its cache instead of running.
        folders: ``{"output"|"temp"|"input": Path}`` of the server, to find saved files.
        elapsed_s: Wall time from submission to the end of the run.
    """

    prompt_id: str
    outputs: dict[str, Any]
    progress: list[ProgressEvent] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    folders: dict[str, Path] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def files(self, node_id: str, key: str = "images") -> list[Path]:
        """Paths on disk of the files node ``node_id`` saved under ``key`` (SaveImage: ``images``).

        Raises:
            KeyError: The node has no UI output in this run.
        """
        node_out = self.outputs[str(node_id)]
        paths = []
        for item in node_out.get(key, []):
            folder = self.folders[item.get("type", "output")]
            paths.append(folder / item.get("subfolder", "") / item["filename"])
        return paths


def _describe_rejection(error: Mapping[str, Any], node_errors: Mapping[str, Any]) -> str:
    """One readable line per problem: the prompt-level message, then each node's errors."""
    lines = [f"prompt rejected: {error.get('message', 'invalid prompt')}"]
    if error.get("details"):
        lines[0] += f" ({error['details']})"
    for node_id, info in node_errors.items():
        class_type = info.get("class_type", "?")
        for err in info.get("errors", []):
            detail = f": {err['details']}" if err.get("details") else ""
            lines.append(f"  node {node_id} ({class_type}): {err.get('message', '')}{detail}")
    return "\n".join(lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux SIGTERM the server when the process that started it dies.

    ``atexit`` does not run when the test process is killed by a signal (e.g. ``timeout`` sending
    SIGTERM); the kernel's parent-death signal still does. It fires when the *thread* that started the
    server ends, so start servers from a long-lived thread (the main one, as pytest fixtures do).
    None off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    # Loaded here, in the parent: after fork only the C call runs, taking no Python import locks that
    # another thread of the parent (torch's, pytest's) might have held at fork time.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _link(target: Path, link: Path) -> None:
    """Make ``link`` a symlink to ``target``, replacing an older link of the same name."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            raise ComfyServerError(f"{link} exists and is a real folder; refusing to replace it")
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


class ComfyServer:
    """A headless ComfyUI subprocess with a private base directory, driven over its API.

    Args:
        comfyui_path: ComfyUI's folder (holding ``main.py``); default :func:`~.paths.require_comfyui`.
        checkpoints: Files linked into ``<base>/models/checkpoints/`` under their own names.
        base_dir: The server's ``--base-directory``; default a new temporary folder. It is never deleted
            here, so outputs and the log stay readable after :meth:`stop`.
        python: Interpreter that runs ComfyUI; default ``sys.executable``.
        port: Port on 127.0.0.1; default a free one.
        extra_args: More ComfyUI command-line arguments.
        link_pack: Link this pack into ``<base>/custom_nodes/`` (default True).
        startup_timeout: Seconds to wait for ``GET /object_info`` to answer.
        env: Environment of the subprocess; default this process's.
    """

    def __init__(
        self,
        comfyui_path: Path | None = None,
        *,
        checkpoints: Sequence[Path] = (),
        base_dir: Path | None = None,
        python: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        link_pack: bool = True,
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ):
        self.comfyui_path = Path(comfyui_path) if comfyui_path is not None else require_comfyui()
        self.checkpoints = [Path(p) for p in checkpoints]
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="cxr-comfy-"))
        self.python = python or sys.executable
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.link_pack = link_pack
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env is not None else dict(os.environ)
        self.log_path = self.base_dir / LOG_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        # urllib honours http_proxy from the environment; the server is local, so never use a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ---- folders and state -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base HTTP address, e.g. ``http://127.0.0.1:8188``."""
        return f"http://{HOST}:{self.port}"

    @property
    def folders(self) -> dict[str, Path]:
        """The server's ``input``, ``output`` and ``temp`` folders (under the base directory)."""
        return {name: self.base_dir / name for name in ("input", "output", "temp")}

    @property
    def pid(self) -> int | None:
        """The server process id, None before :meth:`start`."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- start / stop ------------------------------------------------------------------------------

    def _prepare_base(self) -> None:
        """Create the base folders and link the pack and the checkpoints into them."""
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.link_pack:
            _link(PACK_ROOT, self.base_dir / "custom_nodes" / PACK_NAME)
        for ckpt in self.checkpoints:
            if not ckpt.is_file():
                raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
            _link(ckpt, self.base_dir / "models" / "checkpoints" / ckpt.name)

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            self.python,
            "main.py",
            *_FIXED_ARGS,
            "--listen",
            HOST,
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            *self.extra_args,
        ]

    def start(self) -> ComfyServer:
        """Start the server and wait until ``GET /object_info`` answers.

        Raises:
            ComfyServerError: The process exited, or did not answer within ``startup_timeout``; the
                message holds the end of its log.
        """
        if self.is_running():
            return self
        self._prepare_base()
        env = {**self.env, "PYTHONUNBUFFERED": "1"}  # log lines reach the file as they happen
        cmd = self.command()
        logger.info("starting ComfyUI: %s (log: %s)", " ".join(cmd), self.log_path)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.comfyui_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        # No server may outlive the Python process that started it: atexit for a normal exit, the
        # parent-death signal (above) for a killed one.
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        start = time.monotonic()
        deadline = start + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.is_running():
                raise ComfyServerError(
                    f"ComfyUI exited with code {self._proc.returncode if self._proc else '?'} before it "
                    f"answered; log {self.log_path}:\n{self._log_tail()}"
                )
            try:
                self._request("GET", "/object_info", timeout=10)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
                continue
            logger.info("ComfyUI answers on %s after %.1f s", self.url, time.monotonic() - start)
            return
        raise ComfyServerError(
            f"ComfyUI did not answer {self.url}/object_info within {self.startup_timeout:.0f} s; "
            f"log {self.log_path}:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout`` s) and reap it. Idempotent."""
        atexit.unregister(self.stop)
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        logger.info("stopping ComfyUI (pid %d)", proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("ComfyUI (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(timeout=timeout)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- HTTP --------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """Send one request to the server; the JSON answer (None when the body is empty)."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with self._opener.open(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every registered node class and its inputs and outputs."""
        return self._request("GET", "/object_info")

    def history(self, prompt_id: str) -> dict[str, Any]:
        """``GET /history/{prompt_id}``: the entry of that run, ``{}`` when it is unknown or unfinished."""
        return self._request("GET", f"/history/{prompt_id}").get(prompt_id, {})

    def upload_input(self, path: Path, name: str | None = None) -> str:
        """Copy ``path`` into the server's input folder; returns the name graphs use (e.g. LoadImage).

        The server runs on this machine with a known base directory, so a file copy does what
        ``POST /upload/image`` would, for any file type.
        """
        path = Path(path)
        name = name or path.name
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"input name {name!r} must be a plain file name")
        target = self.folders["input"] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return name

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only ``prompt_id`` when given)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self._request("POST", "/interrupt", body)

    # ---- running graphs ----------------------------------------------------------------------------

    def run(
        self,
        prompt: Mapping[str, Any],
        timeout: float = 600.0,
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> RunResult:
        """Queue an API-format graph, follow it over the websocket until it ends, return its outputs.

        Args:
            prompt: The graph in API format (``{node_id: {"class_type": ..., "inputs": {...}}}``).
            timeout: Seconds the whole run may take; past it the run is interrupted.
            on_progress: Called with every :class:`ProgressEvent` of this run as it arrives.

        Raises:
            PromptRejected: The server refused the graph (HTTP 400), e.g. a widget value not in its list.
            ExecutionFailed: A node raised while running.
            ExecutionInterrupted: The run was interrupted.
            TimeoutError: The run did not finish within ``timeout``.
            ComfyServerError: The server is not running or died during the run.
        """
        if not self.is_running():
            raise ComfyServerError("the ComfyUI server is not running (call start() first)")
        client_id = uuid.uuid4().hex
        prompt_id = str(uuid.uuid4())
        started = time.monotonic()
        # Connect before queueing, so no message of this run can be sent before we listen.
        # The handshake gets a generous timeout (a busy 2-core machine can take seconds to answer); reads
        # then poll every second so the run's own deadline is checked.
        ws = websocket.create_connection(
            f"ws://{HOST}:{self.port}/ws?clientId={client_id}", timeout=60.0, http_no_proxy=[HOST]
        )
        ws.settimeout(1.0)
        try:
            self._submit(prompt, prompt_id, client_id)
            result = RunResult(prompt_id=prompt_id, outputs={}, folders=self.folders)
            self._follow(ws, result, started + timeout, on_progress)
        finally:
            ws.close()
        result.outputs = self._wait_history(prompt_id).get("outputs", {})
        result.elapsed_s = time.monotonic() - started
        return result

    def _submit(self, prompt: Mapping[str, Any], prompt_id: str, client_id: str) -> None:
        body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        try:
            self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", errors="replace")
            if err.code != 400:
                raise ComfyServerError(f"POST /prompt answered {err.code}: {text}") from err
            try:
                answer = json.loads(text)
            except json.JSONDecodeError:
                raise ComfyServerError(f"POST /prompt answered 400 with non-JSON: {text}") from err
            raise PromptRejected(answer.get("error", {}), answer.get("node_errors", {})) from None

    def _follow(
        self,
        ws: websocket.WebSocket,
        result: RunResult,
        deadline: float,
        on_progress: Callable[[ProgressEvent], None] | None,
    ) -> None:
        """Read websocket messages until the server reports this run finished (``executing`` None)."""
        failure: ComfyServerError | None = None
        while True:
            message = self._receive(ws, result.prompt_id, deadline)
            if message is None:
                continue
            kind, data = message
            if kind == "executing":
                if data.get("node") is None:
                    break  # sent after the history entry is written: the run is over
                result.executed.append(str(data["node"]))
            elif kind == "progress":
                event = ProgressEvent(node=data.get("node"), value=int(data["value"]), max=int(data["max"]))
                result.progress.append(event)
                if on_progress is not None:
                    on_progress(event)
            elif kind == "execution_cached":
                result.cached.extend(str(n) for n in data.get("nodes", []))
            elif kind == "execution_error":
                failure = ExecutionFailed(result.prompt_id, data)
            elif kind == "execution_interrupted":
                failure = ExecutionInterrupted(result.prompt_id, data)
        if failure is not None:
            raise failure

    def _receive(self, ws: websocket.WebSocket, prompt_id: str, deadline: float) -> tuple[str, dict] | None:
        """The next JSON message about ``prompt_id``; None for anything else or a quiet second."""
        if time.monotonic() > deadline:
            self._abandon(prompt_id)
        if not self.is_running():
            raise ComfyServerError(f"ComfyUI died during run {prompt_id}; log tail:\n{self._log_tail()}")
        try:
            frame = ws.recv()
        except websocket.WebSocketTimeoutException:
            return None  # quiet second: loop to re-check the deadline and the process
        except websocket.WebSocketConnectionClosedException as err:
            raise ComfyServerError(f"websocket closed during run {prompt_id}") from err
        if not isinstance(frame, str):
            return None  # binary frames are preview images
        message = json.loads(frame)
        data = message.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            return None
        return message.get("type", ""), data

    def _abandon(self, prompt_id: str) -> None:
        """Interrupt a run that exceeded its time, so the server is free again, and raise."""
        try:
            self.interrupt(prompt_id)
        except (urllib.error.URLError, OSError):
            logger.warning("could not interrupt run %s", prompt_id)
        raise TimeoutError(f"run {prompt_id} did not finish in time; it was interrupted")

    def _wait_history(self, prompt_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The history entry of a finished run (written just before ``executing`` None is sent)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry or time.monotonic() > deadline:
                if not entry:
                    raise ComfyServerError(f"no history for finished run {prompt_id}")
                return entry
            time.sleep(0.1)
