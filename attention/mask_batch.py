"""A batch of radiographs: one organ mask set per image (``ORGAN_MASKS`` of a batch), and the helpers that map
per-image work over it (pure torch; the single set is :class:`.organs.OrganMasks`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CXRInputError
from .organs import OrganMasks


@dataclass(frozen=True, eq=False)
class OrganMaskBatch:
    """One :class:`OrganMasks` per image of a batch: the ``ORGAN_MASKS`` of a batch of radiographs.

    A plain :class:`OrganMasks` is one mask set that every image of a batch shares (one radiograph, or a
    batch of noise seeds of it); an ``OrganMaskBatch`` gives image ``i`` of the batch its own set
    ``samples[i]``. Every set has the same organ names (in the same order) and the same grid, so a stage
    treats them alike and a node that works per image maps over :attr:`samples`.
    """

    samples: tuple[OrganMasks, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("an OrganMaskBatch needs at least one mask set")
        first = self.samples[0]
        for i, s in enumerate(self.samples[1:], start=1):
            if s.names != first.names or (s.height, s.width) != (first.height, first.width):
                raise CXRInputError(
                    f"the organ masks of image {i + 1} ({', '.join(s.names)}; {s.height}×{s.width}) differ from "
                    f"image 1's ({', '.join(first.names)}; {first.height}×{first.width}).",
                    fix="Give every image of the batch the same organs on the same grid (e.g. through "
                        "'Fit Radiograph to Model' with the batch).",
                )

    @property
    def names(self) -> tuple[str, ...]:
        return self.samples[0].names

    @property
    def height(self) -> int:
        return self.samples[0].height

    @property
    def width(self) -> int:
        return self.samples[0].width

    @property
    def count(self) -> int:
        """Images in the batch (``len()`` of an :class:`OrganMasks` counts organs, so this is named)."""
        return len(self.samples)

    def sample(self, index: int) -> OrganMasks:
        return self.samples[index]

    def map(self, fn) -> OrganMaskBatch:
        """``fn`` applied to every image's set (a per-image operation such as ``dilated``)."""
        return OrganMaskBatch(tuple(fn(s) for s in self.samples))

    def __repr__(self) -> str:  # shown in ComfyUI logs: keep it short
        return f"OrganMaskBatch({self.count} × {', '.join(self.names)}; {self.height}x{self.width})"


AnyOrganMasks = OrganMasks | OrganMaskBatch


def mask_sets(masks: AnyOrganMasks) -> tuple[OrganMasks, ...]:
    """The mask sets of ``masks``: one per image of a batch, or the one set every image shares."""
    return masks.samples if isinstance(masks, OrganMaskBatch) else (masks,)


def mask_count(masks: AnyOrganMasks) -> int:
    """Images with their own mask set (1: one set shared by every image)."""
    return len(mask_sets(masks))


def sample_masks(masks: AnyOrganMasks, index: int) -> OrganMasks:
    """The mask set of image ``index`` of a batch (the shared set for a plain :class:`OrganMasks`)."""
    sets = mask_sets(masks)
    return sets[0] if len(sets) == 1 else sets[index]


def batch_masks(sets: Sequence[OrganMasks]) -> AnyOrganMasks:
    """One set per image → an :class:`OrganMaskBatch`; a single set stays a plain :class:`OrganMasks`."""
    return sets[0] if len(sets) == 1 else OrganMaskBatch(tuple(sets))


def map_masks(masks: AnyOrganMasks, fn) -> AnyOrganMasks:
    """``fn`` (an ``OrganMasks → OrganMasks`` per-image operation) applied to every set, keeping the form."""
    return masks.map(fn) if isinstance(masks, OrganMaskBatch) else fn(masks)


def check_mask_count(masks: AnyOrganMasks, images: int, *, node: str, input_name: str = "organ_masks") -> None:
    """Refuse a batch whose mask sets do not match its images (a shared single set fits any batch).

    Raises:
        CXRInputError: naming ``node`` and ``input_name``.
    """
    n = mask_count(masks)
    if n not in (1, images):
        raise CXRInputError(
            f"the organ masks hold {n} mask sets but the batch has {images} images.",
            node=node, input_name=input_name,
            fix="Build the organ masks from the same batch of radiographs (one set per image), or give one set "
                "that every image shares.",
        )


def each_image(items: Sequence, fn) -> list:
    """``fn`` applied to every image's item of a batch, in order; an error from image ``i`` of a batch of several
    says which image (a single item is passed straight through: its errors read as before).

    Raises:
        CXRInputError: ``fn``'s, its problem prefixed with ``image i of n``.
    """
    if len(items) == 1:
        return [fn(items[0])]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(fn(item))
        except CXRInputError as err:
            raise CXRInputError(f"image {i + 1} of {len(items)}: {err.problem}", node=err.node,
                                input_name=err.input_name, fix=err.fix) from None
    return out


def map_each_image(masks: AnyOrganMasks, fn) -> AnyOrganMasks:
    """:func:`map_masks` whose errors name the image of the batch (see :func:`each_image`)."""
    if isinstance(masks, OrganMaskBatch):
        return OrganMaskBatch(tuple(each_image(masks.samples, fn)))
    return fn(masks)
