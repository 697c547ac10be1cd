"""ComfyUI nodes (V3 schema). Thin: validate inputs, call the core, return."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    from . import dicom, geometry, mask_ops, masks, preview

    return [*dicom.NODES, *masks.NODES, *mask_ops.NODES, *preview.NODES, *geometry.NODES]


class CXRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
