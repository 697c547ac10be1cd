"""DICOM loading: the real RG1_UNCR.dcm chest radiograph and synthetic files written with pydicom.

Expected pixel values are computed from the DICOM standard's formulas (PS3.3 C.11.2.1.2), not from the
code under test; the real file is also checked against pydicom's own modality + VOI functions.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from dicom_helpers import (
    IDENTIFIERS,
    LUNG_BOXES,
    MEDIASTINUM,
    expect_error,
    linear_window,
    ramp,
    rg1_path,
    write_dicom,
)
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging import dicom as dicom_core
from cxr_counterfactual.imaging.dicom import DicomRadiograph, read_dicom
from cxr_counterfactual.imaging.geometry import NativeGeometry


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
