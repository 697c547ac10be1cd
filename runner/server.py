"""Run a real headless ComfyUI as a subprocess and drive it over its HTTP and websocket API.

Used by the end-to-end tests and the demo. Stdlib plus ``websocket-client`` only: this module must not
import ``comfy`` or ``torch`` (the demo imports it outside ComfyUI)::

    with ComfyServer(checkpoints=[ckpt]) as server:
        result = server.run(api_prompt)
        png = result.files("9")[0]

The server gets a private base directory (``--base-directory``) holding links to this pack and to the
given checkpoints, so the host's ComfyUI install, models and outputs are never touched, and an in-memory
database. It listens on 127.0.0.1 only and every request goes there. The HTTP and websocket side is
:class:`~cxr_counterfactual.runner.client.ComfyClient` (shared with the headless runner, which also talks to
remote servers); this module adds the process, and file copies in place of uploads and downloads.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .client import ComfyClient
from .comfyui_path import PACK_ROOT, require_comfyui
from .protocol import ComfyServerError, ServerUnreachable

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PACK_NAME = "cxr_counterfactual"
LOG_NAME = "comfyui-server.log"

# Every flag below exists in ComfyUI v0.3.64's comfy/cli_args.py. --disable-api-nodes keeps it from loading
# the paid cloud-API nodes, and the in-memory database keeps it from writing a user database into the host
# install. --cpu (on unless cpu=False) keeps tests off any GPU: they must not depend on one.
_FIXED_ARGS = (
    "--disable-auto-launch",
    "--disable-api-nodes",
    "--database-url",
    "sqlite:///:memory:",
)


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


class ComfyServer(ComfyClient):
    """A headless ComfyUI subprocess with a private base directory, driven over its API.

    Args:
        comfyui_path: ComfyUI's folder (holding ``main.py``); default :func:`~.paths.require_comfyui`.
        checkpoints: Files linked into ``<base>/models/checkpoints/`` under their own names.
        models: More model files: folder name → files linked into ``<base>/models/<folder>/`` (e.g.
            ``{"cxr_classifiers": [densenet]}``).
        base_dir: The server's ``--base-directory``; default a new temporary folder. It is never deleted
            here, so outputs and the log stay readable after :meth:`stop`.
        python: Interpreter that runs ComfyUI; default ``sys.executable``.
        port: Port on 127.0.0.1; default a free one.
        extra_args: More ComfyUI command-line arguments.
        link_pack: Link this pack into ``<base>/custom_nodes/`` (default True).
        startup_timeout: Seconds to wait for ``GET /object_info`` to answer.
        env: Environment of the subprocess; default this process's.
        cpu: Pass ``--cpu`` (default True: tests must not depend on a GPU; the runner turns it off on GPUs).
    """

    def __init__(
        self,
        comfyui_path: Path | None = None,
        *,
        checkpoints: Sequence[Path] = (),
        models: Mapping[str, Sequence[Path]] | None = None,
        base_dir: Path | None = None,
        python: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        link_pack: bool = True,
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        cpu: bool = True,
    ):
        self.comfyui_path = Path(comfyui_path) if comfyui_path is not None else require_comfyui()
        self.checkpoints = [Path(p) for p in checkpoints]
        self.models = {"checkpoints": self.checkpoints, **{k: [Path(p) for p in v] for k, v in (models or {}).items()}}
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="cxr-comfy-"))
        self.python = python or sys.executable
        self.port = port or free_port()
        super().__init__(self.url)
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.link_pack = link_pack
        self.startup_timeout = startup_timeout
        self.env = dict(env) if env is not None else dict(os.environ)
        self.log_path = self.base_dir / LOG_NAME
        self._proc: subprocess.Popen[bytes] | None = None

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
        """Create the base folders and link the pack, the checkpoints and other model files into them."""
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.link_pack:
            _link(PACK_ROOT, self.base_dir / "custom_nodes" / PACK_NAME)
        for folder, files in self.models.items():
            for path in files:
                if not path.is_file():
                    raise FileNotFoundError(f"{folder} file {path} does not exist")
                _link(path, self.base_dir / "models" / folder / path.name)

    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            self.python,
            "main.py",
            *(("--cpu",) if self.cpu else ()),
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
            except (ServerUnreachable, ConnectionError, TimeoutError, OSError):
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

    # ---- files (the server is on this machine: copy instead of HTTP) -------------------------------

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

    def upload_bytes(self, name: str, data: bytes) -> str:
        """Write ``data`` into the server's input folder as ``name``; returns the name graphs use."""
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"input name {name!r} must be a plain file name")
        target = self.folders["input"] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # a graph never sees half a file
        return name

    def fetch(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        """The bytes of a file the server wrote, read from its folder (``kind``: output, temp or input)."""
        folder = self.folders[kind]
        path = (folder / subfolder / filename).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ValueError(f"{subfolder}/{filename} is outside the server's {kind} folder")
        return path.read_bytes()
