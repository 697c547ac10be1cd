"""Import ComfyUI outside ComfyUI (the commands, the tests and the benchmarks build and load models in
their own process)."""

from __future__ import annotations

import sys
from pathlib import Path


def prepare_comfy_import(comfyui_path: Path | None = None) -> Path:
    """Make ``import comfy`` work in this process, on the CPU.

    Puts ComfyUI's folder (``comfyui_path``, else
    :func:`~cxr_counterfactual.runner.comfyui_path.require_comfyui`) first on ``sys.path``
    unless it is already there, and sets ``comfy.cli_args.args.cpu = True``: that flag only takes effect
    when set before anything imports ``comfy.model_management``.

    Returns:
        ComfyUI's folder.
    """
    if comfyui_path is None:
        from ...runner.comfyui_path import require_comfyui

        comfyui_path = require_comfyui()
    root = Path(comfyui_path)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return root

