"""Where ComfyUI's executor is running, for the audit trail: measurements are noted under the current prompt and node.

ComfyUI 0.3.64 sets ``comfy_execution.utils.get_executing_context()`` (prompt id, node id) around every node's
``execute``, also while a sampler node samples; outside the executor (a script, a test calling a node) it is None
and nothing is noted. The journal keeps the last prompts' notes only (:class:`~...imaging.provenance.Journal`).
"""

from __future__ import annotations

import logging
from typing import Any

from comfy_execution.utils import get_executing_context

from ...imaging.provenance import Journal

logger = logging.getLogger("cxr_counterfactual")

JOURNAL = Journal()


def current() -> tuple[str, str] | None:
    """(prompt id, node id) of the node ComfyUI is running now, or None outside the executor."""
    ctx = get_executing_context()
    return None if ctx is None else (str(ctx.prompt_id), str(ctx.node_id))


def note(key: str, value: Any) -> None:
    """Record a measurement of the running node for the export's audit trail (no-op outside the executor)."""
    where = current()
    if where is not None:
        JOURNAL.note(*where, key, value)
