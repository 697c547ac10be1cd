"""The export's audit trail inside the real ComfyUI, on pydicom-data's real RG1_UNCR.dcm radiograph: the sidecar, PNG
text and DICOM private block agree, the DICOM Segmentation read back (highdicom and pydicom) holds the edit and keep
regions at native size and references the exported image, no identifier reaches any of them, and bad input (a
checkpoint gone before hashing, an edit region empty at native size) stops the export before it writes a file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from node_run import run_node
from PIL import Image
from test_dicom import IDENTIFIERS, rg1_path, write_dicom
from test_export import DEFAULTS, edited, load_and_fit, out_dir

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.export import read_provenance
from cxr_counterfactual.imaging.geometry import native_region
from cxr_counterfactual.imaging.provenance import SCHEMA

hd = pytest.importorskip("highdicom", reason='pip install "cxr-counterfactual[audit]" (highdicom)')

CHECKPOINT = "audit-test.safetensors"


def graph(dicom_name: str) -> dict:
    """The graph ComfyUI would hand the export as its hidden PROMPT: load, fit, checkpoint, sampler, decode, export."""
    return {
        "1": {"class_type": "CXRLoadDICOM", "inputs": {"dicom_file": dicom_name, "window": "auto"}},
        "2": {"class_type": "CXRFitToModel", "inputs": {"image": ["1", 0], "max_side": 256, "geometry": ["1", 1]}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 7, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 0.8}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["3", 2]}},
        "9": {"class_type": "CXRExportCounterfactual", "inputs": {"image": ["5", 0], "fit": ["2", 2], **DEFAULTS}},
    }


@pytest.fixture(scope="module")
def checkpoint(comfy, tmp_path_factory) -> Path:
    """A file in a checkpoints folder: only its bytes are read (hashed), never loaded."""
    import folder_paths

    folder = tmp_path_factory.mktemp("checkpoints")
    folder_paths.add_model_folder_path("checkpoints", str(folder))
    path = folder / CHECKPOINT
    path.write_bytes(b"not a real checkpoint: the audit trail only hashes it")
    return path


def export(comfy, image, fit, prompt, **options):
    from comfy_api.latest import io

    hidden = {io.Hidden.prompt: prompt, io.Hidden.extra_pnginfo: {"workflow": {}}, io.Hidden.unique_id: "9"}
    out = run_node(comfy.node("CXRExportCounterfactual"), hidden=hidden,
                   image=image, fit=fit, **{**DEFAULTS, **options})
    return {Path(f).name.split("_")[-1]: Path(out_dir()) / f for f in out.result[1].split("\n")}


def region_on(fitted: torch.Tensor) -> torch.Tensor:
    """The edit region of :func:`test_export.edited`, feathered by one pixel, on the fitted grid."""
    region = torch.zeros(fitted.shape[:3])
    region[:, 119:201, 39:111] = 0.5
    region[:, 120:200, 40:110] = 1.0
    return region


def listing() -> set[Path]:
    return set(Path(out_dir()).rglob("*"))


def test_sidecar_png_text_dicom_and_seg_carry_one_trail(comfy, checkpoint):
    fitted, fit = load_and_fit(comfy, "rg1_audit.dcm", rg1_path())
    from comfy_execution.utils import CurrentNodeContext

    from cxr_counterfactual.hosts.comfy import audit

    with CurrentNodeContext("prompt-a", "2"):  # what a node noted while the graph ran
        audit.note("atlas_fit_quality", [0.93])
    with CurrentNodeContext("prompt-a", "9"):
        files = export(comfy, edited(fitted), fit, graph("rg1_audit.dcm"), filename_prefix="audit/edit",
                       edit_region=region_on(fitted))
    assert sorted(files) == [".dcm", ".json", ".png", "seg.dcm"]
    doc = json.loads(files[".json"].read_text())
    assert doc["schema"] == SCHEMA and doc["graph"]["complete"] and len(doc["provenance_sha256"]) == 64
    assert doc["recipe"]["models"][0]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert doc["recipe"]["versions"]["comfyui"] == "0.3.64" and doc["recipe"]["versions"]["cxr_counterfactual"]
    assert doc["recipe"]["seeds"] == {"4": {"seed": 7}}
    assert doc["recipe"]["sampling"][0]["sampler_name"] == "euler"
    assert doc["measurements"] == {"2": {"atlas_fit_quality": [0.93]}}
    assert doc["inputs"]["1"]["dicom_file"]["sha256"] == hashlib.sha256(rg1_path().read_bytes()).hexdigest()
    assert doc["export"]["files"] == [f"audit/{p.name}" for p in files.values()]

    with Image.open(files[".png"]) as img:
        assert json.loads(img.text["cxr_provenance"]) == doc
    image = pydicom.dcmread(files[".dcm"])
    assert json.loads(read_provenance(image)) == doc
    assert doc["export"]["dicom"]["sop_instance_uid"] == image.SOPInstanceUID

    # The Segmentation, read back with highdicom: the regions at native size, referencing the exported image.
    seg = hd.seg.segread(files["seg.dcm"])
    assert seg.FrameOfReferenceUID == image.FrameOfReferenceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == image.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["edit region", "keep region"]
    pixels = seg.get_pixels_by_source_instance([image.SOPInstanceUID], segment_numbers=[1, 2])
    want = native_region(region_on(fitted), fit)[0].numpy() > 0
    assert pixels.shape == (1, image.Rows, image.Columns, 2)
    assert np.array_equal(pixels[0, ..., 0] > 0, want) and np.array_equal(pixels[0, ..., 1] > 0, ~want)
    assert json.loads(read_provenance(seg))["provenance_sha256"] == doc["provenance_sha256"]
    assert doc["export"]["segmentation"]["sop_instance_uid"] == seg.SOPInstanceUID

    # The README's picture is drawn this way: the SEG read back, over the image, by the pack's own overlay.
    from cxr_counterfactual.tools.render_seg_overlay import seg_overlay

    picture = np.asarray(seg_overlay(files[".dcm"], files["seg.dcm"], height=200).convert("RGB"), dtype=float)
    width = picture.shape[1] // 2
    tint = picture[:200, width:] - picture[:200, :width]  # the overlay panel minus the plain one
    inside = np.asarray(Image.fromarray(want).resize((width, 200), Image.NEAREST))
    assert tint[inside].mean(0)[2] < -10 and np.abs(tint[~inside]).mean() < 3  # amber inside the edit region only


def test_organ_masks_join_the_segmentation_on_request(comfy, checkpoint):
    fitted, fit = load_and_fit(comfy, "rg1_audit_organs.dcm", rg1_path(), max_side=64)
    from cxr_counterfactual.attention.organs import OrganMasks

    heart = torch.zeros(fit.height, fit.width)
    heart[30:50, 20:40] = 1
    organs = OrganMasks(("heart",), heart[None])
    region = torch.zeros(1, fit.height, fit.width)
    region[:, 10:20, 10:20] = 1
    files = export(comfy, fitted, fit, graph("rg1_audit_organs.dcm"), format="dicom", edit_region=region,
                   organ_masks=organs, segment_organs=True)
    seg = pydicom.dcmread(files["seg.dcm"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["edit region", "keep region", "heart"]
    assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"  # SNOMED CT heart
    image = pydicom.dcmread(files[".dcm"], stop_before_pixels=True)
    got = hd.seg.segread(files["seg.dcm"]).get_pixels_by_source_instance([image.SOPInstanceUID], segment_numbers=[3])
    assert np.array_equal(got[0, ..., 0] > 0, native_region(heart[None], fit)[0].numpy() > 0.5)
    assert ".png" not in files and ".json" in files


def test_no_identifier_reaches_the_trail_unless_kept(comfy, checkpoint, tmp_path):
    pixels = np.linspace(100, 4000, 96 * 80).reshape(96, 80).astype(np.uint16)
    source = write_dicom(tmp_path / "ids.dcm", pixels, bits_stored=12, WindowCenter=2000, WindowWidth=4000,
                         **IDENTIFIERS)
    fitted, fit = load_and_fit(comfy, "zzpatientname_audit.dcm", source, max_side=64)
    region = torch.zeros(1, fit.height, fit.width)
    region[:, 8:30, 8:30] = 1
    removed = export(comfy, fitted, fit, graph("zzpatientname_audit.dcm"), include_workflow=False,
                     edit_region=region)
    markers = [str(v) for v in IDENTIFIERS.values()] + ["zzpatientname_audit"]
    for path in removed.values():
        blob = path.read_bytes().decode("latin-1")
        if path.suffix == ".dcm":
            blob += str(pydicom.dcmread(path))
        if path.suffix == ".png":
            blob += json.dumps(Image.open(path).text)
        assert not [m for m in markers if m.lower() in blob.lower()], path.name
    kept = export(comfy, fitted, fit, graph("zzpatientname_audit.dcm"), keep_patient_data=True, edit_region=region)
    doc = json.loads(kept[".json"].read_text())
    assert doc["inputs"]["1"]["dicom_file"]["name"] == "zzpatientname_audit.dcm" and doc["patient_data"] == "kept"
    seg = pydicom.dcmread(kept["seg.dcm"])
    assert str(seg.PatientName) == IDENTIFIERS["PatientName"]  # the SEG belongs to the kept image's patient


def test_bad_input_stops_the_export_before_any_file_is_written(comfy, checkpoint):
    fitted, fit = load_and_fit(comfy, "rg1_audit_bad.dcm", rg1_path(), max_side=64)
    title = comfy.node("CXRExportCounterfactual").GET_SCHEMA().display_name
    before = listing()
    # An edit region that covers only the fit's padding: not a pixel of the radiograph at native size.
    padding = torch.zeros(1, fit.height, fit.width)
    padding[:, : fit.pad_top] = padding[:, fit.pad_top + fit.resized_height:] = 1
    padding[:, :, : fit.pad_left] = padding[:, :, fit.pad_left + fit.resized_width:] = 1
    for region in (torch.zeros(1, fit.height, fit.width), padding):
        with pytest.raises(CXRInputError) as info:
            export(comfy, fitted, fit, graph("rg1_audit_bad.dcm"), edit_region=region)
        assert info.value.node == title and info.value.input_name == "edit_region" and "empty" in str(info.value)
    # The checkpoint file removed after the graph ran, before the export hashed it.
    moved = checkpoint.with_suffix(".moved")
    checkpoint.rename(moved)
    try:
        with pytest.raises(CXRInputError) as info:
            export(comfy, fitted, fit, graph("rg1_audit_bad.dcm"))
        assert info.value.node == title and CHECKPOINT in str(info.value) and info.value.fix
    finally:
        moved.rename(checkpoint)
    assert listing() == before  # nothing written, nothing replaced


def test_a_graph_without_this_export_node_still_exports_with_an_incomplete_trail(comfy, checkpoint, caplog):
    fitted, fit = load_and_fit(comfy, "rg1_audit_nograph.dcm", rg1_path(), max_side=64)
    prompt = {"1": {"class_type": "CXRLoadDICOM", "inputs": {"dicom_file": "rg1_audit_nograph.dcm"}}}
    files = export(comfy, fitted, fit, prompt, format="png")
    doc = json.loads(files[".json"].read_text())
    assert not doc["graph"]["complete"] and "no node '9'" in doc["graph"]["problem"]
    assert "audit trail incomplete" in caplog.text
