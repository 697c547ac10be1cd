"""The radiograph reader (imaging/radiograph.py): DICOM, PNG and JPEG files made from the shared real radiographs,
their grey levels, conversions, metadata and refusals. Pure: no ComfyUI."""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import IDENTIFIERS, expect_error, ramp, rg1_path, write_dicom
from PIL import Image, ImageFile, ImageOps
from radiograph_files import Variant, bomb_png, example, jpeg_bytes, png_bytes, quantise, tinted, variants

from cxr_counterfactual.imaging.dicom import read_dicom
from cxr_counterfactual.imaging.radiograph import MAX_PIXELS, MIN_SIDE, is_radiograph_name, read_radiograph

# Pixels are float32: values computed in float64 agree to float32 rounding (half an ulp of 1 ≈ 6e-8), with
# room for the few float operations between.
F32 = 4 * float(np.finfo(np.float32).eps)
SECRET = "Doe^Jane^SECRET"


def _variants(data_dir: Path) -> list[Variant]:
    return variants(data_dir)


@pytest.mark.parametrize("index", range(10))
def test_every_kind_loads_at_its_full_bit_depth(data_dir, tmp_path, index):
    variant = _variants(data_dir)[index]
    path = tmp_path / f"{variant.name}{variant.suffix}"
    expected = variant.write(path)
    result = read_radiograph(path)
    assert result.pixels.shape == expected.shape and result.pixels.dtype.is_floating_point
    np.testing.assert_allclose(result.pixels.numpy(), expected, rtol=0, atol=F32, err_msg=variant.name)
    geometry = result.geometry
    assert (geometry.height, geometry.width) == expected.shape
    assert geometry.source == ("dicom" if variant.suffix == ".dcm" else "image")
    bits = {"8bit": 8, "16bit": 16, "12bit": 12, "15bit": 15}.get(variant.name.split("_")[2], 8)
    assert geometry.bits_stored == bits, variant.name
    square = "nonsquare" not in variant.name
    assert (geometry.height == geometry.width) == square, variant.name


def test_a_sixteen_bit_png_keeps_every_grey_level(tmp_path):
    """A full-range 16-bit ramp: 0..65535 onto 0..1, only the last sample at white (LoadImage saturates 99.6%)."""
    values = np.arange(65536, dtype=np.int64).reshape(256, 256)
    (tmp_path / "ramp.png").write_bytes(png_bytes(values, 16))
    pixels = read_radiograph(tmp_path / "ramp.png").pixels.numpy()
    np.testing.assert_allclose(pixels, values / 65535, rtol=0, atol=F32)
    assert int((pixels >= 1.0).sum()) == 1 and len(np.unique(pixels)) == 65536
    # Pillow writes 16-bit grey PNGs itself (mode I;16): the same values.
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "pil.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "pil.png").pixels.numpy(), pixels)


def test_window_modes_of_an_image_file(tmp_path):
    values = np.linspace(1000, 3000, 64 * 48).reshape(64, 48).astype(np.int64)
    (tmp_path / "narrow.png").write_bytes(png_bytes(values, 16))
    auto = read_radiograph(tmp_path / "narrow.png", "auto")
    assert auto.voi == "bit_depth" and float(auto.pixels.max()) == pytest.approx(3000 / 65535, abs=F32)
    full = read_radiograph(tmp_path / "narrow.png", "full_range")
    np.testing.assert_allclose(full.pixels.numpy(), (values - 1000) / 2000, rtol=0, atol=F32)
    err = expect_error(lambda: read_radiograph(tmp_path / "narrow.png", "window"), "no window", "auto")
    assert err.input_name == "window"
    err = expect_error(lambda: read_radiograph(tmp_path / "narrow.png", "bright"), "unknown window")
    assert err.input_name == "window"


def test_colour_files_become_grey_by_luma_and_grey_colour_files_stay_exact(chexmask_example, tmp_path):
    grey = example(chexmask_example)
    g8 = quantise(grey, 8)
    (tmp_path / "grey_as_rgb.png").write_bytes(png_bytes(np.stack([g8] * 3, -1), 8))
    np.testing.assert_array_equal(read_radiograph(tmp_path / "grey_as_rgb.png").pixels.numpy(),
                                  (g8 / 255).astype(np.float32))
    g16 = quantise(grey, 16)
    (tmp_path / "grey_as_rgb16.png").write_bytes(png_bytes(np.stack([g16] * 3, -1), 16))
    np.testing.assert_array_equal(read_radiograph(tmp_path / "grey_as_rgb16.png").pixels.numpy(),
                                  (g16 / 65535).astype(np.float32))
    colour = tinted(grey, 16)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(colour, 16))
    luma = (0.299 * colour[..., 0] + 0.587 * colour[..., 1] + 0.114 * colour[..., 2]) / 65535
    np.testing.assert_allclose(read_radiograph(tmp_path / "rgb16.png").pixels.numpy(), luma, rtol=0, atol=F32)
    # A palette PNG (Pillow's own quantiser) reads as its palette's colours.
    Image.fromarray(g8.astype(np.uint8)).convert("RGB").quantize(64).save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(read_radiograph(tmp_path / "palette.png").pixels.numpy(), rgb[..., 0] / 255,
                               rtol=0, atol=F32)  # the palette of a grey image is grey


def test_an_opaque_alpha_channel_is_dropped_and_transparency_refused(chexmask_example, tmp_path):
    g16 = quantise(example(chexmask_example), 16)
    opaque = np.stack([g16, np.full_like(g16, 65535)], -1)
    (tmp_path / "la16.png").write_bytes(png_bytes(opaque, 16))
    np.testing.assert_array_equal(read_radiograph(tmp_path / "la16.png").pixels.numpy(),
                                  (g16 / 65535).astype(np.float32))
    g8 = quantise(example(chexmask_example), 8)
    rgba = np.concatenate([np.stack([g8] * 3, -1), np.full_like(g8, 255)[..., None]], -1)
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "rgba.png").pixels.numpy(),
                                  (g8 / 255).astype(np.float32))
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(tmp_path / "holes.png")
    expect_error(lambda: read_radiograph(tmp_path / "holes.png"), "transparent", "without transparency")
    opaque[0, 0, 1] = 65534
    (tmp_path / "la16_hole.png").write_bytes(png_bytes(opaque, 16))
    expect_error(lambda: read_radiograph(tmp_path / "la16_hole.png"), "transparent")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(chexmask_example, tmp_path, orientation):
    g8 = quantise(example(chexmask_example), 8)[:150, :120]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(jpeg_bytes(g8, exif=exif.tobytes()))
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im), dtype=np.float64) / 255
    np.testing.assert_array_equal(read_radiograph(path).pixels.numpy(), expected.astype(np.float32))


def test_no_metadata_reaches_the_result_or_the_log(chexmask_example, tmp_path, caplog):
    g8 = quantise(example(chexmask_example), 8)
    png = tmp_path / "named.png"
    png.write_bytes(png_bytes(g8, 8, text={"PatientName": SECRET, "Comment": IDENTIFIERS["PatientID"]}))
    exif = Image.Exif()
    exif[0x010E] = SECRET  # ImageDescription
    exif[0x013B] = IDENTIFIERS["InstitutionName"]  # Artist
    jpg = tmp_path / "named.jpg"
    jpg.write_bytes(jpeg_bytes(g8, exif=exif.tobytes()))
    for path in (png, jpg):
        with Image.open(path) as im:  # the files do carry the identifiers
            assert SECRET in str(im.info) + str(dict(im.getexif()))
    caplog.set_level(logging.DEBUG)  # every logger, Pillow's included (it logs EXIF values at DEBUG)
    for path in (png, jpg):
        result = read_radiograph(path)
        assert SECRET not in repr(result) and SECRET not in repr(vars(result.geometry))
    for bad in ("window", "full_range"):  # error texts too
        try:
            read_radiograph(png, bad)
        except Exception as err:  # noqa: BLE001 - any message is checked
            assert SECRET not in str(err)
    assert SECRET not in caplog.text and IDENTIFIERS["PatientID"] not in caplog.text
    assert IDENTIFIERS["InstitutionName"] not in caplog.text


def test_the_format_is_read_from_the_content_not_the_name(chexmask_example, tmp_path):
    g8 = quantise(example(chexmask_example), 8)
    (tmp_path / "png_named.dcm").write_bytes(png_bytes(g8, 8))
    assert read_radiograph(tmp_path / "png_named.dcm").geometry.source == "image"
    dicom = write_dicom(tmp_path / "dicom_named.png", ramp(40, 30, 0, 4000))
    assert read_radiograph(dicom).geometry.source == "dicom"
    assert all(is_radiograph_name(n) for n in ("a.dcm", "b.DICOM", "IM000001", "c.png", "d.JPG", "e.jpeg"))
    assert not any(is_radiograph_name(n) for n in ("notes.txt", "DICOMDIR", ".hidden.png", "scan.tiff"))


def test_the_real_dicom_reads_as_before(data_dir):
    """DICOM goes through read_dicom unchanged: the same pixels and geometry, bit for bit."""
    before = read_dicom(rg1_path())
    after = read_radiograph(rg1_path())
    assert after.geometry == before.geometry and after.voi == before.voi
    assert after.pixels.equal(before.pixels)


# ---- refusals ------------------------------------------------------------------------------------------------
def test_tiny_images_are_refused(tmp_path):
    (tmp_path / "one.png").write_bytes(png_bytes(np.array([[128]]), 8))
    expect_error(lambda: read_radiograph(tmp_path / "one.png"), "1×1 px", "too small")
    (tmp_path / "one.jpg").write_bytes(jpeg_bytes(np.array([[128]])))
    expect_error(lambda: read_radiograph(tmp_path / "one.jpg"), "1×1 px")
    write_dicom(tmp_path / "one.dcm", ramp(1, MIN_SIDE + 4, 0, 900))
    expect_error(lambda: read_radiograph(tmp_path / "one.dcm"), f"{MIN_SIDE + 4}×1 px")
    (tmp_path / "strip.png").write_bytes(png_bytes(ramp(MIN_SIDE - 1, 300, 0, 255), 8))
    expect_error(lambda: read_radiograph(tmp_path / "strip.png"), "too small")
    (tmp_path / "least.png").write_bytes(png_bytes(ramp(MIN_SIDE, MIN_SIDE, 0, 255), 8))
    assert read_radiograph(tmp_path / "least.png").pixels.shape == (MIN_SIDE, MIN_SIDE)


def test_damaged_files_are_refused(chexmask_example, tmp_path):
    data = (chexmask_example / "utils_example1.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    expect_error(lambda: read_radiograph(tmp_path / "cut.jpg"), "damaged or truncated", "again")
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as many packs set it for good: still refused, and left as it was
    try:
        expect_error(lambda: read_radiograph(tmp_path / "cut.jpg"), "damaged or truncated")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    png = png_bytes(quantise(example(chexmask_example), 16), 16)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    expect_error(lambda: read_radiograph(tmp_path / "cut.png"), "damaged or truncated")
    (tmp_path / "text.png").write_bytes(b"a radiograph? no, plain text\n")
    expect_error(lambda: read_radiograph(tmp_path / "text.png"), "not a PNG, JPEG or DICOM")
    Image.fromarray(quantise(example(chexmask_example), 8).astype(np.uint8)).save(tmp_path / "scan.png",
                                                                                   format="TIFF")
    expect_error(lambda: read_radiograph(tmp_path / "scan.png"), "TIFF images are not supported", "grey PNG")
    (tmp_path / "flat.png").write_bytes(png_bytes(np.full((64, 64), 9000), 16))
    expect_error(lambda: read_radiograph(tmp_path / "flat.png"), "same value")


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    data = bomb_png()
    assert len(data) < 200_000
    (tmp_path / "bomb.png").write_bytes(data)
    width, height = struct.unpack(">II", data[16:24])  # IHDR: 400 MB decoded (and the float image 4×)
    assert width * height > 3 * MAX_PIXELS
    tracemalloc.start()
    start = time.perf_counter()
    expect_error(lambda: read_radiograph(tmp_path / "bomb.png"), "million pixels", "decompression bomb")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 50_000_000, peak
    # Whatever Pillow's own limit says (ComfyUI or another pack may switch it off), ours holds.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        expect_error(lambda: read_radiograph(tmp_path / "bomb.png"), "million pixels")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_colour_and_multi_frame_dicom(tmp_path):
    rgb = np.stack([ramp(16, 16, 0, 255)] * 3, -1)
    write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    expect_error(lambda: read_radiograph(tmp_path / "rgb.dcm"), "RGB", "grey radiograph")
    frames = np.stack([ramp(16, 20, 0, 4000, seed=1), ramp(16, 20, 5, 900, seed=2)])
    write_dicom(tmp_path / "frames.dcm", frames)
    first = read_radiograph(tmp_path / "frames.dcm")
    single = read_radiograph(write_dicom(tmp_path / "first.dcm", frames[0]))
    assert first.pixels.equal(single.pixels)  # the documented conversion: the first frame
