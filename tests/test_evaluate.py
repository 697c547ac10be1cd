"""Edit metrics: known values on constructed image pairs (the formulas, not the code, give the answers), then the
evaluation and save nodes inside the real ComfyUI on the CheXmask radiograph and its human masks."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from cxr_helpers import chexmask_radiograph
from node_run import run, run_node

from cxr_counterfactual.attention.organs import OrganMasks
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.metrics import (
    PSNR_CAP_DB,
    MetricsReport,
    attention_iou,
    dice,
    dice_per_organ,
    evaluate_pair,
    grey,
    region_on,
)
from cxr_counterfactual.imaging.metrics_report import difference_heat_map, format_table, to_csv, to_json

EVAL = "CXR Evaluate Edit"
SAVE = "CXR Save Metrics"


def texture(h: int = 64, w: int = 48, seed: int = 0) -> torch.Tensor:
    """A ``[1, 1, H, W]`` image in [0.2, 0.8] with structure at every scale (SSIM must not be trivially 1)."""
    return 0.2 + 0.6 * torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(seed))


def box(h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[rows, cols] = True
    return m


# the core, on pairs with known answers -------------------------------------------------------------------------------
def test_identical_images_score_perfectly():
    src = texture()
    m = evaluate_pair(src, src.clone(), box(64, 48, slice(10, 30), slice(10, 30)))
    assert m.keep_ssim == 1.0  # eps=0: identical windows give exactly 1
    assert m.keep_psnr_db == PSNR_CAP_DB  # +inf capped, documented
    assert m.keep_mad == 0.0 and m.edit_mad == 0.0
    assert m.change_in_edit_share is None  # nothing changed: no share to speak of
    flat = torch.full((1, 1, 32, 32), 0.0)  # black on black: kornia's default eps would give 0.99998889
    assert evaluate_pair(flat, flat, box(32, 32, slice(0, 4), slice(0, 4))).keep_ssim == 1.0


def test_constant_offset_gives_its_mad_and_psnr():
    src = texture()
    edit = box(64, 48, slice(0, 16), slice(0, 48))
    m = evaluate_pair(src, src + 0.1, edit)
    assert m.keep_mad == pytest.approx(0.1, abs=1e-6) and m.edit_mad == pytest.approx(0.1, abs=1e-6)
    assert m.keep_psnr_db == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-3)  # 20 dB
    # A uniform change lies in the edit region in proportion to its area.
    assert m.change_in_edit_share == pytest.approx(16 / 64, abs=1e-6) == pytest.approx(m.edit_fraction)
    assert m.keep_ssim < 1.0  # SSIM's luminance term sees the offset


def test_change_inside_the_edit_region_is_fully_localised_and_keeps_the_rest():
    src = texture()
    edit = box(64, 48, slice(8, 56), slice(8, 40))
    edited = src.clone()
    edited[..., 20:44, 18:30] += 0.15  # ≥ 10 px inside the region: SSIM's 11-px window never reaches keep pixels
    m = evaluate_pair(src, edited, edit)
    assert m.change_in_edit_share == 1.0
    assert m.keep_ssim == 1.0 and m.keep_mad == 0.0 and m.keep_psnr_db == PSNR_CAP_DB
    assert m.edit_mad == pytest.approx(0.15 * 24 * 12 / (48 * 32), abs=1e-6)
    # Half the change moved outside: half the share.
    edited2 = src.clone()
    edited2[..., 20:30, 2:14] += 0.15  # columns 2–7 outside, 8–13 inside
    assert evaluate_pair(src, edited2, edit).change_in_edit_share == pytest.approx(0.5, abs=1e-6)


def test_dice_of_known_overlaps_and_against_the_formula():
    a = box(40, 40, slice(0, 10), slice(0, 10))
    b = box(40, 40, slice(5, 15), slice(0, 10))
    assert dice(a, b) == pytest.approx(0.5, abs=1e-6)  # |A∩B| = 50, |A| + |B| = 200
    assert dice(a, a) == 1.0 and dice(a, box(40, 40, slice(20, 30), slice(20, 30))) == 0.0
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.rand(30, 20, generator=g) > 0.6, torch.rand(30, 20, generator=g) > 0.3
        assert dice(x, y) == pytest.approx(float(2 * (x & y).sum() / (x.sum() + y.sum())), abs=1e-6)
    src = OrganMasks.from_dict({"right_lung": a.float(), "heart": box(40, 40, slice(20, 30), slice(20, 30)).float()})
    # The edit's masks on a grid twice as fine (same field of view), with an 'edit' region that is not an organ.
    big = torch.zeros(80, 80)
    big[10:30, 0:20] = 1
    edit = OrganMasks.from_dict({"right_lung": big, "edit": big, "heart": torch.nn.functional.pad(
        torch.ones(20, 20), (40, 20, 40, 20))})
    assert dice_per_organ(src.with_mask("edit", a.float()), edit, 40, 40) == pytest.approx(
        {"right_lung": 0.5, "heart": 1.0}, abs=1e-6)
    with pytest.raises(CXRInputError, match="no organ in common"):
        dice_per_organ(src, OrganMasks.from_dict({"left_lung": big}), 40, 40)


def test_attention_iou_on_the_token_grid():
    region = torch.zeros(32, 32)
    region[:, :16] = 1  # the left half of the image
    left = torch.zeros(4, 4)
    left[:, :2] = 1.0
    assert attention_iou(left, region, (4, 4)) == pytest.approx(1.0)
    column = torch.zeros(4, 4)
    column[:, 0] = 1.0
    assert attention_iou(column, region, (4, 4)) == pytest.approx(0.5)
    assert attention_iou(1 - left, region, (4, 4)) == pytest.approx(0.0)
    # A threshold below the weaker half counts the whole map: IoU = 8 / 16.
    assert attention_iou(left + 0.3, region, (4, 4), threshold=0.2) == pytest.approx(0.5)
    with pytest.raises(CXRInputError, match="fitted grid"):
        attention_iou(left, torch.ones(32, 64), (4, 4))


def test_regions_resample_only_within_a_field_of_view():
    m = torch.zeros(1, 20, 10)
    m[0, :10] = 1
    assert region_on(m, 40, 20).shape == (1, 40, 20) and int(region_on(m, 40, 20).sum()) == 400
    with pytest.raises(CXRInputError, match="field of view"):
        region_on(m, 20, 20)


def test_grey_heat_map_and_report_texts():
    image = torch.zeros(1, 8, 8, 3)
    image[..., 0] = 0.3
    assert torch.allclose(grey(image), torch.full((1, 1, 8, 8), 0.1))
    src = texture(64, 64)
    edited = src.clone()
    edited[..., 28:36, 28:36] += 0.2
    edit = box(64, 64, slice(16, 48), slice(16, 48))
    heat = difference_heat_map(src, edited, edit)
    assert heat.shape == (64, 64, 3) and float(heat.min()) >= 0 and float(heat.max()) <= 1
    assert heat[32, 32, 0] > 0.9 and heat[32, 32, 2] < 0.2  # the brightened patch is red
    assert heat[47, 30, 0] > 0.9 and heat[47, 30, 1] > 0.7 and heat[47, 30, 2] < 0.3  # yellow border (legend on top)
    pair = evaluate_pair(src, edited, edit)
    report = MetricsReport((pair, evaluate_pair(src, src, edit)), {"boost": 0.25}, 0.5)
    body = json.loads(to_json(report))  # strict JSON: no NaN or Infinity
    assert body["images"][1]["change_in_edit_share"] is None and body["images"][0]["attention_iou_boost"] == 0.25
    assert "keep_ssim" in body["definitions"] and "synthetic" in body
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert [r["image"] for r in rows] == ["0", "1"] and rows[1]["change_in_edit_share"] == ""
    assert float(rows[0]["keep_psnr_db"]) == PSNR_CAP_DB
    table = format_table(report)
    assert "keep_ssim" in table and "n/a" in table and "image 1" in table


# the nodes inside the real ComfyUI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def radiograph(comfy, chexmask_example: Path):
    """The CheXmask example radiograph at native size (IMAGE), its human masks, and edit/keep regions."""
    image, masks = chexmask_radiograph(chexmask_example)
    edit, keep, bundle = run(comfy.node("CXREditKeepRegions"), organ_masks=masks, edit_organs="left_lung",
                             margin_px=16, feather_px=4.0, protect="heart")
    return image, masks, edit, bundle


def lesion(image: torch.Tensor, bundle: OrganMasks) -> torch.Tensor:
    """A synthetic 'effusion': the lower left lung made denser, ≥ 8 px inside the edit region (SSIM's window
    reaches 5 px, so keep pixels see none of it)."""
    inner = (bundle.eroded(8, ["edit"]).get("edit") >= 0.5) & (bundle.get("left_lung") >= 0.5)
    rows = torch.arange(inner.shape[0])[:, None] > inner.shape[0] * 0.5
    out = image.clone()
    out[0] += (0.25 * (inner & rows).float())[..., None]
    return out.clamp(0, 1)


def test_nodes_are_registered_with_tooltips(comfy):
    for node_id, title in (("CXREvaluateEdit", EVAL), ("CXRSaveMetrics", SAVE)):
        schema = comfy.node(node_id).GET_SCHEMA()
        assert schema.display_name == title and schema.category.startswith("CXR Counterfactual/")
        assert schema.is_output_node and schema.description
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{node_id}: {getattr(item, 'id', None) or item.display_name} has no tooltip"
    outputs = comfy.node("CXREvaluateEdit").GET_SCHEMA().outputs
    assert [o.io_type for o in outputs] == ["IMAGE", "CXR_METRICS", "STRING"]


def test_evaluate_a_real_radiograph_edit_with_atlas_masks_of_the_edit(comfy, radiograph):
    image, masks, edit, bundle = radiograph
    edited = lesion(image, bundle)
    with torch.inference_mode():  # as ComfyUI runs nodes (the atlas fit must still get its gradients)
        edit_masks = run(comfy.node("CXRAtlasOrgans"), image=edited, min_quality=0.5)[0]
        out = run_node(comfy.node("CXREvaluateEdit"), source=image, edited=edited, edit_region=edit,
                       organ_masks=bundle, edit_organ_masks=edit_masks)
    heat, report, text = out.result
    pair = report.pairs[0]
    assert heat.shape == (1, *image.shape[1:3], 3)
    assert pair.change_in_edit_share == 1.0 and pair.keep_mad == 0.0 and pair.keep_ssim == pytest.approx(1.0)
    assert pair.organ_mad["left_lung"] > 0.02 and pair.organ_mad["right_lung"] == 0.0
    assert "edit" not in pair.organ_mad and "keep" not in pair.organ_mad  # regions of the bundle are not organs
    # Dice against an independent count on the human masks. The atlas fits intensities, so the dense lesion moves
    # its outlines (measured 0.79 / 0.71 / 0.38 here, against 0.95 / 0.94 / 0.92 on the unedited radiograph).
    for name in ("right_lung", "left_lung", "heart"):
        a, b = masks.get(name) >= 0.5, edit_masks.get(name) >= 0.5
        assert pair.organ_dice[name] == pytest.approx(float(2 * (a & b).sum() / (a.sum() + b.sum())), abs=1e-6)
    assert json.loads(text)["images"][0]["organ_dice_heart"] == pair.organ_dice["heart"]
    assert "keep_ssim" in out.ui["text"][0] and out.ui["images"]


def test_save_metrics_writes_json_and_csv_and_never_overwrites(comfy, radiograph):
    import folder_paths

    image, _, edit, bundle = radiograph
    with torch.inference_mode():
        report = run(comfy.node("CXREvaluateEdit"), source=image, edited=lesion(image, bundle), edit_region=edit)[1]
    save = comfy.node("CXRSaveMetrics")
    first = run(save, metrics=report, filename_prefix="evaltest/run")[0].split("\n")
    second = run(save, metrics=report, filename_prefix="evaltest/run")[0].split("\n")
    assert first == ["evaltest/run_00001_.json", "evaltest/run_00001_.csv"]
    assert second == ["evaltest/run_00002_.json", "evaltest/run_00002_.csv"]
    out = Path(folder_paths.get_output_directory())
    body = json.loads((out / first[0]).read_text())
    assert body["images"][0]["change_in_edit_share"] == 1.0
    rows = list(csv.DictReader((out / first[1]).open()))
    assert len(rows) == 1 and float(rows[0]["keep_mad"]) == 0.0
    (out / "evaltest" / "run_00003_.csv").write_text("someone else's file")  # a file taking the next number
    third = run(save, metrics=report, filename_prefix="evaltest/run")[0].split("\n")
    assert third[0] == "evaltest/run_00004_.json" and (out / "evaltest" / "run_00003_.csv").read_text() == \
        "someone else's file"
    with pytest.raises(CXRInputError) as info:
        run(save, metrics=report, filename_prefix="../../outside")
    assert SAVE in str(info.value) and "filename_prefix" in str(info.value)


def test_attention_iou_of_a_captured_run(comfy, tiny_model, chest):
    from cxr_helpers import sample

    capture = run(comfy.node("CXRCaptureAttention"), model=tiny_model.model, tokens=chest.tokens, label="stock",
                  grid_factor="1", organ_masks=chest.masks)[0]
    latent = {"samples": sample(comfy, capture, chest)}
    edit = run(comfy.node("CXREditKeepRegions"), organ_masks=chest.masks, edit_organs="left_lung", margin_px=2,
               feather_px=1.0, protect="heart")[0]
    with torch.inference_mode():
        source = comfy.node("VAEDecode")().decode(tiny_model.vae, chest.latent)[0]
        edited = comfy.node("VAEDecode")().decode(tiny_model.vae, latent)[0]
    node = comfy.node("CXREvaluateEdit")
    report = run(node, source=source, edited=edited, edit_region=edit, model=capture, latent=latent,
                 tokens=chest.tokens)[1]
    assert set(report.attention_iou) == {"stock"} and 0.0 <= report.attention_iou["stock"] <= 1.0
    with pytest.raises(CXRInputError, match="captured no attention") as info:  # a run without capture
        run(node, source=source, edited=edited, edit_region=edit, model=tiny_model.model, latent=chest.latent,
            tokens=chest.tokens)
    assert EVAL in str(info.value) and "'latent'" in str(info.value)
    with pytest.raises(CXRInputError, match="tokens"):
        run(node, source=source, edited=edited, edit_region=edit, model=capture, latent=latent)


@pytest.mark.parametrize("case, input_name", [("size", "edited"), ("batch", "edited"), ("mask", "edit_region"),
                                              ("organs", "organ_masks"), ("dice", "organ_masks"),
                                              ("half_run", "latent")])
def test_bad_inputs_name_node_input_and_fix(comfy, radiograph, case, input_name):
    image, masks, edit, bundle = radiograph
    inputs = dict(source=image, edited=image, edit_region=edit)
    if case == "size":
        inputs["edited"] = image[:, :-8]
    elif case == "batch":
        inputs.update(source=image.repeat(2, 1, 1, 1), edited=image.repeat(3, 1, 1, 1))
    elif case == "mask":
        inputs["edit_region"] = edit[..., :-100]
    elif case == "organs":
        inputs["organ_masks"] = OrganMasks(masks.names, masks.data[:, :-100])
    elif case == "dice":
        inputs["edit_organ_masks"] = masks
    elif case == "half_run":
        inputs["model"] = object()
    with pytest.raises(CXRInputError) as info:
        run(comfy.node("CXREvaluateEdit"), **inputs)
    err = info.value
    assert err.node == EVAL and err.input_name == input_name and err.fix, str(err)
