"""CXR Counterfactual: anatomically consistent counterfactual chest X-ray editing for ComfyUI.

ComfyUI loads this folder as a custom-node pack and calls :func:`comfy_entrypoint` (V3 schema). The
same folder is the installable package ``cxr_counterfactual`` (``pip install .``); importing it outside
ComfyUI must not import ``comfy``, so the node modules are imported only inside the entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (called by ComfyUI's loader)."""
    from .nodes import CXRExtension

    return CXRExtension()
