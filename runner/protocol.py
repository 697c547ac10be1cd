"""What a ComfyUI run reports: its errors, progress events and result (plain data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ComfyServerError(RuntimeError):
    """The server could not be started, died, or answered something unexpected."""


class ServerUnreachable(ComfyServerError):
    """No answer at the server's address (connection refused, reset or timed out)."""


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
        #: Node ids the server reported executing before the failure, in order (the failing one last).
        self.executed: list[str] = []
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
        folders: ``{"output"|"temp"|"input": Path}`` of a local server, to find saved files ({} if remote).
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
        """Paths on disk of the files node ``node_id`` saved under ``key`` (local servers only).

        Raises:
            KeyError: The node has no UI output in this run, or the server is remote.
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
