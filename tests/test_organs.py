"""Pure core tests of ORGAN_MASKS: resampling, morphology, combination, errors; real CheXmask masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_counterfactual.attention.organs import OrganMasks, edit_and_keep, label_map_to_masks, parse_names
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.mask_files import read_label_map, read_mask_image


@pytest.fixture(scope="module")
def example_masks(chexmask_example) -> OrganMasks:
    return OrganMasks.from_dict(
        {
            "right_lung": read_mask_image(chexmask_example / "RL_mask.png"),
            "left_lung": read_mask_image(chexmask_example / "LL_mask.png"),
            "heart": read_mask_image(chexmask_example / "H_mask.png"),
        }
    )


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = 1
    return m


def test_real_masks_load_with_the_image_size_and_sides(example_masks, chexmask_example):
    image = Image.open(chexmask_example / "utils_example1.jpg")
    assert (example_masks.width, example_masks.height) == image.size == (786, 899)
    assert example_masks.names == ("right_lung", "left_lung", "heart")
    # The patient's right lung lies on the image's left in a PA view.
    cols = torch.arange(example_masks.width, dtype=torch.float32)
    centre = {n: float((m.sum(0) * cols).sum() / m.sum()) for n, m in example_masks.as_dict().items()}
    assert centre["right_lung"] < centre["heart"] < centre["left_lung"]
    for name in example_masks.names:
        assert set(torch.unique(example_masks.get(name)).tolist()) == {0.0, 1.0}
        assert 0.05 < example_masks.area_fraction(name) < 0.3


@pytest.mark.parametrize("grid", [(5, 7), (7, 5), (64, 56), (13, 11), (112, 98), (1, 1)])
def test_resample_to_any_token_grid_keeps_area(example_masks, grid):
    h, w = grid
    # Masks on a token grid with another aspect ratio are an error, so compare on the masks' own aspect
    # when the grid is not close to it.
    from cxr_counterfactual.attention.organs import aspect_matches

    if not aspect_matches(example_masks.height, example_masks.width, h, w):
        with pytest.raises(CXRInputError, match="aspect"):
            example_masks.resampled(h, w)
        return
    out = example_masks.resampled(h, w)
    assert out.data.shape == (3, h, w)
    assert out.data.min() >= 0 and out.data.max() <= 1
    for i, name in enumerate(out.names):
        # Area resampling keeps each organ's area fraction (up to the border cells of coarse grids).
        assert abs(float(out.data[i].mean()) - example_masks.area_fraction(name)) < 0.02 + 1.0 / min(h, w)


def test_to_grid_odd_non_square_exact_shape():
    masks = OrganMasks.from_dict({"a": box(50, 70, 0, 50, 0, 35), "b": box(50, 70, 0, 50, 35, 70)})
    grid = masks.to_grid(5, 7)
    assert grid.shape == (2, 5, 7)
    torch.testing.assert_close(grid.sum(0), torch.ones(5, 7))  # the halves tile the image
    assert float(grid[0, :, 0].min()) == 1.0 and float(grid[0, :, 6].max()) == 0.0


def test_other_aspect_ratio_is_an_error_that_says_what_to_do(example_masks):
    with pytest.raises(CXRInputError) as err:
        example_masks.resampled(512, 512)
    assert "aspect" in str(err.value) and "Fix:" in str(err.value)


def test_dilate_erode_feather_use_a_disk_and_keep_input_unchanged():
    m = torch.zeros(41, 41)
    m[20, 20] = 1
    masks = OrganMasks.from_dict({"dot": m})
    before = masks.data.clone()
    grown = masks.dilated(5)
    # A disk of radius 5: (2·5+1)² would be a square (121); the disk has 81 pixels.
    assert int(grown.get("dot").sum()) == 81
    assert grown.get("dot")[20, 25] == 1 and grown.get("dot")[25, 25] == 0
    assert int(grown.eroded(5).get("dot").sum()) == 1
    soft = grown.feathered(2.0)
    assert 0 < float(soft.get("dot")[20, 27]) < 0.5 < float(soft.get("dot")[20, 20]) <= 1
    torch.testing.assert_close(masks.data, before)  # nothing changed in place


def test_erosion_shrinks_from_the_image_border():
    masks = OrganMasks.from_dict({"all": torch.ones(20, 20)}, allow_empty=True)
    eroded = masks.eroded(3).get("all")
    assert eroded[0].sum() == 0 and eroded[10, 10] == 1


def test_morphology_only_touches_named_organs(example_masks):
    grown = example_masks.dilated(10, ["left_lung"])
    assert grown.area_fraction("left_lung") > example_masks.area_fraction("left_lung")
    torch.testing.assert_close(grown.get("heart"), example_masks.get("heart"))


def test_union_subtract_select(example_masks):
    lungs = example_masks.union(["right_lung", "left_lung"])
    both = example_masks.area_fraction("right_lung") + example_masks.area_fraction("left_lung")
    assert float(lungs.mean()) == pytest.approx(both, abs=1e-3)  # the lungs do not overlap
    no_heart = example_masks.subtract(["left_lung"], ["heart"])
    assert float((no_heart * example_masks.get("heart")).sum()) == 0
    sel = example_masks.select("heart, right_lung")
    assert sel.names == ("heart", "right_lung")
    assert parse_names("Left Lung; heart") == ["left_lung", "heart"]


def test_edit_and_keep_partition_the_image(example_masks):
    edit, keep = edit_and_keep(example_masks, ["left_lung"], margin_px=12, feather_px=4, protect=["heart"])
    torch.testing.assert_close(edit + keep, torch.ones_like(edit))
    assert float(edit[example_masks.get("left_lung") > 0].mean()) > 0.9
    heart_core = example_masks.eroded(8, ["heart"]).get("heart") > 0
    assert float(edit[heart_core].max()) < 0.05  # protected
    with pytest.raises(CXRInputError, match="whole image"):
        edit_and_keep(example_masks, ["left_lung"], margin_px=2000)


@pytest.mark.parametrize(
    "masks, message",
    [
        ({}, "no organ mask"),
        ({"heart": torch.zeros(10, 10)}, "empty"),
        ({"heart": torch.full((10, 10), float("nan"))}, "NaN"),
        ({"a": torch.ones(10, 10), "b": torch.ones(10, 12)}, "one grid"),
        ({"Left Lung!": torch.ones(4, 4)}, "not a valid organ name"),
    ],
)
def test_bad_masks_are_clear_errors(masks, message):
    with pytest.raises(CXRInputError, match=message):
        OrganMasks.from_dict(masks)


def test_missing_organ_lists_the_ones_present(example_masks):
    with pytest.raises(CXRInputError, match=r"'clavicle'.*present: right_lung, left_lung, heart"):
        example_masks.get("clavicle")


def test_label_and_colour_maps(tmp_path, example_masks):
    # The CheXmask lung and heart masks overlap a little: a label map gives those pixels to the heart.
    heart = example_masks.get("heart")
    labels = example_masks.get("right_lung") * (1 - heart) + 2 * example_masks.get("left_lung") * (1 - heart)
    labels = (labels + 3 * heart).to(torch.uint8).numpy()
    Image.fromarray(labels, mode="L").save(tmp_path / "labels.png")
    grey = read_label_map(tmp_path / "labels.png", "right_lung=1, left_lung=2, heart=3")
    torch.testing.assert_close(grey.get("right_lung"), example_masks.get("right_lung") * (1 - heart))
    torch.testing.assert_close(grey.get("heart"), heart)
    colours = np.zeros((*labels.shape, 3), dtype=np.uint8)
    colours[labels == 2] = (0, 255, 0)
    colours[labels == 3] = (0, 0, 255)
    Image.fromarray(colours).save(tmp_path / "colours.png")
    cmap = read_label_map(tmp_path / "colours.png", "left_lung=#00ff00, heart=#0000ff")
    assert cmap.names == ("left_lung", "heart")
    assert float(cmap.get("left_lung").sum()) == float((labels == 2).sum())
    with pytest.raises(CXRInputError, match="no pixel"):
        read_label_map(tmp_path / "labels.png", "heart=9")
    with pytest.raises(CXRInputError, match="organ=value"):
        read_label_map(tmp_path / "labels.png", "heart")
    with pytest.raises(CXRInputError, match="do not occur"):
        label_map_to_masks(torch.from_numpy(labels.astype(np.int64)), {"x": 7})


def test_unreadable_and_missing_mask_files(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CXRInputError, match="not a readable image"):
        read_mask_image(tmp_path / "broken.png")
    with pytest.raises(CXRInputError, match="does not exist"):
        read_mask_image(tmp_path / "nope.png")


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(4, 40), w=st.integers(4, 40), th=st.integers(1, 40), scale=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**16),
)
def test_resampling_property_shape_range_and_mass(h, w, th, scale, seed):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(h, w, generator=g) > 0.5).float()
    m[0, 0] = 1
    masks = OrganMasks.from_dict({"x": m})
    tw = max(1, round(th * w / h))
    if not masks_aspect_ok(h, w, th, tw):
        return
    out = masks.resampled(th, tw)
    assert out.data.shape == (1, th, tw)
    assert float(out.data.min()) >= 0 and float(out.data.max()) <= 1


def masks_aspect_ok(h, w, th, tw) -> bool:
    from cxr_counterfactual.attention.organs import aspect_matches

    return aspect_matches(h, w, th, tw)


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_fft_dilation_equals_kornia_max_filter(radius):
    import kornia

    from cxr_counterfactual.attention.organs import dilate_binary, disk_kernel

    g = torch.Generator().manual_seed(radius)
    m = (torch.rand(2, 23, 31, generator=g) > 0.93).float()
    ours = dilate_binary(m, radius)
    ref = kornia.morphology.dilation(m[None], disk_kernel(radius), border_type="constant", border_value=0.0)[0]
    torch.testing.assert_close(ours, ref)
    ours_e = 1 - dilate_binary(1 - m, radius, outside=1.0)
    ref_e = kornia.morphology.erosion(m[None], disk_kernel(radius), border_type="constant", border_value=0.0)[0]
    torch.testing.assert_close(ours_e, ref_e)
