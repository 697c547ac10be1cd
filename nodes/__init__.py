"""ComfyUI nodes (V3 schema). Thin: validate inputs, call the core, return."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    from . import (
        atlas,
        boosting,
        chexmask,
        classifier,
        dicom,
        evaluate,
        export,
        gating,
        geometry,
        inspect,
        inversion,
        keep,
        mask_ops,
        masks,
        preview,
        refinement,
        segmentation,
        text,
    )

    return [
        *dicom.NODES,
        *masks.NODES,
        *chexmask.NODES,
        *segmentation.NODES,
        *atlas.NODES,
        *mask_ops.NODES,
        *preview.NODES,
        *geometry.NODES,
        *text.NODES,
        *gating.NODES,
        *boosting.NODES,
        *inspect.NODES,
        *refinement.NODES,
        *keep.NODES,
        *inversion.NODES,
        *evaluate.NODES,
        *classifier.NODES,
        *export.NODES,
    ]


class CXRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
