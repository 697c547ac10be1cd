"""Where a batch row's regions come from: its image's masks, seen through its conditioning's area (pure torch).

A sampler call regulates rows of a batch: ``chunks × per`` rows, one chunk per conditioning, row ``r`` of a chunk
being image ``r % per`` of the latent batch. Each row has its own *field*: which image it is (so which of an
:class:`.mask_batch.OrganMaskBatch`'s mask sets applies) and which part of the latent the UNet sees for it (the
whole latent, or the area of an area-conditioned prompt: ComfyUI narrows the input to the area before the model
runs). Region labels for a row are its image's masks cropped to that part (:func:`field_masks`) and then
resampled to the layer's grid as for a whole latent (``regions.partition`` / ``coverage`` with
``latent=field.size``). The hosts group the regulated rows by field and run a layer's regulated work once per
group; the stages cache their region tensors per field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import CXRInputError
from .mask_batch import AnyOrganMasks, mask_count, sample_masks
from .organs import OrganMasks
from .patch_grid import patch_fit
from .regions import Fit

Grid = tuple[int, int]
Area = tuple[int, int, int, int]  # (h, w, y, x) in latent cells, ComfyUI's order


@dataclass(frozen=True)
class Field:
    """One row's region source (hashable: stages cache per field).

    Attributes:
        latent: the full latent's ``(H, W)``.
        area: the ``(h, w, y, x)`` latent cells the UNet sees for this row (None: the whole latent).
        sample: the image of the batch (its mask set in an :class:`.mask_batch.OrganMaskBatch`).
        patch: a diffusion transformer's patch size (its tokens are ``patch×patch`` latent cells); 0 for a UNet,
            whose layer grids come from stride-2 convolutions.
    """

    latent: Grid
    area: Area | None = None
    sample: int = 0
    patch: int = 0

    @property
    def fit(self) -> Fit | None:
        """How masks meet this row's token grid: a DiT's ``patch×patch`` patches of :attr:`size` (the host pads
        the latent before it patchifies, :func:`.patch_grid.patch_fit`), or None for a UNet layer's grid."""
        return patch_fit(self.size, self.patch) if self.patch else None

    @property
    def size(self) -> Grid:
        """The ``(h, w)`` latent the UNet sees for this row: the area, or the whole latent."""
        return (self.area[0], self.area[1]) if self.area is not None else self.latent

    def for_masks(self, masks: AnyOrganMasks | None) -> Field:
        """This field as a cache key for ``masks``: one shared mask set looks the same from every image."""
        if masks is None or mask_count(masks) == 1:
            return replace(self, sample=0) if self.sample else self
        return self


def crop_masks(masks: OrganMasks, latent: Grid, area: Area) -> OrganMasks:
    """The masks over exactly the latent cells of ``area`` of a ``latent``-sized image.

    Masks on whole pixels per latent cell (those of 'Fit Radiograph to Model': 8 per cell) are cut on pixel
    boundaries as they are; masks of another size are first resampled to the nearest whole number of pixels per
    cell (at least as many as they have), so the cut is exact.
    """
    lh, lw = latent
    h, w, y, x = area
    scale = max(1, -(-masks.height // lh), -(-masks.width // lw))
    exact = masks.resampled(lh * scale, lw * scale)
    data = exact.data[:, y * scale:(y + h) * scale, x * scale:(x + w) * scale]
    return OrganMasks(masks.names, data.contiguous())


def field_masks(masks: AnyOrganMasks, field: Field) -> OrganMasks:
    """The mask set of ``field``'s image, cropped to its area (unchanged where it has none)."""
    chosen = sample_masks(masks, field.sample)
    if field.area is None:
        return chosen
    return crop_masks(chosen, field.latent, field.area)


def area_problem(area: Sequence[int], latent: Grid) -> str | None:
    """Why ``area`` (``(h, w, y, x)`` latent cells) cannot be sampled on a ``latent``-sized input (None: it can).

    ComfyUI clips an area that reaches past the latent's bottom or right edge (:func:`clip_area`); one that starts
    at or beyond an edge, or has no cells, leaves nothing to sample.
    """
    h, w, y, x = (int(v) for v in area[:4])
    lh, lw = latent
    if h < 1 or w < 1:
        return f"the area is {h}×{w} latent cells (empty)"
    if y < 0 or x < 0 or y >= lh or x >= lw:
        return (f"the area starts at latent cell y={y}, x={x} (pixels {8 * y}, {8 * x}), outside the {lh}×{lw}-cell "
                f"({8 * lh}×{8 * lw} px) latent")
    return None


def clip_area(area: Sequence[int], latent: Grid) -> Area:
    """The area ComfyUI really narrows the input to: clipped at the latent's bottom and right edges
    (``comfy.samplers.get_area_and_mult``)."""
    h, w, y, x = (int(v) for v in area[:4])
    return (min(latent[0] - y, h), min(latent[1] - x, w), y, x)


def check_area(area: Sequence[int], latent: Grid, *, node: str) -> None:
    """Refuse an area outside the latent (see :func:`area_problem`).

    Raises:
        CXRInputError: naming the conditioning nodes that set areas, their position inputs and the fix.
    """
    why = area_problem(area, latent)
    if why is not None:
        raise CXRInputError(
            f"a conditioning's area lies outside the image: {why}.", node=node, input_name="x / y (and width / height)",
            fix="Place the area inside the image: x below its width and y below its height, with a positive size "
                "(ConditioningSetArea: pixels; ConditioningSetAreaPercentage: fractions below 1).",
        )


def row_fields(chunk_fields: Sequence[Field], batch: int, per_sample: bool) -> list[Field]:
    """One field per batch row, from one field per chunk (rows ``c·per … (c+1)·per − 1`` are chunk ``c``): with
    ``per_sample`` (a stage holds one mask set per image) row ``r`` of a chunk is image ``r % per``; without, every
    row shows image 0's (the shared) masks, so rows of one chunk share one field."""
    per = batch // max(1, len(chunk_fields))
    if not per_sample:
        return [chunk_fields[i // per] for i in range(per * len(chunk_fields))]
    return [replace(chunk_fields[i // per], sample=i % per) for i in range(per * len(chunk_fields))]


def group_rows(rows: Sequence[int], fields: Sequence[Field]) -> list[tuple[Field, list[int]]]:
    """``rows`` grouped by their field, in order of first appearance (one group: every row shares a field)."""
    groups: dict[Field, list[int]] = {}
    for r in rows:
        groups.setdefault(fields[r], []).append(r)
    return list(groups.items())


def as_index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.long, device=device)
