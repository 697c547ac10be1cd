"""A ComfyUI server's API, as a client: submit a graph, follow it over the websocket, move files in and out.

Stdlib plus ``websocket-client`` only (no ``comfy``, no ``torch``). :class:`ComfyClient` talks to a server
that runs elsewhere (``--server http://host:8188``); :class:`~cxr_counterfactual.runner.server.ComfyServer`
extends it with a private subprocess. Requests never go through a proxy from the environment: the runner
talks only to the servers it is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import websocket

from .protocol import (
    ComfyServerError,
    ExecutionFailed,
    ExecutionInterrupted,
    ProgressEvent,
    PromptRejected,
    RunResult,
    ServerUnreachable,
)

logger = logging.getLogger(__name__)


def _multipart(fields: Mapping[str, str], file_field: str, file_name: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body (what ``POST /upload/image`` reads) and its content type."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{file_name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ComfyClient:
    """A running ComfyUI server at ``url`` (e.g. ``http://127.0.0.1:8188``), driven over its API."""

    def __init__(self, url: str):
        self._url = url.rstrip("/")
        # urllib honours http_proxy from the environment; the runner must reach exactly the given server.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        """Base HTTP address, e.g. ``http://127.0.0.1:8188``."""
        return self._url

    @property
    def folders(self) -> dict[str, Path]:
        """Local folders of the server ({}: a remote server's files are reached over HTTP)."""
        return {}

    def is_running(self) -> bool:
        """True unless we know the server is gone (a remote one is checked by its answers)."""
        return True

    def _log_tail(self, lines: int = 60) -> str:
        return "(the server's log is on its own machine)"

    # ---- HTTP --------------------------------------------------------------------------------------

    def _open(self, request: urllib.request.Request, timeout: float) -> bytes:
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise  # the server answered: callers read the status
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServerUnreachable(f"ComfyUI at {self.url} did not answer: {reason}") from err

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """Send one request to the server; the JSON answer (None when the body is empty)."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        raw = self._open(request, timeout)
        return json.loads(raw) if raw.strip() else None

    def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every registered node class and its inputs and outputs."""
        return self._request("GET", "/object_info")

    def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats``: the server's ComfyUI version (``system.comfyui_version``), Python, devices."""
        return self._request("GET", "/system_stats")

    def history(self, prompt_id: str) -> dict[str, Any]:
        """``GET /history/{prompt_id}``: the entry of that run, ``{}`` when it is unknown or unfinished."""
        return self._request("GET", f"/history/{prompt_id}").get(prompt_id, {})

    def clear_history(self) -> None:
        """``POST /history {"clear": true}``: forget every finished run (outputs on disk stay)."""
        self._request("POST", "/history", {"clear": True})

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only ``prompt_id`` when given)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self._request("POST", "/interrupt", body)

    def upload_bytes(self, name: str, data: bytes) -> str:
        """Put ``data`` into the server's input folder as ``name`` (``POST /upload/image``, any file type).

        Returns the name graphs use. An existing file of that name is replaced (``overwrite``): callers
        name uploads by content, so a same-named file holds the same bytes.
        """
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"input name {name!r} must be a plain file name")
        body, content_type = _multipart({"type": "input", "overwrite": "true"}, "image", name, data)
        request = urllib.request.Request(self.url + "/upload/image", data=body, method="POST")
        request.add_header("Content-Type", content_type)
        answer = json.loads(self._open(request, timeout=300))
        return str(answer["name"])

    def fetch(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        """The bytes of a file the server wrote (``GET /view``; ``kind`` is output, temp or input)."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        return self._open(urllib.request.Request(f"{self.url}/view?{query}"), timeout=300)

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
            ComfyServerError: The server is not running, cannot be reached or died during the run.
        """
        if not self.is_running():
            raise ComfyServerError("the ComfyUI server is not running (call start() first)")
        client_id = uuid.uuid4().hex
        prompt_id = str(uuid.uuid4())
        started = time.monotonic()
        # Connect before queueing, so no message of this run can be sent before we listen. The handshake
        # gets a generous timeout (a busy 2-core machine can take seconds to answer); reads then poll
        # every second so the run's own deadline is checked.
        host = urllib.parse.urlsplit(self.url).hostname or ""
        ws_url = "ws" + self.url[len("http"):] + f"/ws?clientId={client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=60.0, http_no_proxy=[host])
        except (OSError, websocket.WebSocketException) as err:
            raise ServerUnreachable(f"ComfyUI at {self.url} refused the websocket: {err}") from err
        ws.settimeout(1.0)
        try:
            self._submit(prompt, prompt_id, client_id)
            result = RunResult(prompt_id=prompt_id, outputs={}, folders=self.folders)
            self._follow(ws, result, started + timeout, on_progress)
        finally:
            ws.close()
        result.outputs = self._wait_history(prompt_id).get("outputs", {})
        self._forget(prompt_id)
        result.elapsed_s = time.monotonic() - started
        return result

    def _forget(self, prompt_id: str) -> None:
        """Delete a finished run's history entry once read: ComfyUI keeps up to 10,000 of them in memory (graph,
        outputs, status messages: kilobytes each), so a dataset batch would grow the server by that per row
        (benchmarks/soak.py). Best effort: the outputs are already read, and the files stay on disk."""
        try:
            self._request("POST", "/history", {"delete": [prompt_id]})
        except (urllib.error.URLError, OSError) as err:
            logger.debug("could not delete the history entry of %s: %s", prompt_id, err)

    def _submit(self, prompt: Mapping[str, Any], prompt_id: str, client_id: str) -> None:
        body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        try:
            answer = self._request("POST", "/prompt", body) or {}
            if answer.get("node_errors"):
                # ComfyUI queues a graph when at least one output node is valid and runs only those: for us a
                # graph with an invalid node is a broken graph. Take it back off the queue (or stop it) and
                # report it as refused.
                with contextlib.suppress(urllib.error.URLError, OSError):
                    self._request("POST", "/queue", {"delete": [prompt_id]})
                    self.interrupt(prompt_id)
                raise PromptRejected({"message": "some nodes failed validation (the rest would have run)"},
                                     answer["node_errors"])
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", errors="replace")
            if err.code != 400:
                raise ComfyServerError(f"POST /prompt answered {err.code}: {text}") from err
            try:
                answer = json.loads(text)
            except json.JSONDecodeError:
                raise ComfyServerError(f"POST /prompt answered 400 with non-JSON: {text}") from err
            raise PromptRejected(answer.get("error", {}), answer.get("node_errors", {})) from None

    def _follow(self, ws: websocket.WebSocket, result: RunResult, deadline: float,
                on_progress: Callable[[ProgressEvent], None] | None) -> None:
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
                failure.executed = list(result.executed)
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
        except (websocket.WebSocketConnectionClosedException, ConnectionError) as err:
            raise ServerUnreachable(f"websocket to {self.url} closed during run {prompt_id}") from err
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
        except (ComfyServerError, urllib.error.URLError, OSError):
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
