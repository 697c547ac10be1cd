"""DICOM loading: the real RG1_UNCR.dcm chest radiograph, synthetic files written with pydicom, the node.

Expected pixel values are computed from the DICOM standard's formulas (PS3.3 C.11.2.1.2), not from the
code under test; the real file is also checked against pydicom's own modality + VOI functions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    generate_uid,
)

from conftest import need
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging import dicom as dicom_core
from cxr_counterfactual.imaging.dicom import DicomRadiograph, read_dicom
from cxr_counterfactual.imaging.geometry import NativeGeometry

NODE_TITLE = "Load Chest X-ray (DICOM)"

# Native-pixel regions of RG1_UNCR.dcm (PA view): both lungs and the mediastinum/spine between them.
LUNG_BOXES = ((slice(500, 1100), slice(300, 700)), (slice(500, 1100), slice(1200, 1550)))
MEDIASTINUM = (slice(400, 1000), slice(850, 1000))

# Patient data that must never leave read_dicom (all written into one synthetic file).
IDENTIFIERS: dict[str, Any] = {
    "PatientName": "Doe^Jane^SECRET",
    "PatientID": "PID-93731",
    "PatientBirthDate": "19410317",
    "AccessionNumber": "ACC-55821X",
    "InstitutionName": "St Hidden Infirmary",
    "ReferringPhysicianName": "Quill^Ramona",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77331",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.77332",
    "StudyDate": "20190607",
    "StudyID": "STUDY-4471",
    "OtherPatientIDs": "OTHER-88213",
    "PatientAddress": "12 Lantern Row",
}


# --------------------------------------------------------------------------------------------- helpers


def rg1_path() -> Path:
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(path is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    return Path(str(path))


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encapsulated: bool = False,
    with_pixels: bool = True,
    **elements: Any,
) -> Path:
    """A minimal valid Part-10 DICOM radiograph (file meta, explicit VR little endian unless told).

    Args:
        path: where to write it.
        pixels: ``[H, W]`` grey, ``[F, H, W]`` frames, or ``[H, W, 3]`` for RGB (8-bit).
        photometric: Photometric Interpretation.
        bits_stored: Bits Stored (16 bits allocated unless the data is 8-bit).
        signed: Pixel Representation 1.
        transfer_syntax: the file meta Transfer Syntax UID.
        encapsulated: store the (uncompressed) bytes as one encapsulated fragment, as compressed
            transfer syntaxes require.
        with_pixels: leave Pixel Data out when False.
        **elements: any further elements by keyword (window, rescale, identifiers, ...).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    rows, cols = (pixels.shape[0], pixels.shape[1]) if colour or pixels.ndim == 2 else pixels.shape[1:]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if with_pixels:
        dtype = {(8, False): np.uint8, (16, False): "<u2", (16, True): "<i2"}[(ds.BitsAllocated, signed)]
        raw = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
        if encapsulated:
            ds.PixelData = encapsulate([raw])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = raw
            ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR windowing (PS3.3 C.11.2.1.2.1) as a fraction of the output range."""
    c, w = center - 0.5, width - 1.0
    out = (values.astype(np.float64) - c) / w + 0.5
    out[values <= c - w / 2] = 0.0
    out[values > c + w / 2] = 1.0
    return out


def ramp(height: int, width: int, lo: int, hi: int, seed: int = 0) -> np.ndarray:
    """A smooth ramp from lo to hi plus a little noise: varied values that hit both ends."""
    rng = np.random.default_rng(seed)
    base = np.linspace(lo, hi, height * width).reshape(height, width)
    noisy = base + rng.integers(-3, 4, size=base.shape)
    noisy.flat[0], noisy.flat[-1] = lo, hi
    return np.clip(np.rint(noisy), lo, hi).astype(np.int64)


def expect_error(call: Callable[[], object], *needles: str) -> CXRInputError:
    """Run ``call``; it must raise CXRInputError whose text holds every needle (case-insensitive)."""
    with pytest.raises(CXRInputError) as info:
        call()
    text = str(info.value).lower()
    for needle in needles:
        assert needle.lower() in text, f"{needle!r} not in error: {info.value}"
    assert info.value.fix, "every user error carries a fix"
    return info.value


# ------------------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def rg1() -> DicomRadiograph:
    return read_dicom(rg1_path())


def test_rg1_shape_range_and_geometry(rg1: DicomRadiograph) -> None:
    px = rg1.pixels
    assert px.shape == (1955, 1841) and px.dtype == torch.float32
    assert float(px.min()) >= 0.0 and float(px.max()) <= 1.0
    # The 15000/30000 window spans the data: most of [0, 1] is used, not a 255-scaled sliver.
    assert float(px.max() - px.min()) > 0.8
    assert rg1.voi == "window"
    assert rg1.geometry == NativeGeometry(
        height=1955, width=1841, pixel_spacing_mm=None, bits_stored=15, photometric="MONOCHROME1",
        source="dicom",
    )


def test_rg1_monochrome1_is_inverted_so_lungs_are_dark(rg1: DicomRadiograph) -> None:
    px = rg1.pixels
    mediastinum = float(px[MEDIASTINUM].mean())
    for box in LUNG_BOXES:
        lung = float(px[box].mean())
        assert lung < mediastinum - 0.1, f"lung {lung:.3f} not darker than mediastinum {mediastinum:.3f}"


def test_rg1_matches_pydicom_modality_and_voi(rg1: DicomRadiograph) -> None:
    ds = pydicom.dcmread(rg1_path())
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # pydicom windows into the stored range of an unsigned 15-bit file without rescale: [0, 2**15 - 1].
    expected = 1.0 - values / (2**15 - 1)
    np.testing.assert_allclose(rg1.pixels.numpy(), expected, atol=1e-5, rtol=0)


def test_rg1_full_range_uses_the_data_extremes() -> None:
    ds = pydicom.dcmread(rg1_path())
    stored = ds.pixel_array.astype(np.float64)
    expected = 1.0 - (stored - stored.min()) / (stored.max() - stored.min())
    result = read_dicom(rg1_path(), window="full_range")
    assert result.voi == "full_range"
    np.testing.assert_allclose(result.pixels.numpy(), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- synthetic files


def test_monochrome2_12bit_rescale_and_window(tmp_path: Path) -> None:
    stored = ramp(40, 30, 0, 4095)
    slope, intercept, center, width = 2.0, -1024.0, 2500.0, 3000.0
    path = write_dicom(
        tmp_path / "m2.dcm", stored, RescaleSlope=slope, RescaleIntercept=intercept,
        WindowCenter=center, WindowWidth=width,
    )
    expected = linear_window(stored * slope + intercept, center, width)
    for mode in ("auto", "window"):
        result = read_dicom(path, window=mode)
        assert result.voi == "window"
        np.testing.assert_allclose(result.pixels.numpy(), expected, atol=1e-6, rtol=0)
    assert result.geometry.bits_stored == 12 and result.geometry.photometric == "MONOCHROME2"
    # The window clips both ends of this ramp: black and white both occur.
    assert float(result.pixels.min()) == 0.0 and float(result.pixels.max()) == 1.0


def test_signed_data_with_window(tmp_path: Path) -> None:
    stored = ramp(20, 25, -2000, 2000)
    path = write_dicom(
        tmp_path / "signed.dcm", stored, bits_stored=16, signed=True, WindowCenter=0, WindowWidth=2000
    )
    np.testing.assert_allclose(
        read_dicom(path).pixels.numpy(), linear_window(stored, 0.0, 2000.0), atol=1e-6, rtol=0
    )


def test_16bit_full_range_without_window(tmp_path: Path) -> None:
    stored = ramp(32, 48, 100, 60000)
    path = write_dicom(tmp_path / "full.dcm", stored, bits_stored=16)
    result = read_dicom(path)  # auto: no VOI in the file → min-max
    assert result.voi == "full_range"
    np.testing.assert_allclose(result.pixels.numpy(), (stored - 100) / (60000 - 100), atol=1e-6, rtol=0)
    expect_error(lambda: read_dicom(path, window="window"), "window", "full_range")


def test_voi_lut_sequence_8bit_entries_longer_than_256(tmp_path: Path) -> None:
    # 4096 entries of 8 bits: pydicom 3.0 alone wraps such indices; the loader must not.
    stored = ramp(30, 40, 0, 4095)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 8]
    lut.add_new("LUTData", "US", [i // 16 for i in range(4096)])
    path = write_dicom(
        tmp_path / "lut8.dcm", stored, VOILUTSequence=[lut], WindowCenter=100, WindowWidth=50
    )
    result = read_dicom(path)  # auto prefers the VOI LUT over the window
    assert result.voi == "voi_lut"
    np.testing.assert_allclose(result.pixels.numpy(), (stored // 16) / 255.0, atol=1e-6, rtol=0)
    # "window" uses the file's window instead of its LUT.
    windowed = read_dicom(path, window="window")
    np.testing.assert_allclose(windowed.pixels.numpy(), linear_window(stored, 100, 50), atol=1e-6, rtol=0)


def test_voi_lut_sequence_16bit_with_first_mapped_value(tmp_path: Path) -> None:
    # Entries span 0..4095 although the descriptor says 16 bits: normalise by the entries' range.
    stored = ramp(24, 24, 0, 3000)
    first, entries = 1000, 1024
    table = np.linspace(0, 4095, entries).round().astype(int)
    lut = Dataset()
    lut.LUTDescriptor = [entries, first, 16]
    lut.add_new("LUTData", "OW", table.astype("<u2").tobytes())  # the OW encoding, read by endianness
    path = write_dicom(tmp_path / "lut16.dcm", stored, VOILUTSequence=[lut])
    index = np.clip(stored - first, 0, entries - 1)
    np.testing.assert_allclose(read_dicom(path).pixels.numpy(), table[index] / 4095.0, atol=1e-6, rtol=0)


def test_monochrome1_is_one_minus_monochrome2(tmp_path: Path) -> None:
    stored = ramp(16, 20, 50, 3000)
    window = {"WindowCenter": 1500, "WindowWidth": 2000}
    mono2 = read_dicom(write_dicom(tmp_path / "a.dcm", stored, **window))
    mono1 = read_dicom(write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1", **window))
    torch.testing.assert_close(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6, rtol=0)
    assert mono1.geometry.photometric == "MONOCHROME1"


def test_pixel_spacing_prefers_pixel_spacing_then_imager(tmp_path: Path) -> None:
    stored = ramp(8, 8, 0, 255)
    both = write_dicom(tmp_path / "s1.dcm", stored, PixelSpacing=[0.15, 0.16], ImagerPixelSpacing=[0.2, 0.2])
    imager = write_dicom(tmp_path / "s2.dcm", stored, ImagerPixelSpacing=[0.139, 0.14])
    zero = write_dicom(tmp_path / "s3.dcm", stored, PixelSpacing=[0, 0], ImagerPixelSpacing=[0.1, 0.1])
    assert read_dicom(both).geometry.pixel_spacing_mm == (0.15, 0.16)
    assert read_dicom(imager).geometry.pixel_spacing_mm == (0.139, 0.14)
    assert read_dicom(zero).geometry.pixel_spacing_mm == (0.1, 0.1)  # zero means "not stated"


def test_multiframe_uses_first_frame_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = np.stack([ramp(10, 12, 0, 4000, seed=1), np.full((10, 12), 7), ramp(10, 12, 5, 900, seed=2)])
    path = write_dicom(tmp_path / "multi.dcm", frames)
    with caplog.at_level(logging.WARNING, logger=dicom_core.__name__):
        result = read_dicom(path)
    np.testing.assert_allclose(result.pixels.numpy(), frames[0] / 4000, atol=1e-6, rtol=0)
    assert any("3 frames" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    expect_error(lambda: read_dicom(tmp_path / "nowhere.dcm"), "does not exist", "input folder")


def test_not_a_dicom_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a radiograph\n" * 20)
    expect_error(lambda: read_dicom(text), "not a DICOM file")
    png = tmp_path / "image.dcm"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    expect_error(lambda: read_dicom(png), "not a DICOM file")


def test_no_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "nopix.dcm", ramp(4, 4, 0, 9), with_pixels=False)
    expect_error(lambda: read_dicom(path), "no Pixel Data")


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_colour_photometric_is_refused(tmp_path: Path, photometric: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 7, 3))
    pixels = rgb if photometric != "PALETTE COLOR" else rgb[..., 0]
    path = write_dicom(tmp_path / "colour.dcm", pixels, photometric=photometric, bits_stored=8)
    expect_error(lambda: read_dicom(path), photometric, "MONOCHROME1", "MONOCHROME2")


def _unavailable_compressed_syntax() -> str | None:
    for uid in (JPEGLSLossless, JPEGLosslessSV1, HTJ2KLossless):
        if not get_decoder(uid).is_available:
            return uid
    return None


def test_compressed_without_decoder_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = _unavailable_compressed_syntax()
    if uid is None:
        # Every decoder is installed here: make one look missing, which is what this test is about.
        uid = JPEGLSLossless

        class _Missing:
            is_available = False

        monkeypatch.setattr(dicom_core, "get_decoder", lambda _uid: _Missing())
    path = write_dicom(tmp_path / "jls.dcm", ramp(8, 8, 0, 4095), transfer_syntax=uid, encapsulated=True)
    err = expect_error(lambda: read_dicom(path), "compressed", "no decoder", "pip install", "pylibjpeg")
    assert pydicom.uid.UID(uid).name in err.problem


def test_undecodable_compressed_pixel_data(tmp_path: Path) -> None:
    # JPEG 2000 declared, raw bytes stored: decodable syntax (if a plugin is installed) but bad data.
    path = write_dicom(
        tmp_path / "j2k.dcm", ramp(8, 8, 0, 4095), transfer_syntax=JPEG2000Lossless, encapsulated=True
    )
    with pytest.raises(CXRInputError) as info:
        read_dicom(path)
    text = str(info.value)
    assert "could not be decoded" in text or "pip install" in text


def test_constant_pixels(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "flat.dcm", np.full((10, 10), 1234))
    expect_error(lambda: read_dicom(path), "same value")


def test_window_that_flattens_the_image(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "far.dcm", ramp(10, 10, 0, 1000), WindowCenter=3000, WindowWidth=100)
    err = expect_error(lambda: read_dicom(path), "same grey level", "full_range")
    assert err.input_name == "window"
    assert read_dicom(path, window="full_range").voi == "full_range"


def test_unknown_window_mode(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ok.dcm", ramp(4, 4, 0, 99))
    err = expect_error(lambda: read_dicom(path, window="bright"), "bright", "auto")
    assert err.input_name == "window"


# -------------------------------------------------------------------------------------- patient data


def _secret_strings() -> list[str]:
    return [str(v) for v in IDENTIFIERS.values()] + ["SECRET", "Doe", "93731"]


def test_no_identifier_reaches_result_logs_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = ramp(12, 14, 0, 4000)
    window = {"WindowCenter": 2000, "WindowWidth": 4000}
    files = {
        "ok": write_dicom(tmp_path / "a.dcm", stored, **window, **IDENTIFIERS),
        "multi": write_dicom(tmp_path / "b.dcm", np.stack([stored, stored]), **IDENTIFIERS),
        "rgb": write_dicom(
            tmp_path / "c.dcm", stored[..., None].repeat(3, -1) % 256, photometric="RGB", bits_stored=8,
            **IDENTIFIERS,
        ),
        "nopix": write_dicom(tmp_path / "d.dcm", stored, with_pixels=False, **IDENTIFIERS),
        "flat": write_dicom(tmp_path / "e.dcm", np.full((5, 5), 3), **IDENTIFIERS),
        "no_window": write_dicom(tmp_path / "f.dcm", stored, **IDENTIFIERS),
        "jpeg2000": write_dicom(
            tmp_path / "g.dcm", stored, transfer_syntax=JPEG2000Lossless, encapsulated=True, **IDENTIFIERS
        ),
        "jpegls": write_dicom(
            tmp_path / "h.dcm", stored, transfer_syntax=JPEGLSLossless, encapsulated=True, **IDENTIFIERS
        ),
    }
    # The files really hold the identifiers (so the test would notice a leak).
    assert str(pydicom.dcmread(files["ok"]).PatientName) == IDENTIFIERS["PatientName"]

    seen: list[str] = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = read_dicom(files["ok"])
        seen += [repr(ok), repr(ok.geometry), str(ok.geometry.__dict__)]
        seen.append(repr(read_dicom(files["multi"])))
        for name in ("rgb", "nopix", "flat", "jpeg2000", "jpegls"):
            with pytest.raises(CXRInputError) as info:
                read_dicom(files[name])
            err = info.value
            seen += [str(err), repr(err), str(err.__cause__), str(err.__context__)]
        with pytest.raises(CXRInputError) as info:
            read_dicom(files["no_window"], window="window")
        seen.append(str(info.value))
    seen += [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any("frames" in s for s in seen), "the multi-frame warning was captured"
    blob = "\n".join(seen)
    for secret in _secret_strings():
        assert secret not in blob, f"identifier {secret!r} leaked"


# ------------------------------------------------------------------------------------------- the node


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


def test_node_lists_dicom_files_only(comfy, input_dir: Path) -> None:
    shutil.copy(rg1_path(), input_dir / "dicom_list_test.dcm")
    (input_dir / "dicom_sub").mkdir(exist_ok=True)
    shutil.copy(rg1_path(), input_dir / "dicom_sub" / "IM000001")
    (input_dir / "dicom_sub" / "photo.png").write_bytes(b"not listed")
    (input_dir / "dicom_sub" / "DICOMDIR").write_bytes(b"index, not an image")
    options = comfy.node("CXRLoadDICOM").define_schema().inputs[0].options
    assert "dicom_list_test.dcm" in options
    assert "dicom_sub/IM000001" in options
    assert "dicom_sub/photo.png" not in options and "dicom_sub/DICOMDIR" not in options


def test_node_execute_real_radiograph(comfy, input_dir: Path, rg1: DicomRadiograph) -> None:
    shutil.copy(rg1_path(), input_dir / "rg1_node.dcm")
    node = comfy.node("CXRLoadDICOM")
    assert node.validate_inputs(dicom_file="rg1_node.dcm") is True
    out = node.execute(dicom_file="rg1_node.dcm", window="auto")
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
        lambda: node.execute(dicom_file="bad_node.dcm", window="auto"), NODE_TITLE, "not a DICOM"
    )
    assert err.input_name == "dicom_file"
    write_dicom(input_dir / "nowin_node.dcm", ramp(6, 6, 0, 500))
    err = expect_error(lambda: node.execute(dicom_file="nowin_node.dcm", window="window"), NODE_TITLE)
    assert err.input_name == "window"
