"""Nodes that select, combine, grow/shrink/feather organ masks and define edit and keep regions."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.organs import OrganMasks, edit_and_keep, parse_names
from .common import check_inputs, user_errors
from .schema import CATEGORY_MASKS, described, organ_masks_input, organ_masks_output

OPERATIONS = ("dilate", "erode", "feather")
_ORGANS_TIP = "Organ names, comma-separated (e.g. 'left_lung, heart'); right/left are the patient's sides."


def _masks_in() -> io.Input:
    return organ_masks_input("The organ masks to work on.")


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
    def execute(cls, organ_masks: OrganMasks, organs: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "organs"):
            return io.NodeOutput(organ_masks.select(parse_names(organs)))


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
                io.Mask.Output(display_name="mask", tooltip="The new region as a ComfyUI MASK [1, H, W]."),
            ],
        )

    @classmethod
    def execute(cls, organ_masks: OrganMasks, organs: str, subtract: str, name: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "organs"):
            names = parse_names(organs)
            if subtract.strip():
                region = organ_masks.subtract(names, parse_names(subtract))
            else:
                region = organ_masks.union(names)
        with user_errors(cls.TITLE, "name"):
            return io.NodeOutput(organ_masks.with_mask(name, region), region[None].clone())


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
    def execute(cls, organ_masks: OrganMasks, organs: str, operation: str, size_px: float) -> io.NodeOutput:
        check_inputs(cls, operation=operation, size_px=size_px)
        names = parse_names(organs) if organs.strip() else None
        with user_errors(cls.TITLE, "organs"):
            if operation == "feather":
                return io.NodeOutput(organ_masks.feathered(size_px, names))
            if operation == "erode":
                return io.NodeOutput(organ_masks.eroded(round(size_px), names))
            return io.NodeOutput(organ_masks.dilated(round(size_px), names))


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
            outputs=[io.Mask.Output(display_name="mask", tooltip="MASK [1, H, W] on the masks' grid.")],
        )

    @classmethod
    def execute(cls, organ_masks: OrganMasks, organs: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "organs"):
            return io.NodeOutput(organ_masks.union(parse_names(organs))[None].clone())


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
                    display_name="edit_region", tooltip="MASK [1, H, W]: 1 where the edit may change the image."
                ),
                io.Mask.Output(display_name="keep_region", tooltip="MASK [1, H, W]: 1 where the patient is kept."),
                _masks_out("The input organs plus 'edit' and 'keep' regions."),
            ],
        )

    @classmethod
    def execute(
        cls, organ_masks: OrganMasks, edit_organs: str, margin_px: int, feather_px: float, protect: str
    ) -> io.NodeOutput:
        check_inputs(cls, feather_px=feather_px)
        with user_errors(cls.TITLE, "edit_organs"):
            edit, keep = edit_and_keep(
                organ_masks,
                parse_names(edit_organs),
                margin_px=margin_px,
                feather_px=feather_px,
                protect=parse_names(protect) if protect.strip() else (),
            )
            bundle = organ_masks.with_mask("edit", edit).with_mask("keep", keep)
        return io.NodeOutput(edit[None].clone(), keep[None].clone(), bundle)


NODES: list[type[io.ComfyNode]] = [
    CXRSelectOrgans, CXRCombineOrgans, CXRMorphOrgans, CXROrganToMask, CXREditKeepRegions
]
