"""Nodes that bring the patient's organ masks into a graph as ``ORGAN_MASKS``."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention.mask_batch import (
    AnyOrganMasks,
    OrganMaskBatch,
    batch_masks,
    check_mask_count,
    each_image,
    mask_count,
    mask_sets,
    sample_masks,
)
from ..attention.organs import OrganMasks, normalise_name
from ..errors import CXRInputError
from ..imaging.mask_files import read_label_map, read_mask_image
from .common import (
    check_inputs,
    file_fingerprint,
    input_file_problem,
    input_image_files,
    resolve_input_file,
    user_errors,
)
from .schema import CATEGORY_MASKS, NONE_CHOICE, OrganMasksType, described, organ_masks_input, organ_masks_output

_SIDES = "Patient's side: in a PA radiograph the patient's right lung is on the image's left."
# The organ inputs both mask loaders offer, in input order: (input name, what its tooltip calls it).
_ORGANS = (("right_lung", "patient's right lung"), ("left_lung", "patient's left lung"), ("heart", "heart"))
_PA_VIEW = {"right_lung": " (image left in a PA view)", "left_lung": " (image right in a PA view)"}


class CXRLoadOrganMasks(io.ComfyNode):
    """Loads one mask image per organ (e.g. exported from a segmentation tool or drawn by hand) into an ORGAN_MASKS
    bundle."""

    TITLE = "Load Organ Masks (files)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = [NONE_CHOICE, *input_image_files()]
        return io.Schema(
            node_id="CXRLoadOrganMasks", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls, _SIDES),
            inputs=[
                *(io.Combo.Input(name, options=files, default=NONE_CHOICE, upload=io.UploadType.image,
                                 tooltip=f"Mask image of the {what}{_PA_VIEW.get(name, '')} (white = inside), same "
                                 f"field of view as the radiograph. {NONE_CHOICE} leaves it out.")
                  for name, what in _ORGANS),
                io.Float.Input(
                    "threshold", default=0.5, min=0.01, max=1.0, step=0.01,
                    tooltip="Grey level (0–1) at or above which a pixel counts as inside the organ.",
                ),
            ],
            outputs=[organ_masks_output()],
        )

    @classmethod
    def validate_inputs(cls, right_lung: str, left_lung: str, heart: str) -> bool | str:
        chosen = {"right_lung": right_lung, "left_lung": left_lung, "heart": heart}
        if all(v in ("", NONE_CHOICE) for v in chosen.values()):
            return f"[{cls.TITLE}] no mask file chosen. Fix: pick at least one organ's mask image."
        for name, value in chosen.items():
            problem = input_file_problem(cls.TITLE, name, value, optional=True)
            if problem:
                return problem
        return True

    @classmethod
    def fingerprint_inputs(cls, right_lung: str, left_lung: str, heart: str, threshold: float) -> str:
        return f"{file_fingerprint(right_lung, left_lung, heart)}|{threshold}"

    @classmethod
    def execute(cls, right_lung: str, left_lung: str, heart: str, threshold: float) -> io.NodeOutput:
        check_inputs(cls, threshold=threshold)
        masks: dict[str, torch.Tensor] = {}
        for name, value in (("right_lung", right_lung), ("left_lung", left_lung), ("heart", heart)):
            if value and value != NONE_CHOICE:
                with user_errors(cls.TITLE, name):
                    masks[name] = read_mask_image(resolve_input_file(value), threshold)
                    OrganMasks.from_dict({name: masks[name]})  # empty or unreadable: name this organ's input
        if not masks:
            raise CXRInputError("no mask file chosen.", node=cls.TITLE, fix="Pick at least one organ's mask image.")
        first = next(iter(masks.values()))
        odd = next((n for n, m in masks.items() if m.shape != first.shape), None)
        if odd is not None:
            sizes = ", ".join(f"{n} {tuple(m.shape)}" for n, m in masks.items())
            raise CXRInputError(
                f"the mask files have different sizes ({sizes}).",
                node=cls.TITLE, input_name=odd,
                fix="Export every organ's mask at the radiograph's size.",
            )
        with user_errors(cls.TITLE, ", ".join(masks)):
            return io.NodeOutput(OrganMasks.from_dict(masks))


class CXRLoadOrganLabelMap(io.ComfyNode):
    """Loads every organ from one label map (each organ a grey value) or colour map (each organ a colour)."""

    TITLE = "Load Organ Masks (label map)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRLoadOrganLabelMap", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls, _SIDES),
            inputs=[
                io.Combo.Input(
                    "label_map", options=input_image_files(), upload=io.UploadType.image,
                    tooltip="Label or colour map image, same field of view as the radiograph. Save it "
                    "losslessly (PNG): JPEG blurs label values.",
                ),
                io.String.Input(
                    "mapping", default="right_lung=1, left_lung=2, heart=3",
                    tooltip="organ=value pairs: a grey/label value (e.g. heart=3) or a colour (heart=#0000ff). "
                    "Any organ name is allowed; right/left are the patient's sides.",
                ),
            ],
            outputs=[organ_masks_output()],
        )

    @classmethod
    def validate_inputs(cls, label_map: str) -> bool | str:
        return input_file_problem(cls.TITLE, "label_map", label_map) or True

    @classmethod
    def fingerprint_inputs(cls, label_map: str, mapping: str) -> str:
        return f"{file_fingerprint(label_map)}|{mapping}"

    @classmethod
    def execute(cls, label_map: str, mapping: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "mapping"):
            return io.NodeOutput(read_label_map(resolve_input_file(label_map), mapping))


def _mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK (``[B, H, W]``, or one ``[H, W]`` mask) as ``[B, H, W]`` float on the CPU."""
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1]).float().cpu()


class CXROrganMasksFromMask(io.ComfyNode):
    """Builds (or extends) an ORGAN_MASKS bundle from MASK inputs, e.g. masks drawn in ComfyUI's mask editor on the
    radiograph. A MASK batch gives one mask set per image (a MASK of batch 1 is shared by every image)."""

    TITLE = "Organ Masks from MASK"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXROrganMasksFromMask", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls, _SIDES),
            inputs=[
                *(io.Mask.Input(name, optional=True, tooltip=f"MASK of the {what} (1 = inside); a batch: one per "
                                "image.")
                  for name, what in _ORGANS),
                io.String.Input("other_name", default="", tooltip="Name for the 'other' mask (e.g. clavicle, lesion)."),
                io.Mask.Input("other", optional=True, tooltip="Any further organ or region; name it above."),
                organ_masks_input("An existing bundle to extend (a mask given here replaces the organ of that name); "
                                  "one set, or one per image of the batch.", optional=True),
            ],
            outputs=[organ_masks_output("The organs as one bundle (one per image of a batch).")],
        )

    @classmethod
    def execute(
        cls,
        other_name: str,
        right_lung: torch.Tensor | None = None,
        left_lung: torch.Tensor | None = None,
        heart: torch.Tensor | None = None,
        other: torch.Tensor | None = None,
        organ_masks: AnyOrganMasks | None = None,
    ) -> io.NodeOutput:
        given = {"right_lung": right_lung, "left_lung": left_lung, "heart": heart}
        inputs = {k: k for k, v in given.items() if v is not None}  # organ name → the input it came from
        batches = {k: _mask_batch(v) for k, v in given.items() if v is not None}
        if other is not None:
            if not other_name.strip():
                raise CXRInputError(
                    "a mask is connected to 'other' but it has no name.", node=cls.TITLE,
                    input_name="other_name", fix="Type the organ's name, e.g. clavicle.",
                )
            with user_errors(cls.TITLE, "other_name"):
                key = normalise_name(other_name)
            batches[key], inputs[key] = _mask_batch(other), "other"
        if not batches and organ_masks is None:
            raise CXRInputError(
                "no mask is connected.", node=cls.TITLE, fix="Connect at least one organ's MASK."
            )
        n = max([len(b) for b in batches.values()] + [mask_count(organ_masks) if organ_masks is not None else 1])
        for key, b in batches.items():
            if len(b) not in (1, n):
                raise CXRInputError(f"got a batch of {len(b)} masks where the batch has {n} images.", node=cls.TITLE,
                                    input_name=inputs[key], fix="Give one mask per image, or one mask for all.")
        if organ_masks is not None:
            check_mask_count(organ_masks, n, node=cls.TITLE)

        def one_set(i: int) -> OrganMasks | None:
            masks = {k: b[min(i, len(b) - 1)] for k, b in batches.items()}
            bundle = OrganMasks.from_dict(masks) if masks else None
            if organ_masks is None:
                return bundle
            base = sample_masks(organ_masks, i)
            if bundle is None:
                return base
            return base.merged(bundle.resampled(base.height, base.width))

        with user_errors(cls.TITLE, ", ".join(batches) or "organ_masks"):
            return io.NodeOutput(batch_masks(each_image(range(n), one_set)))


BATCH_INPUTS = 8  # joined inputs; a batch given to an input counts its images, so chained nodes join more


class CXRBatchOrganMasks(io.ComfyNode):
    """Joins organ masks into one mask set per image of a batch, in input order (organ_masks_1 first): the masks of
    a batch of radiographs, e.g. one Load Organ Masks node per radiograph, for the images joined in the same order
    (Image Batch). An input that is itself a batch adds all its sets, so these nodes chain like Image Batch. Every
    set must have the same organs on the same grid: fit each radiograph to the same size first (Fit Radiograph to
    Model) and select the same organs."""

    TITLE = "CXR Batch Organ Masks"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRBatchOrganMasks", display_name=cls.TITLE, category=CATEGORY_MASKS,
            description=described(cls),
            inputs=[
                OrganMasksType.Input("organ_masks_1", tooltip="The masks of the batch's first image (or a batch: "
                                     "its first images)."),
                *(OrganMasksType.Input(f"organ_masks_{k}", optional=True,
                                       tooltip=f"The masks of the next image(s) of the batch (joined after "
                                       f"organ_masks_{k - 1}); unconnected inputs are skipped.")
                  for k in range(2, BATCH_INPUTS + 1)),
            ],
            outputs=[organ_masks_output("One mask set per image, in input order.")],
        )

    @classmethod
    def execute(cls, organ_masks_1: AnyOrganMasks, **more: AnyOrganMasks | None) -> io.NodeOutput:
        given = {"organ_masks_1": organ_masks_1, **{f"organ_masks_{k}": more.get(f"organ_masks_{k}")
                                                    for k in range(2, BATCH_INPUTS + 1)}}
        sets: list[OrganMasks] = []
        first = mask_sets(organ_masks_1)[0]
        for name, masks in given.items():
            if masks is None:
                continue
            if not isinstance(masks, (OrganMasks, OrganMaskBatch)):
                raise CXRInputError(f"this is not ORGAN_MASKS ({type(masks).__name__}).", node=cls.TITLE,
                                    input_name=name, fix="Connect the organ_masks output of a mask node.")
            odd = mask_sets(masks)[0]
            if odd.names != first.names or (odd.height, odd.width) != (first.height, first.width):
                raise CXRInputError(
                    f"these masks ({', '.join(odd.names)}; {odd.height}×{odd.width}) differ from organ_masks_1's "
                    f"({', '.join(first.names)}; {first.height}×{first.width}).", node=cls.TITLE, input_name=name,
                    fix="Give every image the same organs (Select Organs) on the same grid: fit each radiograph with "
                    "its masks to the same size (Fit Radiograph to Model) before joining.")
            sets.extend(mask_sets(masks))
        return io.NodeOutput(batch_masks(sets))


NODES: list[type[io.ComfyNode]] = [CXRLoadOrganMasks, CXRLoadOrganLabelMap, CXROrganMasksFromMask, CXRBatchOrganMasks]
