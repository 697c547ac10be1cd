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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .organs import OrganMasks, require_latent_aspect

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


def token_offset(cells: int) -> float:
    """Where a token of a grid with ``cells`` latent cells per token side (``2^L`` at UNet level ``L``) is
    centred, in latent cells, relative to the aligned cell ``[cells·i, cells·(i+1))``: ``-(cells - 1) / 2``.

    Why: SD's UNets go down a level with a 3×3 convolution of stride 2 and padding 1, so level-``L`` token ``i``
    reads level-``L-1`` tokens ``2i-1, 2i, 2i+1`` and, down the levels, latent cells symmetric about cell
    ``2^L·i``: its centre is ``2^L·i + 0.5`` (cell ``j`` spanning ``[j, j+1)``), not the aligned cell's
    ``2^L·i + 2^L/2``. That is 0, -0.5, -1.5, -3.5 cells (0, 4, 12, 28 px at 8 px per cell, up and left) at
    levels 0–3. Decoder (output-block) tokens get their level's skip connection with exactly this geometry,
    plus a nearest up-sampled path whose share is learned; measured on the SD1.5, SD2 and SDXL-family test
    models (``tests/test_token_geometry.py``, single latent cells perturbed, response-weighted centre of
    every interior token's response), encoder, middle and decoder tokens alike lie within 0.2 cells of this
    offset at every level, so one offset per level serves every part of the UNet
    (``docs/nodes.md``, "Token geometry", has the table).
    """
    return -(cells - 1) / 2


def fit_to_layer(masks: OrganMasks, height: int, width: int, latent: tuple[int, int] | None) -> OrganMasks:
    """The masks over exactly the field of view of an ``height×width`` token grid of a latent.

    Token ``i`` of a grid with ``f`` latent cells per token side covers the latent cells
    ``[f·i + o, f·(i+1) + o)``, ``o = token_offset(f)`` (:func:`token_offset`: the UNet's stride-2 down-sampling
    centres a token on cell ``f·i``), so the masks are shifted down/right by ``-o`` cells ("outside" comes in at
    the top/left) before resampling. A UNet halves its grid with convolutions that round up, so an odd latent
    side makes the coarser grids reach past the image (e.g. 7 latent columns → 4 tokens): the masks are padded
    with "outside" at the bottom/right by that excess, and cropped there where the shifted grid ends before the
    image does, instead of being stretched. Masks must have the latent's aspect ratio (same field of view).
    Without a ``latent`` the masks are taken to cover the grid exactly.
    """
    if latent is None:
        return masks
    lh, lw = latent
    require_latent_aspect(masks, latent)
    factor = cells_per_token((lh, lw), (height, width))
    shift = -token_offset(factor)  # cells of "outside" at the top/left
    extra_h, extra_w = height * factor - lh, width * factor - lw
    if shift == 0 and extra_h <= 0 and extra_w <= 0:
        return masks
    # Shift and pad by whole pixels per latent cell (an even number when the shift is half a cell), so the result
    # shows exactly the grid's field of view: padding masks of any size by a rounded number of pixels can leave
    # them off the grid's aspect ratio (e.g. 31×91 for a 1×3 grid), which resampling would then refuse. Masks
    # already on such a grid (those of Fit Radiograph to Model: 8 px per cell) are not resampled.
    scale = max(1, -(-masks.height // lh), -(-masks.width // lw))
    exact = masks.resampled(lh * scale, lw * scale)
    if shift * scale != int(shift * scale):  # half a cell on an odd pixel count: duplicating pixels is exact
        exact = OrganMasks(masks.names, exact.data.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))
        scale *= 2
    top = int(shift * scale)
    data = F.pad(exact.data, (top, max(0, extra_w * scale - top), top, max(0, extra_h * scale - top)))
    # Normal grids reach the image's far side (height·f ≥ lh); a fallback grid keeps the masks' own length.
    rows, cols = max(height * factor, lh) * scale, max(width * factor, lw) * scale
    return OrganMasks(masks.names, data[:, :rows, :cols].contiguous())


#: How masks meet a token grid: ``fit(masks, height, width)`` → the masks over exactly the grid's field of view.
Fit = Callable[[OrganMasks, int, int], OrganMasks]


def partition(masks: OrganMasks, organs: Sequence[str], height: int, width: int, *,
              margin_px: int = 0, threshold: float = 0.5, latent: tuple[int, int] | None = None,
              fit: Fit | None = None) -> RegionPartition:
    """Label every token of an ``height×width`` grid with its organ (see the module's overlap rule).

    Args:
        masks: the organ masks (any grid with the aspect ratio of the latent, or of ``height×width``).
        organs: which organs make regions, in priority order for ties.
        height, width: the token grid (exact; odd and non-square grids included).
        margin_px: grow each organ by this many pixels of the masks' grid before labelling.
        threshold: minimum covered fraction of a cell for it to belong to an organ.
        latent: the latent's ``(H, W)``, to map coarse grids of odd latents exactly (:func:`fit_to_layer`).
        fit: how the masks meet the grid when it is not a UNet layer's (a DiT's patch grid:
            :func:`.patch_grid.patch_fit`); None = :func:`fit_to_layer` with ``latent``.
    """
    selected = masks.select(organs)
    if margin_px:
        selected = selected.dilated(margin_px)
    cover = _fit(fit, latent)(selected, height, width).to_grid(height, width)
    cover = cover.reshape(len(selected.names), -1)  # [K, N]
    best, idx = cover.max(dim=0)  # max returns the first index on ties: the earlier organ wins
    labels = torch.where(best >= threshold, idx + 1, torch.zeros_like(idx)).long()
    perm = torch.argsort(labels, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    counts = torch.bincount(labels, minlength=len(selected.names) + 1).tolist()
    return RegionPartition(height, width, (BACKGROUND, *selected.names), labels, perm, inv, tuple(counts))


def coverage(masks: OrganMasks, organs: Sequence[str], height: int, width: int, *,
             margin_px: int = 0, threshold: float = 0.5, latent: tuple[int, int] | None = None,
             fit: Fit | None = None) -> torch.Tensor:
    """``[N]`` bool: tokens whose cell is at least ``threshold`` covered by the union of ``organs`` (``latent``,
    ``fit``: as for :func:`partition`)."""
    region = OrganMasks(("u",), masks.union(organs)[None])
    if margin_px:
        region = region.dilated(margin_px)
    return _fit(fit, latent)(region, height, width).to_grid(height, width).reshape(-1) >= threshold


def _fit(fit: Fit | None, latent: tuple[int, int] | None) -> Fit:
    return fit if fit is not None else (lambda m, h, w: fit_to_layer(m, h, w, latent))


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
