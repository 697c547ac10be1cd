"""Nodes that bring a radiograph (and its masks) to the model's resolution and back to native size."""

from __future__ import annotations

from dataclasses import replace

import torch
from comfy_api.latest import io

from ..attention.mask_batch import AnyOrganMasks, check_mask_count, map_each_image
from ..attention.organs import OrganMasks
from ..errors import CXRInputError
from ..imaging.geometry import FitRecord, NativeGeometry, apply_fit, composite_native, plan_fit, undo_fit
from .common import user_errors
from .schema import CATEGORY_GEOMETRY, FitType, GeometryType, OrganMasksType, described


class CXRFitToModel(io.ComfyNode):
    """Scales the radiograph (aspect ratio kept) so its longer side is 'max_side', pads it to multiples of 8 with
    black, and does the same to the organ masks, so image, masks and latent line up. The 'fit' output records how to
    go back to native size (Restore Native Size). A batch of radiographs (one size, so one fit) takes one mask set
    per image (CXR Batch Organ Masks) or one set they all share."""

    TITLE = "Fit Radiograph to Model"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRFitToModel",
            display_name=cls.TITLE,
            category=CATEGORY_GEOMETRY,
            description=described(cls),
            inputs=[
                io.Image.Input("image", tooltip="The radiograph at native size (from Load Image or Load DICOM)."),
                io.Int.Input(
                    "max_side", default=512, min=64, max=4096, step=8,
                    tooltip="Longer side after scaling, a multiple of 8: 512 for SD1.5-based CXR models "
                    "(RoentGen), 1024 for SDXL.",
                ),
                OrganMasksType.Input(
                    "organ_masks", optional=True,
                    tooltip="Organ masks of this radiograph (same aspect ratio, any size): fitted alike. For a "
                    "batch: one set per image, in the batch's order, or one set every image shares.",
                ),
                GeometryType.Input(
                    "geometry", optional=True,
                    tooltip="Native geometry from Load DICOM (pixel spacing, bit depth), kept in the fit record "
                    "for export at native size.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The radiograph on the model grid."),
                OrganMasksType.Output(
                    display_name="organ_masks", tooltip="The organ masks on the same grid (None if none given); one "
                    "set per image when one per image was given."
                ),
                FitType.Output(display_name="fit", tooltip="How to return to native size."),
            ],
        )

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        max_side: int,
        organ_masks: AnyOrganMasks | None = None,
        geometry: NativeGeometry | None = None,
    ) -> io.NodeOutput:
        b, h, w, _ = image.shape
        if geometry is not None and (geometry.height, geometry.width) != (h, w):
            raise CXRInputError(
                f"the geometry describes a {geometry.height}×{geometry.width} radiograph, the image is {h}×{w}.",
                node=cls.TITLE, input_name="geometry",
                fix="Connect the geometry of the same radiograph (or leave it unconnected).",
            )
        with user_errors(cls.TITLE, "max_side"):
            fit = replace(plan_fit(h, w, max_side), geometry=geometry)
        if organ_masks is not None:
            check_mask_count(organ_masks, b, node=cls.TITLE)

        def fitted_masks(masks: OrganMasks) -> OrganMasks:
            native = masks.resampled(h, w)
            return OrganMasks(native.names, apply_fit(native.data[None], fit)[0].contiguous())

        # Every image of an IMAGE batch has the same size, so one fit serves the batch and each mask set.
        fitted = apply_fit(image.movedim(-1, 1), fit).movedim(1, -1)
        masks_out = None
        if organ_masks is not None:
            with user_errors(cls.TITLE, "organ_masks"):
                masks_out = map_each_image(organ_masks, fitted_masks)
        return io.NodeOutput(fitted, masks_out, fit)


class CXRRestoreNativeSize(io.ComfyNode):
    """Crops the padding added by 'Fit Radiograph to Model' and scales the image (and an optional mask) back to the
    radiograph's native size, so edits line up with the original."""

    TITLE = "Restore Native Size"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRRestoreNativeSize",
            display_name=cls.TITLE,
            category=CATEGORY_GEOMETRY,
            description=described(cls),
            inputs=[
                io.Image.Input("image", tooltip="An image on the fitted grid, e.g. the decoded edit."),
                FitType.Input("fit", tooltip="The 'fit' output of Fit Radiograph to Model."),
                io.Mask.Input("mask", optional=True, tooltip="A mask on the fitted grid (e.g. the edit region)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The image at native size."),
                io.Mask.Output(display_name="mask", tooltip="The mask at native size (None if none given)."),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, fit: FitRecord, mask: torch.Tensor | None = None) -> io.NodeOutput:
        with user_errors(cls.TITLE, "image"):
            native = undo_fit(image.movedim(-1, 1), fit).movedim(1, -1)
        native_mask = None
        if mask is not None:
            with user_errors(cls.TITLE, "mask"):
                native_mask = undo_fit(mask.reshape(-1, 1, *mask.shape[-2:]).float(), fit)[:, 0]
        return io.NodeOutput(native.clamp(0, 1), native_mask)


class CXRCompositeNative(io.ComfyNode):
    """Puts the edit back into the patient's own radiograph at native size: inside the feathered edit region the
    decoded edit (scaled back), outside it the source's original pixels, bit for bit. The VAE round trip and the
    model's smaller grid would otherwise blur or change the whole image."""

    TITLE = "Composite Edit onto Radiograph (native size)"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRCompositeNative",
            display_name=cls.TITLE,
            category=CATEGORY_GEOMETRY,
            description=described(cls),
            inputs=[
                io.Image.Input("source", tooltip="The radiograph at native size (Load Chest X-ray (DICOM) or Load "
                               "Image): the one that went into Fit Radiograph to Model."),
                io.Image.Input("edited", tooltip="The decoded edit on the fitted grid (VAE Decode)."),
                FitType.Input("fit", tooltip="The 'fit' output of Fit Radiograph to Model."),
                io.Mask.Input("edit_region", tooltip="Edit / Keep Regions' edit_region (fitted grid, feathered)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The counterfactual at native size."),
                io.Mask.Output(display_name="edit_region", tooltip="The edit region at native size (for metrics)."),
            ],
        )

    @classmethod
    def execute(cls, source: torch.Tensor, edited: torch.Tensor, fit: FitRecord,
                edit_region: torch.Tensor) -> io.NodeOutput:
        if edited.shape[1:3] != (fit.height, fit.width):
            raise CXRInputError(f"the edit is {edited.shape[2]}×{edited.shape[1]} px, not the fitted "
                                f"{fit.width}×{fit.height}.", node=cls.TITLE, input_name="edited",
                                fix="Connect the VAE Decode of the latent made from Fit Radiograph to Model's image.")
        if edit_region.shape[-2:] != (fit.height, fit.width):
            raise CXRInputError(f"the edit region is {edit_region.shape[-1]}×{edit_region.shape[-2]}, not the "
                                f"fitted {fit.width}×{fit.height}.", node=cls.TITLE, input_name="edit_region",
                                fix="Make the regions from Fit Radiograph to Model's organ_masks.")
        with user_errors(cls.TITLE, "source"):
            image, region = composite_native(source, edited, edit_region, fit)
        return io.NodeOutput(image, region)


NODES: list[type[io.ComfyNode]] = [CXRFitToModel, CXRRestoreNativeSize, CXRCompositeNative]
