"""Export at native size: round trips through Pillow, pydicom and the pack's own DICOM reader, on pydicom-data's real
RG1_UNCR.dcm (15-bit MONOCHROME1 CR) loaded and fitted by the pack's nodes inside the real ComfyUI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from node_run import run, run_node
from PIL import Image
from test_dicom import IDENTIFIERS, rg1_path, write_dicom

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.dicom import read_dicom
from cxr_counterfactual.imaging.export import DESCRIPTION, SYNTHETIC_TEXT, quantise
from cxr_counterfactual.imaging.geometry import undo_fit

TITLE = "Export Counterfactual (native size)"
NATIVE = (1955, 1841)  # RG1_UNCR's rows, columns
PROMPT = {"1": {"class_type": "CXRLoadDICOM", "inputs": {"dicom_file": "rg1_export.dcm"}}}
WORKFLOW = {"nodes": [{"id": 1, "type": "CXRLoadDICOM"}], "links": []}
DEFAULTS = dict(filename_prefix="export/edit", format="png+dicom", bit_depth="auto", keep_patient_data=False,
                include_workflow=True)


def export(comfy, image, fit, **options):
    """Run the node as ComfyUI does for an output node (prompt and workflow as hidden inputs)."""
    from comfy_api.latest import io

    out = run_node(comfy.node("CXRExportCounterfactual"),
                   hidden={io.Hidden.prompt: PROMPT, io.Hidden.extra_pnginfo: {"workflow": WORKFLOW}},
                   image=image, fit=fit, **{**DEFAULTS, **options})
    written = [Path(out_dir()) / f for f in out.result[1].split("\n")]
    assert all(p.is_file() for p in written) and any(p.suffix == ".json" for p in written)  # every export: a sidecar
    return out, [p for p in written if p.suffix in (".png", ".dcm") and not p.name.endswith("_seg.dcm")]


def out_dir() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def load_and_fit(comfy, name: str, source: Path, max_side: int = 256):
    import folder_paths

    shutil.copy(source, Path(folder_paths.get_input_directory()) / name)
    image, geometry = run(comfy.node("CXRLoadDICOM"), dicom_file=name, window="auto")
    fitted, _, fit = run(comfy.node("CXRFitToModel"), image=image, max_side=max_side, geometry=geometry)
    return fitted, fit


def edited(fitted: torch.Tensor) -> torch.Tensor:
    """A visible 'edit': a denser patch in the image's left half (the patient's right lung), slight colour cast."""
    out = fitted.clone()
    out[:, 120:200, 40:110] = (out[:, 120:200, 40:110] + 0.2).clamp(0, 1)
    out[..., 0] = (out[..., 0] * 0.98).clamp(0, 1)
    return out


@pytest.fixture(scope="module")
def rg1(comfy):
    return load_and_fit(comfy, "rg1_export.dcm", rg1_path())


def expected_native(image: torch.Tensor, fit) -> np.ndarray:
    """What the export should hold: the grey edit (channel mean) brought back to native size by undo_fit."""
    return undo_fit(image[..., :3].mean(-1, keepdim=True).movedim(-1, 1), fit)[0, 0].clamp(0, 1).numpy()


def test_node_is_registered_with_tooltips_and_the_hidden_prompt(comfy):
    cls = comfy.node("CXRExportCounterfactual")
    schema = cls.GET_SCHEMA()
    assert schema.display_name == TITLE and schema.is_output_node and schema.category.startswith("CXR Counterfactual/")
    for item in [*schema.inputs, *schema.outputs]:
        assert item.tooltip, f"{getattr(item, 'id', None) or item.display_name} has no tooltip"
    assert set(cls.INPUT_TYPES()["hidden"]) == {"prompt", "extra_pnginfo", "unique_id"}  # SaveImage's, and its id


def test_png_and_dicom_round_trip_at_native_size(comfy, rg1):
    fitted, fit = rg1
    edit = edited(fitted)
    out, (png, dcm) = export(comfy, edit, fit)
    want = expected_native(edit, fit)
    assert out.result[0].shape == (1, *NATIVE, 3) and png.suffix == ".png" and dcm.suffix == ".dcm"
    assert out.ui["images"][0]["filename"] == png.name and out.ui["images"][0]["type"] == "output"

    img = Image.open(png)
    assert img.size == (NATIVE[1], NATIVE[0]) and img.mode in ("I;16", "I;16B", "I")  # 16-bit grey
    values = np.asarray(img, dtype=np.float64) / 65535
    assert np.abs(values - want).max() <= 0.5 / 65535 + 1e-6  # only the rounding to 16 bits
    assert img.text["cxr_counterfactual"] == SYNTHETIC_TEXT and "SYNTHETIC COUNTERFACTUAL" in img.text["Comment"]
    assert json.loads(img.text["prompt"]) == PROMPT and json.loads(img.text["workflow"]) == WORKFLOW

    ds, src = pydicom.dcmread(dcm), pydicom.dcmread(rg1_path(), stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == NATIVE and ds.BitsStored == 15 and ds.BitsAllocated == 16
    assert ds.HighBit == 14 and ds.PixelRepresentation == 0 and ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array.astype(np.int64)
    assert np.abs(stored - np.rint((1 - want) * 32767)).max() <= 1  # MONOCHROME1: dense = low values
    for uid in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert ds[uid].value != src[uid].value, uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert ds.SeriesDescription == DESCRIPTION and "SYNTHETIC COUNTERFACTUAL" in ds.DerivationDescription
    assert ds.BurnedInAnnotation == "NO" and ds.PatientIdentityRemoved == "YES"
    assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID"):
        assert not ds.get(keyword), keyword
    for keyword in ("OtherPatientIDs", "InstitutionName", "StationName", "DeviceSerialNumber", "SourceImageSequence"):
        assert keyword not in ds, keyword
    blob = dcm.read_bytes()
    for secret in (b"CompressedSamples", b"9RG1", b"19400305", b"26210", b"Hamburg", b"THORAVISION", b"92.00.003"):
        assert secret not in blob, secret
    # The pack's own reader (file window, MONOCHROME1 inverted) gives back the exported grey levels.
    back = read_dicom(dcm)
    assert back.geometry.photometric == "MONOCHROME1" and back.voi == "window"
    assert np.abs(back.pixels.numpy() - want).max() <= 0.5 / 32767 + 1e-6


def test_keep_patient_data_copies_the_header_and_links_the_source(comfy, rg1):
    fitted, fit = rg1
    _, (dcm,) = export(comfy, fitted, fit, format="dicom", keep_patient_data=True)
    ds, src = pydicom.dcmread(dcm), pydicom.dcmread(rg1_path(), stop_before_pixels=True)
    assert str(ds.PatientName) == str(src.PatientName) and ds.PatientID == src.PatientID
    assert ds.StudyInstanceUID == src.StudyInstanceUID  # files next to the source study...
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID  # ...as new
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.SeriesDescription == DESCRIPTION and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.WindowCenter == 2**14 and ds.WindowWidth == 2**15  # the source's 15000/30000 described its pixels


def test_synthetic_identifiers_never_reach_a_deidentified_export(comfy, tmp_path):
    pixels = np.linspace(100, 4000, 48 * 40).reshape(48, 40).astype(np.uint16)
    source = write_dicom(tmp_path / "ids.dcm", pixels, bits_stored=12, WindowCenter=2000, WindowWidth=4000,
                         PixelSpacing=[0.2, 0.2], **IDENTIFIERS)
    fitted, fit = load_and_fit(comfy, "ids_export.dcm", source, max_side=64)
    _, (png, dcm) = export(comfy, fitted, fit, include_workflow=False)
    ds = pydicom.dcmread(dcm)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 12
    assert [float(v) for v in ds.PixelSpacing] == [0.2, 0.2]
    blob = dcm.read_bytes()
    for value in IDENTIFIERS.values():
        assert str(value).encode() not in blob, value
    img = Image.open(png)
    assert "prompt" not in img.text and "workflow" not in img.text  # left out on request
    assert img.text["cxr_counterfactual"] == SYNTHETIC_TEXT


def test_an_image_file_source_exports_8_bit_and_a_new_dataset(comfy):
    image = torch.rand(1, 90, 70, 3, generator=torch.Generator().manual_seed(0))
    fitted, _, fit = run(comfy.node("CXRFitToModel"), image=image, max_side=64)
    out, (png, dcm) = export(comfy, fitted, fit)
    want = expected_native(fitted, fit)
    img = Image.open(png)
    assert img.mode == "L" and img.size == (70, 90)
    assert np.abs(np.asarray(img, dtype=np.float64) / 255 - want).max() <= 0.5 / 255 + 1e-6
    ds = pydicom.dcmread(dcm)
    assert ds.BitsAllocated == 8 and ds.PhotometricInterpretation == "MONOCHROME2" and ds.Modality == "OT"
    assert np.array_equal(ds.pixel_array, quantise(want, 8))
    forced = Image.open(export(comfy, fitted, fit, format="png", bit_depth="16")[1][0])
    assert forced.mode in ("I;16", "I;16B", "I")
    # An image already at native size is written as it is.
    native = out.result[0]
    again = Image.open(export(comfy, native, fit, format="png")[1][0])
    assert np.array_equal(np.asarray(again), np.asarray(img))


def test_png_and_jpeg_sources_export_at_their_bit_depth_without_their_metadata(comfy, chexmask_example, tmp_path):
    """The loader's geometry of a 16-bit PNG makes a 16-bit export, of a JPEG an 8-bit one; the source's text chunks
    (a patient's name) reach no exported file."""
    from radiograph_files import example, png_bytes
    from radiograph_files import quantise as to_bits

    grey = example(chexmask_example)
    secret = IDENTIFIERS["PatientName"]
    (tmp_path / "named16.png").write_bytes(png_bytes(to_bits(grey, 16), 16, text={"PatientName": secret}))
    Image.fromarray(to_bits(grey, 8).astype(np.uint8)).save(tmp_path / "plain.jpg", quality=95)
    for name, bits in (("named16.png", 16), ("plain.jpg", 8)):
        fitted, fit = load_and_fit(comfy, name, tmp_path / name, max_side=64)
        assert fit.geometry.bits_stored == bits and fit.geometry.source == "image"
        _, (png, dcm) = export(comfy, fitted, fit)
        with Image.open(png) as img:
            assert img.size == grey.shape[::-1] and (img.mode == "L") == (bits == 8)
            assert secret not in json.dumps(img.info, default=str)
        ds = pydicom.dcmread(dcm)
        assert ds.BitsStored == bits and ds.PhotometricInterpretation == "MONOCHROME2"
        assert secret not in str(ds) and (ds.Rows, ds.Columns) == grey.shape


def test_a_second_export_never_overwrites(comfy, rg1):
    fitted, fit = rg1
    small = dict(format="png", filename_prefix="export/again")
    _, (first,) = export(comfy, fitted, fit, **small)
    before = first.read_bytes()
    taken = first.with_name(first.name.replace("00001", "00002")).with_suffix(".dcm")
    taken.write_bytes(b"someone else's file")  # the next number is taken, under another suffix
    _, (second,) = export(comfy, edited(fitted), fit, **small)
    assert first.name == "again_00001_.png" and second.name == "again_00003_.png"
    assert first.read_bytes() == before and taken.read_bytes() == b"someone else's file"


def test_bad_inputs_name_node_input_and_fix(comfy, rg1, tmp_path):
    fitted, fit = rg1
    cases = [
        (dict(image=fitted[:, :-8]), "image"),
        (dict(format="tiff"), "format"),
        (dict(filename_prefix="../../outside"), "filename_prefix"),
    ]
    for overrides, input_name in cases:
        with pytest.raises(CXRInputError) as info:
            export(comfy, **{"image": fitted, "fit": fit, **overrides})
        err = info.value
        assert err.node == TITLE and err.input_name == input_name and err.fix, str(err)
    message = comfy.node("CXRExportCounterfactual").validate_inputs(format="png", bit_depth="12")
    assert isinstance(message, str) and TITLE in message and "bit_depth" in message and "Fix:" in message
    # The source DICOM removed between loading and export: DICOM export stops, naming the fit.
    gone_fitted, gone_fit = load_and_fit(comfy, "gone.dcm", rg1_path(), max_side=64)
    Path(gone_fit.geometry.source_path).unlink()
    with pytest.raises(CXRInputError) as info:
        export(comfy, gone_fitted, gone_fit, format="dicom")
    assert info.value.node == TITLE and info.value.input_name == "fit" and "gone" in str(info.value)


@pytest.mark.slow
def test_evaluate_save_and_export_in_a_headless_comfyui(comfy_server):
    """The nodes in a real graph: hidden prompt delivered by the executor, UI outputs, custom link types."""
    server = comfy_server
    name = server.upload_input(rg1_path(), "rg1_e2e.dcm")
    graph = {
        "1": {"class_type": "CXRLoadDICOM", "inputs": {"dicom_file": name, "window": "auto"}},
        "2": {"class_type": "CXRFitToModel", "inputs": {"image": ["1", 0], "max_side": 256, "geometry": ["1", 1]}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 3, "sigma": 1.0}},
        "4": {"class_type": "CXRAtlasOrgans", "inputs": {"image": ["2", 0], "min_quality": 0.5}},
        "5": {"class_type": "CXREditKeepRegions", "inputs": {"organ_masks": ["4", 0], "edit_organs": "left_lung",
                                                              "margin_px": 8, "feather_px": 2.0, "protect": "heart"}},
        "6": {"class_type": "CXREvaluateEdit", "inputs": {"source": ["2", 0], "edited": ["3", 0],
                                                           "edit_region": ["5", 0], "organ_masks": ["4", 0],
                                                           "attention_threshold": 0.5, "heat_scale": 0.0}},
        "7": {"class_type": "CXRSaveMetrics", "inputs": {"metrics": ["6", 1], "filename_prefix": "e2e/metrics"}},
        "8": {"class_type": "CXRExportCounterfactual", "inputs": {"image": ["3", 0], "fit": ["2", 2], **DEFAULTS,
                                                                   "filename_prefix": "e2e/edit"}},
    }
    result = server.run(graph)
    assert "keep_ssim" in result.outputs["6"]["text"][0] and result.outputs["6"]["images"]
    metrics_json, metrics_csv = (result.folders["output"] / f for f in result.outputs["7"]["text"][0].split("\n"))
    body = json.loads(metrics_json.read_text())
    assert 0 < body["images"][0]["keep_ssim"] < 1 and metrics_csv.read_text().startswith("image,")
    (png,) = result.files("8")
    img = Image.open(png)
    assert img.size == (NATIVE[1], NATIVE[0]) and json.loads(img.text["prompt"])["8"]["class_type"] == \
        "CXRExportCounterfactual"
    ds = pydicom.dcmread(png.with_suffix(".dcm"))
    assert (ds.Rows, ds.Columns) == NATIVE and ds.SeriesDescription == DESCRIPTION
