"""Run a node in-process as ComfyUI does, its inputs filled from the node's own schema.

A test names only the inputs it sets or changes: every other input takes the default the node declares (what
a freshly placed node in the ComfyUI editor holds), an optional input without a default is left unconnected
(None). The same rule fills API graphs (tests/api_graph.py) from a server's ``/object_info``, which ComfyUI
builds from the same ``INPUT_TYPES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def input_defaults(input_types: Mapping[str, Any]) -> dict[str, Any]:
    """Every input of an ``INPUT_TYPES()`` / ``/object_info[...]["input"]`` dict that has a value without a link:
    its declared default, or None for an optional input without one. Required inputs without a default (links,
    combos without a default) are left out: the caller must give them."""
    out: dict[str, Any] = {}
    for kind in ("required", "optional"):
        for name, spec in input_types.get(kind, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            if options.get("default") is not None:
                out[name] = options["default"]
            elif kind == "optional":
                out[name] = None
    return out


def known_inputs(input_types: Mapping[str, Any]) -> set[str]:
    return {name for kind in ("required", "optional") for name in input_types.get(kind, {})}


def fill(input_types: Mapping[str, Any], what: str, **overrides: Any) -> dict[str, Any]:
    """The defaults of ``input_types`` with ``overrides``; an override naming no input is a test's typo."""
    unknown = set(overrides) - known_inputs(input_types)
    assert not unknown, f"{what} has no inputs {sorted(unknown)}"
    return {**input_defaults(input_types), **overrides}


def node_inputs(cls, **overrides: Any) -> dict[str, Any]:
    """Every input of node class ``cls``: its schema's defaults, with ``overrides``."""
    return fill(cls.INPUT_TYPES(), cls.__name__, **overrides)


def run_node(cls, hidden: Mapping | None = None, **inputs: Any):
    """Execute V3 node ``cls`` as ComfyUI's executor does (a class clone holding the ``hidden`` inputs) with
    :func:`node_inputs`; the whole ``NodeOutput`` (``.result``, ``.ui``)."""
    return cls.PREPARE_CLASS_CLONE(dict(hidden or {})).execute(**node_inputs(cls, **inputs))


def run(cls, **inputs: Any) -> tuple:
    """The outputs of :func:`run_node` (``NodeOutput.result``), a tuple in the schema's output order."""
    return run_node(cls, **inputs).result
