"""The Load Chest X-ray (DICOM/PNG/JPEG) node inside ComfyUI with DICOM files (PNG/JPEG: test_radiograph_node.py):
schema, file listing, execution, validation, errors."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import torch
from dicom_helpers import (
    expect_error,
    ramp,
    rg1_path,
    write_dicom,
)
from node_run import run, run_node

from cxr_counterfactual.imaging.dicom import DicomRadiograph, read_dicom

NODE_TITLE = "Load Chest X-ray (DICOM/PNG/JPEG)"


@pytest.fixture(scope="module")
def rg1() -> DicomRadiograph:
    return read_dicom(rg1_path())


@pytest.fixture
def input_dir(comfy) -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def test_node_registered_with_tooltips(comfy) -> None:
    schema = comfy.node("CXRLoadDICOM").define_schema()
    assert schema.display_name == NODE_TITLE
    assert schema.category == "CXR Counterfactual/input"
    assert schema.description
    assert [i.id for i in schema.inputs] == ["dicom_file", "window"]
    for item in [*schema.inputs, *schema.outputs]:
        assert item.tooltip, f"{getattr(item, 'id', None) or item.display_name} has no tooltip"
    assert [o.io_type for o in schema.outputs] == ["IMAGE", "CXR_GEOMETRY"]
    window = schema.inputs[1]
    assert window.options == ["auto", "window", "full_range"] and window.default == "auto"


def test_node_lists_radiograph_files_only(comfy, input_dir: Path) -> None:
    shutil.copy(rg1_path(), input_dir / "dicom_list_test.dcm")
    (input_dir / "dicom_sub").mkdir(exist_ok=True)
    shutil.copy(rg1_path(), input_dir / "dicom_sub" / "IM000001")
    for name in ("photo.png", "chest.JPG", "scan.jpeg", "notes.txt", "DICOMDIR", ".hidden.png", "scan.tiff"):
        (input_dir / "dicom_sub" / name).write_bytes(b"listed by name, read by content")
    options = comfy.node("CXRLoadDICOM").define_schema().inputs[0].options
    assert "dicom_list_test.dcm" in options
    assert {"dicom_sub/IM000001", "dicom_sub/photo.png", "dicom_sub/chest.JPG", "dicom_sub/scan.jpeg"} <= set(options)
    assert not {f"dicom_sub/{n}" for n in ("notes.txt", "DICOMDIR", ".hidden.png", "scan.tiff")} & set(options)


def test_node_execute_real_radiograph(comfy, input_dir: Path, rg1: DicomRadiograph) -> None:
    shutil.copy(rg1_path(), input_dir / "rg1_node.dcm")
    node = comfy.node("CXRLoadDICOM")
    assert node.validate_inputs(dicom_file="rg1_node.dcm") is True
    out = run_node(node, dicom_file="rg1_node.dcm", window="auto")
    image, geometry = out.args
    assert image.shape == (1, 1955, 1841, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    torch.testing.assert_close(image[0, :, :, 0], rg1.pixels)
    assert torch.equal(image[..., 0], image[..., 2])
    assert geometry == rg1.geometry and geometry.source == "dicom"


def test_node_validate_missing_and_outside_files(comfy) -> None:
    node = comfy.node("CXRLoadDICOM")
    message = node.validate_inputs(dicom_file="not_there.dcm")
    assert isinstance(message, str)
    assert NODE_TITLE in message and "dicom_file" in message and "ComfyUI/input" in message
    outside = node.validate_inputs(dicom_file="../../etc/passwd")
    assert isinstance(outside, str) and "outside" in outside
    bad_window = node.validate_inputs(dicom_file="not_there.dcm", window="bright")
    assert isinstance(bad_window, str) and "window" in bad_window and "full_range" in bad_window


def test_node_validation_through_comfyui(comfy, input_dir: Path) -> None:
    """ComfyUI's own prompt validation runs the node's check (it does not check V3 combo values itself)."""
    import execution

    shutil.copy(rg1_path(), input_dir / "rg1_validate.dcm")

    def validate(dicom_file: str, window: str = "auto") -> tuple[bool, str]:
        prompt = {
            "1": {"class_type": "CXRLoadDICOM", "inputs": {"dicom_file": dicom_file, "window": window}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        result = asyncio.run(execution.validate_prompt("test", prompt, None))
        return result[0], str(result[3])

    assert validate("rg1_validate.dcm")[0] is True
    for dicom_file, window, needle in (
        ("gone.dcm", "auto", "ComfyUI/input"),
        ("../../etc/passwd", "auto", "outside"),
        ("rg1_validate.dcm", "bright", "window"),
    ):
        ok, errors = validate(dicom_file, window)
        assert not ok and NODE_TITLE in errors and needle in errors


def test_node_fingerprint_follows_the_file(comfy, input_dir: Path, tmp_path: Path) -> None:
    node = comfy.node("CXRLoadDICOM")
    path = write_dicom(input_dir / "fp.dcm", ramp(6, 6, 0, 500))
    first = node.fingerprint_inputs(dicom_file="fp.dcm", window="auto")
    assert first == node.fingerprint_inputs(dicom_file="fp.dcm", window="auto")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert node.fingerprint_inputs(dicom_file="fp.dcm", window="auto") != first


def test_node_errors_name_node_and_input(comfy, input_dir: Path) -> None:
    node = comfy.node("CXRLoadDICOM")
    (input_dir / "bad_node.dcm").write_text("plain text")
    err = expect_error(
        lambda: run(node, dicom_file="bad_node.dcm", window="auto"), NODE_TITLE, "not a DICOM"
    )
    assert err.input_name == "dicom_file"
    write_dicom(input_dir / "nowin_node.dcm", ramp(6, 6, 0, 500))
    err = expect_error(lambda: run(node, dicom_file="nowin_node.dcm", window="window"), NODE_TITLE)
    assert err.input_name == "window"
