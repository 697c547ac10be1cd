"""``OUT/batch.json``: what started each batch in an output folder (the report's provenance section).

One entry is appended to ``runs`` at every start of a batch (a resumed batch adds one; nothing is dropped),
written to a temporary file and renamed, so a killed run never leaves a half-written file. Fields of an entry
(documented in docs/runner.md): ``command``, ``argv``, ``workflow``, ``workflow_path``, ``manifest`` (absolute,
or null for a single run turned into one row), ``root`` (the folder the rows' relative paths start from),
``overrides``, ``sweep``, ``started_at``, ``pack_version``, ``comfyui_version``, ``servers``, ``rows``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import graph as g
from .client import ComfyClient
from .manifest import ManifestError
from .protocol import ComfyServerError

logger = logging.getLogger(__name__)

FILE = "batch.json"


def pack_version() -> str | None:
    """The pack's ``__version__`` (its package is imported already: the runner lives in it)."""
    return getattr(sys.modules.get(__name__.rsplit(".", 2)[0]), "__version__", None)


def comfyui_version(client: ComfyClient) -> str | None:
    """The server's ComfyUI version from ``/system_stats``; None when it does not say (or does not answer)."""
    try:
        return (client.system_stats().get("system") or {}).get("comfyui_version")
    except (ComfyServerError, OSError, ValueError, AttributeError) as err:
        logger.debug("%s: no ComfyUI version from /system_stats: %s", client.url, err)
        return None


def workflow_file(name_or_path: str) -> Path:
    """The file :func:`~.graph.load_workflow` reads for ``name_or_path``."""
    path = Path(name_or_path)
    return path.resolve() if path.is_file() else g.SHIPPED / f"{path.stem}.json"


def run_entry(argv: Sequence[str], workflow: str, manifest: Path | None, root: Path,
              overrides: Sequence[str], sweep: Mapping[str, list[str]], rows: int,
              clients: Sequence[ComfyClient]) -> dict[str, Any]:
    """One entry of ``runs`` (see the module docstring)."""
    servers = [{"url": c.url, "comfyui_version": comfyui_version(c)} for c in clients]
    return {"command": shlex.join(["python", "-m", "cxr_counterfactual", "run", *argv]), "argv": list(argv),
            "workflow": workflow, "workflow_path": str(workflow_file(workflow)),
            "manifest": str(manifest.resolve()) if manifest else None, "root": str(root.resolve()),
            "overrides": list(overrides), "sweep": dict(sweep),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pack_version": pack_version(),
            "comfyui_version": next((s["comfyui_version"] for s in servers if s["comfyui_version"]), None),
            "servers": servers, "rows": rows}


def record_run(out: Path, entry: Mapping[str, Any]) -> Path:
    """Append ``entry`` to ``out/batch.json`` (created if absent), atomically.

    Raises:
        ManifestError: the existing file is not a batch.json (it is left as it is).
    """
    path = out / FILE
    runs: list[Any] = []
    if path.is_file():
        try:
            runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"{path} is not a batch provenance file ({err}); move it away to start a new "
                             "record") from None
    tmp = path.with_name(f".batch.{uuid.uuid4().hex[:8]}.json")
    tmp.write_text(json.dumps({"runs": [*runs, dict(entry)]}, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path
