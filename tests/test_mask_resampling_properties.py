"""Properties of organ masks resampled to an attention layer's token grid (hypothesis).

What every stage does with the masks at a layer is ``fit_to_layer(masks, h, w, latent).to_grid(h, w)``: shift the
masks' field of view to where the layer's tokens are centred (``token_offset``: half a token up-left, less half a
cell), pad with "outside" where the grid reaches past the image (top/left by the shift, bottom/right where a coarse
grid of an odd latent overhangs), then average each token's cell (or interpolate, when the masks are coarser than
the grid). Over latents of any size (odd ones such as 5×7, and
aspect ratios 1:3 / 3:1), the grids a UNet makes of them (each stride-2 level rounds up) and masks at several
resolutions of the same field of view:

- values stay in [0, 1]; all-zero masks stay zero; all-ones masks give 1 on every cell inside the image and, on a
  padded cell, exactly the part of the cell inside the image;
- the area inside the grid's field of view is preserved: exactly for masks on whole pixels per latent cell, within
  a measured bound for blocky masks of any size;
- monotonicity: a mask inside another resamples to values at or below the other's everywhere, and its token
  coverage (what the boost and refinement targets use) is a subset of the other's.

Region labelling (the overlap rule, partitions) and the RLE codec have their own property tests
(tests/test_regions_properties.py, tests/test_chexmask.py).
"""

from __future__ import annotations

import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from cxr_counterfactual.attention.organs import OrganMasks, aspect_matches
from cxr_counterfactual.attention.refinement import grid_at
from cxr_counterfactual.attention.regions import coverage, fit_to_layer, token_offset

# Odd, square, 1:3 and 3:1 latents, and any small latent.
LATENTS = st.one_of(
    st.sampled_from([(5, 7), (7, 5), (7, 21), (21, 7), (3, 9), (9, 3), (1, 1), (1, 3), (8, 7), (16, 16)]),
    st.tuples(st.integers(1, 24), st.integers(1, 24)),
)
SCALES = st.sampled_from([1, 2, 3, 8])  # mask pixels per latent cell (8 = masks at the image's size)
# Blocky masks of any size (at least 3 pixels per latent cell): area pooling windows of sizes that do not divide
# overlap by a pixel, and padded layers resample the masks to whole pixels per cell first. Measured worst error of
# the area fraction over 3,400 random examples: 0.021.
AREA_TOLERANCE = 0.05


def on_grid(masks: OrganMasks, grid: tuple[int, int], latent: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]``: the masks on a layer's token grid, as the gate, boost and capture stages resample them."""
    return fit_to_layer(masks, grid[0], grid[1], latent).to_grid(*grid)


def blocky(values: torch.Tensor, scale: int) -> torch.Tensor:
    """Per-latent-cell values ``[N, lh, lw]`` as masks with ``scale`` × ``scale`` pixels per cell."""
    return values.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def level_grid(draw, latent: tuple[int, int]) -> tuple[int, int]:
    """The token grid of one UNet level whose level the grid's shape shows: a level whose last halving changed
    nothing (both sides already 1) cannot be told from the one before it, so it is not drawn."""
    level = draw(st.integers(0, 3))
    assume(level == 0 or grid_at(latent, level) != grid_at(latent, level - 1))
    return grid_at(latent, level)


@st.composite
def layer(draw) -> tuple[tuple[int, int], tuple[int, int], int, torch.Generator]:
    """(latent, token grid of one UNet level, mask pixels per latent cell, seeded generator)."""
    latent = draw(LATENTS)
    return latent, level_grid(draw, latent), draw(SCALES), torch.Generator().manual_seed(draw(st.integers(0, 2**16)))


def cells_per_token(latent: tuple[int, int], grid: tuple[int, int]) -> int:
    """Latent cells per token side: 2 to the number of stride-2 levels (each rounding up) that make the grid."""
    return next(2**level for level in range(8) if grid_at(latent, level) == grid)


def axis_overlap(n: int, g: int, f: int) -> torch.Tensor:
    """``[g, n]``: the part of latent cell ``j`` (spanning ``[j, j+1)``) inside token ``i``'s cell on one axis.

    Token ``i`` of a level covers latent cells ``[i·f + o, (i+1)·f + o)`` with ``f = 2^level`` and ``o`` the core's
    :func:`token_offset` (where a stride-2 convolution centres the token); cells past the latent's sides are not
    in the image.
    """
    start = torch.arange(g, dtype=torch.float64)[:, None] * f + token_offset(f)
    cell = torch.arange(n, dtype=torch.float64)[None, :]
    return (torch.minimum(start + f, cell + 1) - torch.maximum(start, cell)).clamp(min=0)


def inside_fraction(latent: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[h, w]``: the part of each token's cell that lies inside the image (1 except on padded cells)."""
    f = cells_per_token(latent, grid)
    axes = [axis_overlap(n, g, f).sum(dim=1).float() / f for n, g in zip(latent, grid, strict=True)]
    return axes[0][:, None] * axes[1][None, :]


def in_view(latent: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[lh, lw]``: the part of each latent cell inside the grid's field of view (the union of its tokens' cells;
    the shifted grid can end before the image's bottom/right side)."""
    f = cells_per_token(latent, grid)
    axes = [axis_overlap(n, g, f).sum(dim=0) for n, g in zip(latent, grid, strict=True)]
    return axes[0][:, None] * axes[1][None, :]


@settings(max_examples=80, deadline=None)
@given(layer(), st.booleans())
@example(((5, 7), (3, 4), 8, torch.Generator().manual_seed(0)), True)
@example(((7, 21), (2, 6), 8, torch.Generator().manual_seed(1)), False)
def test_range_zero_and_ones(case, soft):
    latent, grid, scale, gen = case
    cells = torch.rand(2, *latent, generator=gen)
    masks = OrganMasks(("a", "b"), blocky(cells if soft else (cells > 0.5).float(), scale))
    out = on_grid(masks, grid, latent)
    assert out.shape == (2, *grid)
    assert torch.isfinite(out).all() and float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    zeros = OrganMasks(("z",), torch.zeros(1, latent[0] * scale, latent[1] * scale))
    assert not on_grid(zeros, grid, latent).any()

    ones = on_grid(OrganMasks(("o",), torch.ones(1, latent[0] * scale, latent[1] * scale)), grid, latent)[0]
    torch.testing.assert_close(ones, inside_fraction(latent, grid), rtol=0, atol=1e-6)
    full = inside_fraction(latent, grid) == 1
    assert bool((ones[full] == 1).all()), "an all-ones mask must stay exactly 1 on cells inside the image"


@settings(max_examples=80, deadline=None)
@given(layer(), st.floats(0.0, 1.0))
@example(((5, 7), (5, 7), 1, torch.Generator().manual_seed(2)), 0.3)
@example(((21, 7), (6, 2), 3, torch.Generator().manual_seed(3)), 0.6)
def test_area_is_preserved_exactly_on_whole_pixels_per_cell(case, density):
    latent, grid, scale, gen = case
    cells = (torch.rand(1, *latent, generator=gen) < density).float()
    out = on_grid(OrganMasks(("m",), blocky(cells, scale)), grid, latent)[0].double()
    # A token's cell holds (latent cells per token)² latent cells; padding adds none, the view crops none but those
    # past the grid's end.
    cell_area = cells_per_token(latent, grid) ** 2
    torch.testing.assert_close(out.sum() * cell_area, (cells[0].double() * in_view(latent, grid)).sum(),
                               rtol=1e-6, atol=1e-6)


@settings(max_examples=120, deadline=None)
@given(st.data(), LATENTS, st.floats(3.0, 12.0), st.floats(0.1, 0.9), st.integers(0, 2**16))
def test_area_is_about_preserved_for_blocky_masks_of_any_size(data, latent, px_per_cell, density, seed):
    grid = level_grid(data.draw, latent)
    height, width = round(latent[0] * px_per_cell), round(latent[1] * px_per_cell)
    assume(aspect_matches(height, width, *latent))  # same field of view (the stages refuse any other)
    gen = torch.Generator().manual_seed(seed)
    cells = (torch.rand(1, 1, *latent, generator=gen) < density).float()
    mask = torch.nn.functional.interpolate(cells, size=(height, width), mode="nearest")[0]
    out = on_grid(OrganMasks(("m",), mask), grid, latent)[0]
    weight = inside_fraction(latent, grid)  # the image's share of each cell
    estimate = float(out.sum() / weight.sum())
    view = in_view(latent, grid)  # the mean over what the grid sees (blocky cells: the mask's cell values)
    seen = float((cells[0, 0].double() * view).sum() / view.sum())
    assert abs(estimate - seen) <= AREA_TOLERANCE, (estimate, seen)


@settings(max_examples=80, deadline=None)
@given(layer(), st.floats(0.0, 1.0), st.sampled_from([0.25, 0.5, 0.75]))
@example(((5, 7), (3, 4), 8, torch.Generator().manual_seed(7)), 0.5, 0.5)
@example(((7, 21), (4, 11), 2, torch.Generator().manual_seed(8)), 0.7, 0.25)
def test_a_subset_mask_resamples_to_a_subset(case, keep, threshold):
    latent, grid, scale, gen = case
    bigger = torch.rand(1, latent[0] * scale, latent[1] * scale, generator=gen)
    smaller = bigger * (torch.rand(bigger.shape, generator=gen) < keep)  # pointwise ≤ bigger
    small_masks, big_masks = OrganMasks(("m",), smaller), OrganMasks(("m",), bigger)
    assert bool((on_grid(small_masks, grid, latent) <= on_grid(big_masks, grid, latent) + 1e-6).all())
    inner = coverage(small_masks, ("m",), *grid, threshold=threshold, latent=latent)
    outer = coverage(big_masks, ("m",), *grid, threshold=threshold, latent=latent)
    assert not bool((inner & ~outer).any()), "a token covered by the smaller mask must be covered by the larger"


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from([(8, 8), (10, 6), (6, 18), (16, 16)]), st.integers(0, 2**16))
def test_masks_coarser_than_the_grid_interpolate_within_range_and_monotone(data, latent, seed):
    """Masks at half the latent's resolution (a mask drawn small) are interpolated up, not averaged."""
    grid = level_grid(data.draw, latent)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, latent[0] // 2, latent[1] // 2, generator=gen)
    inner = coarse * (torch.rand(coarse.shape, generator=gen) < 0.5)
    outer_grid = on_grid(OrganMasks(("m",), coarse), grid, latent)
    inner_grid = on_grid(OrganMasks(("m",), inner), grid, latent)
    assert outer_grid.shape == (1, *grid)
    assert float(outer_grid.min()) >= 0 and float(outer_grid.max()) <= 1
    assert bool((inner_grid <= outer_grid + 1e-6).all())
    ones = on_grid(OrganMasks(("m",), torch.ones_like(coarse)), grid, latent)
    torch.testing.assert_close(ones[0], inside_fraction(latent, grid), rtol=0, atol=1e-6)
