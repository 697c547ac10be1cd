"""The Load Organ Masks (CheXmask) node inside ComfyUI: schema, listing, loading on the grid and on the radiograph,
border crops, errors naming node, input and fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from node_run import run
from test_chexmask import LOW_DICE_MIMIC, centre_x

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.chexmask_index import open_index


@pytest.fixture(scope="module")
def rows_dir(data_dir: Path) -> Path:
    return data_dir / "cxr" / "chexmask-rows"


@pytest.fixture(scope="module")
def node_inputs(comfy, rows_dir) -> Path:
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    (root / "chexmask").mkdir(exist_ok=True)
    for name in ("VinDr-CXR.csv", "MIMIC-CXR-JPG.csv"):
        shutil.copy(rows_dir / name, root / "chexmask" / name)
    return root


def load(comfy, **inputs):
    return run(comfy.node("CXRLoadCheXmask"), **inputs)


def test_node_schema_and_listing(comfy, node_inputs):
    schema = comfy.node("CXRLoadCheXmask").GET_SCHEMA()
    assert schema.display_name == "Load Organ Masks (CheXmask)" and schema.category.endswith("/masks")
    assert all(item.tooltip for item in [*schema.inputs, *schema.outputs]) and schema.description
    assert "chexmask/VinDr-CXR.csv" in schema.inputs[0].options


def test_node_loads_a_row_on_its_grid_and_on_the_radiograph(comfy, node_inputs, rows_dir):
    image_id = next(iter(open_index(rows_dir / "VinDr-CXR.csv").offsets))
    masks, quality = load(comfy, csv_file="chexmask/VinDr-CXR.csv", image_id=f" {image_id} ")
    assert (masks.height, masks.width) == (1024, 1024) and "Dice RCA (Mean) 0.848" in quality
    masks, quality = load(comfy, csv_file="chexmask/VinDr-CXR.csv", image_id=image_id, image=torch.rand(1, 899, 786, 3))
    assert (masks.height, masks.width) == (899, 786) and "undoing" in quality
    assert masks.names == ("right_lung", "left_lung", "heart")


def test_node_undoes_mimic_border_crop(comfy, node_inputs, rows_dir):
    image_id = next(iter(open_index(rows_dir / "MIMIC-CXR-JPG.csv").offsets))
    image = torch.full((1, 900, 800, 3), 0.5)
    image[:, :, :20] = 0  # a black border on the left, as remove_padding would crop
    common = {"csv_file": "chexmask/MIMIC-CXR-JPG.csv", "image_id": image_id, "image": image}
    undone, quality = load(comfy, **common)
    assert "cropped (left, top, right, bottom px): 20, 0, 0, 0" in quality
    ignored, _ = load(comfy, **common, border_crop="ignore")

    # side 900 either way; centring pad 60 (inner 780 wide) instead of 50, shifted by the 20 px crop.
    shift = centre_x(undone.get("heart").numpy()) - centre_x(ignored.get("heart").numpy())
    assert shift == pytest.approx(10, abs=0.6)


def test_node_errors_name_node_input_and_fix(comfy, node_inputs):
    cls = comfy.node("CXRLoadCheXmask")
    ok = {"csv_file": "chexmask/VinDr-CXR.csv", "image_id": "x", "id_column": "auto", "border_crop": "auto"}
    assert cls.validate_inputs(**ok) is True
    for change, words in (
        ({"csv_file": "../../etc/passwd"}, "outside ComfyUI's input folder"),
        ({"csv_file": "missing.csv"}, "not in ComfyUI's input folder"),
        ({"csv_file": "big.csv.gz"}, "compressed"),
        ({"image_id": "  "}, "input 'image_id'"),
        ({"id_column": "Patient"}, "input 'id_column'"),
    ):
        message = cls.validate_inputs(**{**ok, **change})
        assert isinstance(message, str) and words in message and "Load Organ Masks (CheXmask)" in message, message
        assert "Fix:" in message
    with pytest.raises(CXRInputError) as err:
        load(comfy, csv_file="chexmask/VinDr-CXR.csv", image_id="no-such-id")
    text = str(err.value)
    assert "'no-such-id'" in text and "column 'image_id'" in text and "[Load Organ Masks (CheXmask)]" in text
    with pytest.raises(CXRInputError, match="0.694.*Fix:"):
        load(comfy, csv_file="chexmask/MIMIC-CXR-JPG.csv", image_id=LOW_DICE_MIMIC)
