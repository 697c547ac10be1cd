"""The export's audit trail from inside ComfyUI: the graph that ran (hidden PROMPT), file hashes, versions and the
measurements nodes noted while it ran. The document itself is built by :mod:`..imaging.provenance`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import folder_paths

from .. import __version__
from ..errors import CXRInputError
from ..hosts.comfy.audit import JOURNAL, current
from ..imaging.provenance import collect, gone, upstream
from ..imaging.weight_files import file_sha256
from .common import resolve_input_file

logger = logging.getLogger("cxr_counterfactual")

_KINDS = {"checkpoints": "checkpoint", "input": "input", "loras": "LoRA", "vae": "VAE", "controlnet": "ControlNet"}


def comfyui_version() -> str | None:
    try:
        from comfyui_version import __version__ as version  # ComfyUI's own version file (on sys.path)
    except ImportError:
        return None
    return str(version)


def hash_file(folder: str, name: str, node_id: str, widget: str) -> str:
    """SHA-256 of the file a widget names (cached per path, size and modification time).

    Raises:
        CXRInputError: the file is gone or unreadable (nothing may be written then).
    """
    kind = _KINDS.get(folder, folder)
    try:
        path = resolve_input_file(name) if folder == "input" else folder_paths.get_full_path(folder, name)
    except CXRInputError:
        path = None
    if path is None:
        raise gone(kind, name, node_id, widget)
    try:
        return file_sha256(Path(path))
    except OSError:
        raise gone(kind, name, node_id, widget) from None


def provenance(prompt: dict[str, Any] | None, node_id: str | None, keep_patient_data: bool) -> dict[str, Any]:
    """The provenance document of export node ``node_id`` in ``prompt`` (see :mod:`..imaging.provenance`).

    Raises:
        CXRInputError: a file the graph names cannot be hashed.
    """
    where = current()
    measured: dict[str, dict[str, Any]] = {}
    if where is not None and prompt:
        JOURNAL.remember(where[0], prompt)
        if node_id is not None and node_id in prompt:
            measured = JOURNAL.measurements(where[0], prompt, upstream(prompt, node_id))
    doc = collect(prompt, node_id, hash_file=hash_file, keep_patient_data=keep_patient_data,
                  versions={"cxr_counterfactual": __version__, "comfyui": comfyui_version()}, measurements=measured)
    if not doc["graph"]["complete"]:
        logger.warning("CXR export: audit trail incomplete: %s", doc["graph"]["problem"])
    return doc
