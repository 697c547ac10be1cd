"""Every kind of radiograph file through the loader node, the fit and the atlas inside ComfyUI: DICOM
MONOCHROME1/2, PNG 8/16-bit grey and colour, JPEG grey and colour, square and non-square (made at test time
from the shared real radiographs), and images the atlas must refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from node_run import run
from PIL import Image
from radiograph_files import SIDE, extremity_png, png_bytes, variants

from cxr_counterfactual.errors import CXRInputError

LOADER, ATLAS = "Load Chest X-ray (DICOM/PNG/JPEG)", "Organ Masks from Atlas (approximate)"
# Pixels are float32 (see test_radiograph.py).
F32 = 4 * float(np.finfo(np.float32).eps)


@pytest.fixture
def input_dir(comfy) -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def load(comfy, name: str, window: str = "auto") -> tuple[torch.Tensor, object]:
    node = comfy.node("CXRLoadDICOM")
    assert node.validate_inputs(dicom_file=name, window=window) is True
    return run(node, dicom_file=name, window=window)


def test_schema_keeps_the_id_and_the_input_order(comfy):
    schema = comfy.node("CXRLoadDICOM").define_schema()
    assert schema.node_id == "CXRLoadDICOM" and schema.display_name == LOADER
    assert [i.id for i in schema.inputs] == ["dicom_file", "window"]  # saved workflows store values by position
    assert "BT.601" in schema.inputs[0].tooltip and "alpha" in schema.inputs[0].tooltip
    assert "65535" in schema.inputs[1].tooltip


@pytest.mark.parametrize("index", range(10))
def test_every_kind_goes_through_loader_fit_and_atlas(comfy, data_dir, input_dir, index):
    variant = variants(data_dir)[index]
    name = f"node_{variant.name}{variant.suffix}"
    expected = variant.write(input_dir / name)
    image, geometry = load(comfy, name)
    assert image.shape == (1, *expected.shape, 3) and torch.equal(image[..., 0], image[..., 2])
    np.testing.assert_allclose(image[0, ..., 0].numpy(), expected, rtol=0, atol=F32)
    assert max(expected.shape) == SIDE and (expected.shape[0] == expected.shape[1]) == ("nonsquare" not in name)

    masks, overlay, report = run(comfy.node("CXRAtlasOrgans"), image=image, min_quality=0.5)
    assert overlay.shape == image.shape and "quality" in report
    cols = {organ: float(masks.get(organ).nonzero()[:, -1].float().mean()) for organ in ("right_lung", "left_lung")}
    assert cols["right_lung"] < expected.shape[1] / 2 < cols["left_lung"], cols  # patient's right on image left

    fitted, fitted_masks, fit = run(comfy.node("CXRFitToModel"), image=image, max_side=64, organ_masks=masks,
                                    geometry=geometry)
    assert max(fitted.shape[1:3]) == 64 and fitted.shape[1] % 8 == 0 and fitted.shape[2] % 8 == 0
    assert fitted_masks.get("left_lung").shape[-2:] == fitted.shape[1:3]
    assert fit.geometry == geometry and fit.geometry.bits_stored == geometry.bits_stored
    native, _ = run(comfy.node("CXRRestoreNativeSize"), image=fitted, fit=fit)
    assert native.shape == image.shape


def test_a_sixteen_bit_png_is_not_saturated_as_load_image_saturates_it(comfy, input_dir):
    values = np.arange(65536, dtype=np.int64).reshape(256, 256)
    (input_dir / "ramp16.png").write_bytes(png_bytes(values, 16))
    image, geometry = load(comfy, "ramp16.png")
    assert geometry.bits_stored == 16 and int((image[0, ..., 0] >= 1).sum()) == 1
    np.testing.assert_allclose(image[0, ..., 0].numpy(), values / 65535, rtol=0, atol=F32)
    # ComfyUI's Load Image on the same file: what the workflows used before (measured 99.6% white).
    core, _ = comfy.node("LoadImage")().load_image("ramp16.png")
    assert float((core[0, ..., 0] >= 1).float().mean()) > 0.99


def test_a_non_chest_png_and_a_rotated_jpeg_reach_the_atlas_refusal(comfy, input_dir, data_dir):
    """Real radiographs the atlas cannot fit stop at its fit-quality check, not in a crash."""
    (input_dir / "extremity.png").write_bytes(extremity_png())  # a real radiograph, not of a chest
    chest = Image.open(data_dir / "cxr" / "nih" / "00000001_000.png").convert("L").resize((SIDE, SIDE))
    chest.rotate(90).save(input_dir / "rotated.jpg", quality=95)  # a PA view on its side
    for name in ("extremity.png", "rotated.jpg"):
        image, _ = load(comfy, name)
        with pytest.raises(CXRInputError) as err:
            run(comfy.node("CXRAtlasOrgans"), image=image, min_quality=0.5)
        text = str(err.value)
        assert text.startswith(f"[{ATLAS}] input 'image'") and "REJECTED" in text and "Fix:" in text, text


def test_bad_files_are_errors_that_name_the_node_and_the_input(comfy, input_dir, chexmask_example):
    data = (chexmask_example / "utils_example1.jpg").read_bytes()
    (input_dir / "cut.jpg").write_bytes(data[: len(data) // 3])
    (input_dir / "one.png").write_bytes(png_bytes(np.array([[7]]), 8))
    for name, needle in (("cut.jpg", "truncated"), ("one.png", "too small")):
        with pytest.raises(CXRInputError) as err:
            load(comfy, name)
        assert str(err.value).startswith(f"[{LOADER}] input 'dicom_file'") and needle in str(err.value)
    (input_dir / "grey.png").write_bytes(png_bytes(np.arange(64 * 64).reshape(64, 64) % 251, 8))
    with pytest.raises(CXRInputError) as err:
        load(comfy, "grey.png", window="window")
    assert str(err.value).startswith(f"[{LOADER}] input 'window'"), err.value
