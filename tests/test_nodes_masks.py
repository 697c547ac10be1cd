"""In-process tests of the mask, preview and geometry nodes inside the real ComfyUI (CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from node_run import run, run_node
from PIL import Image

MASK_FILES = {"right_lung": "RL_mask.png", "left_lung": "LL_mask.png", "heart": "H_mask.png"}


@pytest.fixture(scope="module")
def inputs(comfy, chexmask_example) -> Path:
    """The CheXmask example radiograph and masks copied into ComfyUI's input folder."""
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    for name in [*MASK_FILES.values(), "utils_example1.jpg"]:
        shutil.copy(chexmask_example / name, root / name)
    return root


@pytest.fixture(scope="module")
def radiograph(chexmask_example) -> torch.Tensor:
    img = Image.open(chexmask_example / "utils_example1.jpg").convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def organ_masks(comfy, inputs):
    return run(comfy.node("CXRLoadOrganMasks"), **MASK_FILES, threshold=0.5)[0]


def test_every_pack_node_is_registered_with_tooltips_and_category(comfy):
    from cxr_counterfactual.nodes import all_nodes

    ids = [cls.GET_SCHEMA().node_id for cls in all_nodes()]
    assert len(ids) == len(set(ids)) >= 10
    for cls in all_nodes():
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("CXR") and schema.node_id in comfy.nodes.NODE_CLASS_MAPPINGS
        assert schema.category.startswith("CXR Counterfactual/")
        assert schema.description, schema.node_id
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{schema.node_id}.{getattr(item, 'id', item.display_name)} has no tooltip"


def test_load_organ_masks_from_files(comfy, organ_masks, chexmask_example):
    assert type(organ_masks).__name__ == "OrganMasks"
    assert organ_masks.names == ("right_lung", "left_lung", "heart")
    assert (organ_masks.height, organ_masks.width) == (899, 786)
    ref = np.asarray(Image.open(chexmask_example / "LL_mask.png").convert("L")) > 127
    assert torch.equal(organ_masks.get("left_lung").bool(), torch.from_numpy(ref))


def test_loader_validation_messages_name_node_input_and_fix(comfy, inputs):
    cls = comfy.node("CXRLoadOrganMasks")
    msg = cls.validate_inputs(right_lung="missing.png", left_lung="(none)", heart="(none)")
    assert "Load Organ Masks" in msg and "right_lung" in msg and "Fix:" in msg
    assert "no mask file" in cls.validate_inputs(right_lung="(none)", left_lung="(none)", heart="(none)")
    assert cls.validate_inputs(**MASK_FILES) is True
    schema = cls.GET_SCHEMA()
    assert "LL_mask.png" in schema.inputs[0].options  # the combo lists ComfyUI's input folder


def test_all_zero_mask_file_is_a_clear_error(comfy, inputs):
    Image.new("L", (786, 899), 0).save(inputs / "blank.png")
    with pytest.raises(ValueError) as err:
        run(comfy.node("CXRLoadOrganMasks"), right_lung="blank.png", left_lung="(none)", heart="(none)", threshold=0.5)
    text = str(err.value)
    assert "[Load Organ Masks (files)]" in text and "empty" in text and "Fix:" in text


def test_masks_from_comfy_mask_inputs_and_extension(comfy, organ_masks):
    cls = comfy.node("CXROrganMasksFromMask")
    lesion = torch.zeros(1, 899, 786)
    lesion[0, 600:700, 500:600] = 1
    out = run(cls, other_name="Lesion", other=lesion, organ_masks=organ_masks)[0]
    assert out.names == ("right_lung", "left_lung", "heart", "lesion")
    assert organ_masks.names == ("right_lung", "left_lung", "heart")  # the input bundle is untouched
    with pytest.raises(ValueError, match="no name"):
        run(cls, other_name="", other=lesion)
    # A MASK batch gives one set per image; batches of different sizes do not pair up.
    with pytest.raises(ValueError, match=r"input 'heart': got a batch of 2 masks where the batch has 3 images"):
        run(cls, other_name="", heart=torch.ones(2, 8, 8), right_lung=torch.ones(3, 8, 8))


def test_ops_nodes(comfy, organ_masks):
    combined, mask = run(comfy.node("CXRCombineOrgans"), organ_masks=organ_masks, organs="right_lung, left_lung",
                         subtract="heart", name="lungs")
    assert "lungs" in combined and mask.shape == (1, 899, 786)
    assert float((mask[0] * organ_masks.get("heart")).sum()) == 0
    grown = run(comfy.node("CXRMorphOrgans"), organ_masks=organ_masks, organs="heart", operation="dilate",
                size_px=6.0)[0]
    assert grown.area_fraction("heart") > organ_masks.area_fraction("heart")
    sel = run(comfy.node("CXRSelectOrgans"), organ_masks=organ_masks, organs="heart")[0]
    assert sel.names == ("heart",)
    with pytest.raises(ValueError, match=r"\[Select Organs\].*'organs'.*clavicle"):
        run(comfy.node("CXRSelectOrgans"), organ_masks=organ_masks, organs="clavicle")
    one = run(comfy.node("CXROrganToMask"), organ_masks=organ_masks, organs="left_lung")[0]
    assert torch.equal(one[0], organ_masks.get("left_lung"))


def test_edit_keep_regions_node(comfy, organ_masks):
    edit, keep, bundle = run(comfy.node("CXREditKeepRegions"), organ_masks=organ_masks, edit_organs="left_lung",
                             margin_px=10, feather_px=3.0, protect="heart")
    torch.testing.assert_close(edit + keep, torch.ones_like(edit))
    assert {"edit", "keep"} <= set(bundle.names)
    with pytest.raises(ValueError, match=r"\[Edit / Keep Regions\].*empty"):
        run(comfy.node("CXREditKeepRegions"), organ_masks=organ_masks, edit_organs="heart", margin_px=0,
            feather_px=0.0, protect="heart")


def test_preview_draws_each_organ_in_its_colour(comfy, organ_masks, radiograph):
    out = run_node(comfy.node("CXRPreviewOrganMasks"), image=radiograph, organ_masks=organ_masks, opacity=0.5)
    overlay = out.result[0]
    assert overlay.shape == radiograph.shape
    ui = out.ui.as_dict()
    saved = ui["images"][0]
    import folder_paths

    assert (Path(folder_paths.get_temp_directory()) / saved["subfolder"] / saved["filename"]).is_file()
    # Inside the right lung the red channel gains most, inside the heart the blue one.
    diff = overlay[0] - radiograph[0]
    core = lambda n: organ_masks.eroded(6, [n]).get(n).bool()  # noqa: E731
    rl, heart = diff[core("right_lung")].mean(0), diff[core("heart")].mean(0)
    assert rl[0] > rl[1] and rl[0] > rl[2]
    assert heart[2] > heart[0] and heart[2] > heart[1]
    # Outside every organ (away from the legend) the radiograph is unchanged.
    outside = organ_masks.dilated(4).union(organ_masks.names) == 0
    outside[:120, :260] = False
    assert float(diff[outside].abs().max()) == 0


def test_preview_rejects_masks_of_another_aspect(comfy, organ_masks):
    with pytest.raises(ValueError, match=r"\[Preview Organ Masks\].*aspect"):
        run(comfy.node("CXRPreviewOrganMasks"), image=torch.zeros(1, 512, 512, 3), organ_masks=organ_masks,
            opacity=0.5)


def test_fit_and_restore_round_trip(comfy, organ_masks, radiograph):
    image, masks, fit = run(comfy.node("CXRFitToModel"), image=radiograph, max_side=512,
                            organ_masks=organ_masks)
    assert image.shape[1] % 8 == 0 and image.shape[2] % 8 == 0 and max(image.shape[1:3]) == 512
    assert (masks.height, masks.width) == tuple(image.shape[1:3])
    for name in masks.names:
        assert masks.data[masks.names.index(name)].sum() > 0
    back, back_mask = run(comfy.node("CXRRestoreNativeSize"), image=image, fit=fit,
                          mask=masks.get("left_lung")[None])
    assert back.shape == radiograph.shape
    assert float((back - radiograph).abs().mean()) < 0.03
    dice = 2 * float(((back_mask[0] > 0.5) & organ_masks.get("left_lung").bool()).sum()) / (
        float((back_mask[0] > 0.5).sum()) + float(organ_masks.get("left_lung").sum()))
    assert dice > 0.98
    with pytest.raises(ValueError, match=r"\[Restore Native Size\].*fitted size"):
        run(comfy.node("CXRRestoreNativeSize"), image=radiograph, fit=fit)


def test_file_inputs_cannot_leave_the_input_folder(comfy, inputs, tmp_path):
    secret = inputs.parent / "outside.png"
    Image.new("L", (8, 8), 255).save(secret)
    cls = comfy.node("CXRLoadOrganMasks")
    msg = cls.validate_inputs(right_lung="../outside.png", left_lung="(none)", heart="(none)")
    assert "outside ComfyUI's input folder" in msg and "[Load Organ Masks (files)]" in msg
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        run(cls, right_lung="../outside.png", left_lung="(none)", heart="(none)", threshold=0.5)
    label = comfy.node("CXRLoadOrganLabelMap")
    assert "outside" in label.validate_inputs(label_map=str(secret))


def test_combo_values_are_checked_by_the_node(comfy, organ_masks):
    # ComfyUI 0.3.64 does not check V3 combo values against their options; the node must.
    with pytest.raises(ValueError, match=r"\[Dilate / Erode / Feather Organs\].*'operation'.*'explode'"):
        run(comfy.node("CXRMorphOrgans"), organ_masks=organ_masks, organs="heart", operation="explode", size_px=2.0)
