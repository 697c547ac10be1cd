"""Organ masks → region labels on an attention layer's token grid.

Rule for overlapping organs (documented, tested): a token belongs to the organ that covers the largest
fraction of its cell, ties going to the organ listed first; a token whose best organ covers less than
``threshold`` (default half the cell) is background (label 0). Organs get labels ``1..K`` in the given
order. An organ that covers no token at a coarse grid simply has no tokens there (its area goes to the
neighbour or background that covers more of those cells); :meth:`RegionPartition.missing` names it so the
host can log it once.

Partitions are cached per grid size and device by :class:`RegionCache`, never recomputed per call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CXRInputError
from .organs import OrganMasks, aspect_matches

BACKGROUND = "background"


@dataclass(frozen=True, eq=False)
class RegionPartition:
    """Tokens of one ``h×w`` grid grouped by region.

    Attributes:
        names: ``("background", organ_1, ..., organ_K)``: label ``i`` is ``names[i]``.
        labels: ``[N]`` long, the region of each token (row-major over ``h×w``).
        perm: ``[N]`` long, token indices sorted by region (stable), so each region is a slice.
        inv: ``[N]`` long, the inverse permutation.
        counts: tokens per region, aligned with ``names``.
    """

    height: int
    width: int
    names: tuple[str, ...]
    labels: torch.Tensor
    perm: torch.Tensor
    inv: torch.Tensor
    counts: tuple[int, ...]

    @property
    def slices(self) -> list[tuple[int, int, int]]:
        """``(label, start, end)`` of each non-empty region in the permuted order."""
        out, start = [], 0
        for label, n in enumerate(self.counts):
            if n:
                out.append((label, start, start + n))
            start += n
        return out

    def missing(self) -> list[str]:
        """Organs with no token at this grid."""
        return [name for name, n in zip(self.names[1:], self.counts[1:], strict=True) if n == 0]

    def to(self, device: torch.device) -> RegionPartition:
        return RegionPartition(
            self.height, self.width, self.names, self.labels.to(device), self.perm.to(device),
            self.inv.to(device), self.counts,
        )


def cells_per_token(latent: tuple[int, int], grid: tuple[int, int]) -> int:
    """Latent cells per token side of a layer's ``grid``: ``2^L`` for the fewest stride-2 levels ``L`` (each
    rounding up, ``ceil(n / 2^L)``) that turn the latent into the grid.

    The grid alone fixes ``L`` (a latent side ``n`` gives ``ceil(n / 2^L)`` tokens), where rounding the size
    ratio does not: a 3×9 latent's level-3 grid is 1×2 (ratio 3 and 4.5, rounded to 4, not 8). A grid that no
    level of this latent makes (another architecture) falls back to that rounded ratio.
    """
    lh, lw = latent
    for level in range(16):
        f = 2**level
        if (-(-lh // f), -(-lw // f)) == grid:
            return f
    return 2 ** max(0, round(math.log2(max(lh / grid[0], lw / grid[1]))))


def fit_to_layer(masks: OrganMasks, height: int, width: int, latent: tuple[int, int] | None) -> OrganMasks:
    """The masks over exactly the field of view of an ``height×width`` token grid of a latent.

    A UNet halves its grid with stride-2 convolutions that round up, so an odd latent side makes the
    coarser grids cover a little more than the image (e.g. 7 latent columns → 4 tokens covering 8): the
    masks are padded with "outside" at the bottom/right by that excess before resampling, instead of being
    stretched. Masks must have the latent's aspect ratio (same field of view).
    """
    if latent is None:
        return masks
    lh, lw = latent
    if not aspect_matches(masks.height, masks.width, lh, lw):
        raise CXRInputError(
            f"the organ masks are {masks.height}×{masks.width} (H×W) but the latent is {lh}×{lw}: their aspect "
            "ratios differ, so the masks do not cover the image's field of view.",
            fix="Use the organ masks output of 'Fit Radiograph to Model' for the same image.",
        )
    factor = cells_per_token((lh, lw), (height, width))
    extra_h, extra_w = height * factor - lh, width * factor - lw
    if extra_h <= 0 and extra_w <= 0:
        return masks
    # Pad by whole pixels per latent cell, so the padded masks show exactly the grid's field of view: padding
    # masks of any size by a rounded number of pixels can leave them off the grid's aspect ratio (e.g. 31×91 for
    # a 1×3 grid), which resampling would then refuse. Masks already on whole pixels per cell (those of Fit
    # Radiograph to Model: 8 per cell) are not resampled.
    scale = max(1, -(-masks.height // lh), -(-masks.width // lw))
    exact = masks.resampled(lh * scale, lw * scale)
    return OrganMasks(masks.names, F.pad(exact.data, (0, max(0, extra_w) * scale, 0, max(0, extra_h) * scale)))


def partition(masks: OrganMasks, organs: Sequence[str], height: int, width: int, *,
              margin_px: int = 0, threshold: float = 0.5, latent: tuple[int, int] | None = None) -> RegionPartition:
    """Label every token of an ``height×width`` grid with its organ (see the module's overlap rule).

    Args:
        masks: the organ masks (any grid with the aspect ratio of the latent, or of ``height×width``).
        organs: which organs make regions, in priority order for ties.
        height, width: the token grid (exact; odd and non-square grids included).
        margin_px: grow each organ by this many pixels of the masks' grid before labelling.
        threshold: minimum covered fraction of a cell for it to belong to an organ.
        latent: the latent's ``(H, W)``, to map coarse grids of odd latents exactly (:func:`fit_to_layer`).
    """
    selected = masks.select(organs)
    if margin_px:
        selected = selected.dilated(margin_px)
    cover = fit_to_layer(selected, height, width, latent).to_grid(height, width)
    cover = cover.reshape(len(selected.names), -1)  # [K, N]
    best, idx = cover.max(dim=0)  # max returns the first index on ties: the earlier organ wins
    labels = torch.where(best >= threshold, idx + 1, torch.zeros_like(idx)).long()
    perm = torch.argsort(labels, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    counts = torch.bincount(labels, minlength=len(selected.names) + 1).tolist()
    return RegionPartition(height, width, (BACKGROUND, *selected.names), labels, perm, inv, tuple(counts))


def coverage(masks: OrganMasks, organs: Sequence[str], height: int, width: int, *,
             margin_px: int = 0, threshold: float = 0.5, latent: tuple[int, int] | None = None) -> torch.Tensor:
    """``[N]`` bool: tokens whose cell is at least ``threshold`` covered by the union of ``organs``."""
    region = OrganMasks(("u",), masks.union(organs)[None])
    if margin_px:
        region = region.dilated(margin_px)
    return fit_to_layer(region, height, width, latent).to_grid(height, width).reshape(-1) >= threshold


class RegionCache:
    """Derived per-grid tensors, computed once per (grid, device) and shared by every call.

    Copying a model in ComfyUI deep-copies its options; the cache is derived from immutable inputs, so a
    deep copy returns the same cache instead of duplicating its tensors.
    """

    def __init__(self) -> None:
        self._items: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, build):
        item = self._items.get(key)
        if item is None:
            with self._lock:
                item = self._items.get(key)
                if item is None:
                    # Built as plain tensors even under ComfyUI's inference mode: the refinement sampler's
                    # gradient pass reuses them (index_select saves its index), and autograd refuses to save
                    # inference tensors.
                    with torch.inference_mode(False):
                        item = build()
                    self._items[key] = item
        return item

    def __len__(self) -> int:
        return len(self._items)

    def __deepcopy__(self, memo: dict) -> RegionCache:
        return self
