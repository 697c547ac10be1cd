"""The reversible fit of a radiograph to the model grid (pure core)."""

from __future__ import annotations

import pytest
import torch

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.geometry import apply_fit, plan_fit, undo_fit


@pytest.mark.parametrize(
    "native, max_side", [((1955, 1841), 512), ((899, 786), 512), ((512, 512), 512), ((300, 901), 256), ((7, 5), 64)]
)
def test_plan_fit_keeps_aspect_and_pads_to_multiples_of_8(native, max_side):
    fit = plan_fit(*native, max_side)
    assert fit.height % 8 == 0 and fit.width % 8 == 0
    assert max(fit.resized_height, fit.resized_width) == max_side
    assert fit.resized_height / fit.resized_width == pytest.approx(native[0] / native[1], rel=0.01)
    assert abs(fit.pad_top - fit.pad_bottom) <= 1 and abs(fit.pad_left - fit.pad_right) <= 1
    assert max(fit.pad_top + fit.pad_bottom, fit.pad_left + fit.pad_right) < 8


def test_round_trip_returns_to_native_size_and_content():
    g = torch.Generator().manual_seed(0)
    # A smooth image survives down- and up-scaling closely.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 1955), torch.linspace(0, 1, 1841), indexing="ij")
    img = (0.5 + 0.3 * torch.sin(6 * yy) * torch.cos(4 * xx))[None, None].repeat(1, 3, 1, 1)
    img = img + 0.001 * torch.rand(img.shape, generator=g)
    fit = plan_fit(1955, 1841, 512)
    small = apply_fit(img, fit)
    assert small.shape[-2:] == (fit.height, fit.width)
    # The padding is black (0) and the content sits in the middle.
    if fit.pad_left:
        assert float(small[..., :, : fit.pad_left].abs().max()) == 0
    back = undo_fit(small, fit)
    assert back.shape == img.shape
    assert float((back - img).abs().mean()) < 0.005


def test_masks_round_trip_nearest_is_exact_at_native_size_multiple():
    m = torch.zeros(1, 1, 64, 48)
    m[..., 10:40, 5:30] = 1
    fit = plan_fit(64, 48, 128)  # an exact ×2 scale
    up = apply_fit(m, fit, mode="nearest")
    torch.testing.assert_close(undo_fit(up, fit, mode="nearest"), m)


def test_fit_errors_name_the_fix():
    with pytest.raises(CXRInputError, match="multiple of 8"):
        plan_fit(100, 100, 100)
    fit = plan_fit(100, 80, 64)
    with pytest.raises(CXRInputError, match="native size"):
        apply_fit(torch.zeros(1, 1, 90, 80), fit)
    with pytest.raises(CXRInputError, match="fitted size"):
        undo_fit(torch.zeros(1, 1, 90, 80), fit)


def test_composite_keeps_every_native_pixel_outside_the_edit_region_bit_for_bit(chexmask_example):
    """The real radiograph (786×899) and its left lung as the edit region: the composite is the source
    exactly wherever the region's weight is 0 at native size, the edit inside, and a blend in the feather."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from cxr_counterfactual.imaging.geometry import composite_native

    grey = np.asarray(Image.open(chexmask_example / "utils_example1.jpg").convert("L"), dtype=np.float32) / 255
    source = torch.from_numpy(grey)[None, ..., None].expand(1, -1, -1, 3)
    lung = np.asarray(Image.open(chexmask_example / "LL_mask.png").convert("L"), dtype=np.float32) / 255
    fit = plan_fit(*grey.shape, 128)
    region = apply_fit(torch.from_numpy(lung)[None, None], fit, mode="bilinear")[0]  # fitted grid
    region = F.avg_pool2d(region[None], 5, stride=1, padding=2)[0, 0]  # a feathered border
    edited = torch.rand(1, fit.height, fit.width, 3, generator=torch.Generator().manual_seed(1))  # colour noise
    out, native_region = composite_native(source, edited, region, fit)
    assert out.shape == source.shape and native_region.shape == (1, *grey.shape)
    outside, inside = native_region == 0, native_region == 1
    assert 0.05 < float(outside.float().mean()) < 0.95 and bool(inside.any())
    assert torch.equal(out[outside], source[outside])  # bit for bit, not a VAE or resampling round trip
    assert float((out[inside] - source[inside]).abs().mean()) > 0.1  # the edit is there
    assert torch.equal(out[..., 0], out[..., 2])  # a grey source stays grey (the edit's channel mean)
    # In the feather: the source and the edit (scaled back on its own) blended by the region's weight.
    edit_native = undo_fit(edited.mean(-1)[:, None], fit)[:, 0]
    feather = (native_region > 0.2) & (native_region < 0.8)
    expected = source[..., 0] + native_region * (edit_native - source[..., 0])
    assert bool(feather.any()) and torch.allclose(out[..., 0][feather], expected[feather], atol=1e-5)
    with pytest.raises(CXRInputError, match="not the radiograph the fit was made for") as err:
        composite_native(source[:, :-1], edited, region, fit)
    assert err.value.input_name == "source" and err.value.fix
