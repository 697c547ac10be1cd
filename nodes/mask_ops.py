"""Nodes that select, combine, grow/shrink/feather organ masks and define edit and keep regions.

Each works image by image on a batch's masks (one set per image): its MASK outputs then hold one mask per image.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.mask_batch import AnyOrganMasks, batch_masks, each_image, map_each_image, mask_sets
from ..attention.organs import OrganMasks, edit_and_keep, parse_names
from .common import check_inputs, user_errors
from .schema import CATEGORY_MASKS, described, organ_masks_input, organ_masks_output

OPERATIONS = ("dilate", "erode", "feather")
_ORGANS_TIP = "Organ names, comma-separated (e.g. 'left_lung, heart'); right/left are the patient's sides."


def _masks_in() -> io.Input:
    return organ_masks_input("The organ masks to work on (one set, or one per image of a batch).")


def _masks_out(tip: str = "The resulting organ masks (the input bundle is left unchanged).") -> io.Output:
    return organ_masks_output(tip)


class CXRSelectOrgans(io.ComfyNode):
    """Keeps only the named organs of a bundle, in the given order."""

    TITLE = "Select Organs"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRSelectOrgans", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[_masks_in(), io.String.Input("organs", default="right_lung, left_lung", tooltip=_ORGANS_TIP)],
            outputs=[_masks_out()],
        )

    @classmethod
    def execute(cls, organ_masks: AnyOrganMasks, organs: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "organs"):
            names = parse_names(organs)
            return io.NodeOutput(map_each_image(organ_masks, lambda m: m.select(names)))


class CXRCombineOrgans(io.ComfyNode):
    """Adds a new named region: the union of 'organs' minus the union of 'subtract' (e.g. lungs = right_lung,
    left_lung; or left_lung minus heart)."""

    TITLE = "Combine Organs"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRCombineOrgans", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[
                _masks_in(),
                io.String.Input("organs", default="right_lung, left_lung", tooltip=_ORGANS_TIP + " United."),
                io.String.Input("subtract", default="", tooltip="Organs taken out of the union (may be empty)."),
                io.String.Input("name", default="lungs", tooltip="Name of the new region in the bundle."),
            ],
            outputs=[
                _masks_out("The input organs plus the new region."),
                io.Mask.Output(display_name="mask",
                               tooltip="The new region as a ComfyUI MASK [B, H, W] (one per image)."),
            ],
        )

    @classmethod
    def execute(cls, organ_masks: AnyOrganMasks, organs: str, subtract: str, name: str) -> io.NodeOutput:
        def combine(masks: OrganMasks) -> tuple[OrganMasks, torch.Tensor]:
            with user_errors(cls.TITLE, "organs"):
                names = parse_names(organs)
                if subtract.strip():
                    region = masks.subtract(names, parse_names(subtract))
                else:
                    region = masks.union(names)
            with user_errors(cls.TITLE, "name"):
                return masks.with_mask(name, region), region

        out = each_image(mask_sets(organ_masks), combine)
        return io.NodeOutput(batch_masks([b for b, _ in out]), torch.stack([r for _, r in out]))


class CXRMorphOrgans(io.ComfyNode):
    """Grows (dilate) or shrinks (erode) organs by a disk, or softens their borders (feather, Gaussian). Sizes are
    pixels of the masks' own grid."""

    TITLE = "Dilate / Erode / Feather Organs"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRMorphOrgans", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[
                _masks_in(),
                io.String.Input("organs", default="left_lung", tooltip=_ORGANS_TIP + " Empty = every organ."),
                io.Combo.Input(
                    "operation", options=list(OPERATIONS), default="dilate",
                    tooltip="dilate/erode: binary morphology with a disk of the given radius; feather: "
                    "Gaussian blur with sigma = the given size.",
                ),
                io.Float.Input(
                    "size_px", default=8.0, min=0.0, max=512.0, step=0.5,
                    tooltip="Disk radius (dilate/erode, rounded to whole pixels) or Gaussian sigma (feather), "
                    "in pixels of the masks' grid. 0 = no change.",
                ),
            ],
            outputs=[_masks_out()],
        )

    @classmethod
    def execute(cls, organ_masks: AnyOrganMasks, organs: str, operation: str, size_px: float) -> io.NodeOutput:
        check_inputs(cls, operation=operation, size_px=size_px)
        names = parse_names(organs) if organs.strip() else None

        def morph(masks: OrganMasks) -> OrganMasks:
            if operation == "feather":
                return masks.feathered(size_px, names)
            if operation == "erode":
                return masks.eroded(round(size_px), names)
            return masks.dilated(round(size_px), names)

        with user_errors(cls.TITLE, "organs"):
            return io.NodeOutput(map_each_image(organ_masks, morph))


class CXROrganToMask(io.ComfyNode):
    """One organ (or the union of several) as a ComfyUI MASK, for core nodes such as SetLatentNoiseMask or mask
    previews."""

    TITLE = "Organ to MASK"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXROrganToMask", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[_masks_in(), io.String.Input("organs", default="left_lung", tooltip=_ORGANS_TIP + " United.")],
            outputs=[io.Mask.Output(display_name="mask", tooltip="MASK [B, H, W] on the masks' grid (one per image).")],
        )

    @classmethod
    def execute(cls, organ_masks: AnyOrganMasks, organs: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "organs"):
            names = parse_names(organs)
            return io.NodeOutput(torch.stack(each_image(mask_sets(organ_masks), lambda m: m.union(names))))


class CXREditKeepRegions(io.ComfyNode):
    """Defines where the counterfactual may change the radiograph (edit) and where the patient's own anatomy is kept
    (keep = 1 − edit): the target organs grown by a margin, minus protected organs, with a feathered border. Feed
    'edit_region' to SetLatentNoiseMask."""

    TITLE = "Edit / Keep Regions"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXREditKeepRegions", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[
                _masks_in(),
                io.String.Input("edit_organs", default="left_lung", tooltip=_ORGANS_TIP + " Where the edit goes."),
                io.Int.Input(
                    "margin_px", default=16, min=0, max=512,
                    tooltip="Grow the edit region by this many pixels (masks' grid) so a lesion can reach the "
                    "organ's border.",
                ),
                io.Float.Input(
                    "feather_px", default=8.0, min=0.0, max=256.0, step=0.5,
                    tooltip="Gaussian sigma (pixels) of the edit region's border: a soft blend leaves no seam.",
                ),
                io.String.Input(
                    "protect", default="heart",
                    tooltip="Organs never edited, however far the margin reaches (may be empty).",
                ),
            ],
            outputs=[
                io.Mask.Output(
                    display_name="edit_region",
                    tooltip="MASK [B, H, W] (one per image): 1 where the edit may change the image."
                ),
                io.Mask.Output(display_name="keep_region",
                               tooltip="MASK [B, H, W] (one per image): 1 where the patient is kept."),
                _masks_out("The input organs plus 'edit' and 'keep' regions."),
            ],
        )

    @classmethod
    def execute(
        cls, organ_masks: AnyOrganMasks, edit_organs: str, margin_px: int, feather_px: float, protect: str
    ) -> io.NodeOutput:
        check_inputs(cls, feather_px=feather_px)

        def regions(masks: OrganMasks) -> tuple[torch.Tensor, torch.Tensor, OrganMasks]:
            edit, keep = edit_and_keep(
                masks,
                parse_names(edit_organs),
                margin_px=margin_px,
                feather_px=feather_px,
                protect=parse_names(protect) if protect.strip() else (),
            )
            return edit, keep, masks.with_mask("edit", edit).with_mask("keep", keep)

        with user_errors(cls.TITLE, "edit_organs"):
            out = each_image(mask_sets(organ_masks), regions)
        edit, keep, bundles = zip(*out, strict=True)
        return io.NodeOutput(torch.stack(edit), torch.stack(keep), batch_masks(bundles))


NODES: list[type[io.ComfyNode]] = [
    CXRSelectOrgans, CXRCombineOrgans, CXRMorphOrgans, CXROrganToMask, CXREditKeepRegions
]
