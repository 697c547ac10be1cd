"""CheXmask CSV loading: RLE codec, landmarks, undoing the preprocessing, streaming index (node: test_chexmask_node)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.chexmask import (
    LANDMARK_SLICES,
    ORGAN_COLUMNS,
    CheXmaskRow,
    Preprocessing,
    check_quality,
    decode_rle,
    encode_rle,
    parse_landmarks,
    plan_native,
    row_masks,
)
from cxr_counterfactual.imaging.chexmask_index import CheXmaskIndex, open_index

# file → (id column, dataset the index names)
REAL_FILES = {
    "CANDID-PTX.csv": ("ImageID", "CANDID-PTX"),
    "CheXpert.csv": ("Path", "CheXpert"),
    "ChestX-Ray8.csv": ("Image Index", "ChestX-Ray8"),
    "MIMIC-CXR-JPG.csv": ("dicom_id", "MIMIC-CXR-JPG"),
    "Padchest.csv": ("ImageID", "PadChest"),
    "VinDr-CXR.csv": ("image_id", "VinDr-CXR"),
}
LOW_DICE_MIMIC = "fbf3310d-fb72728b-9ff85384-1e950d0f-e27ad88c"  # Dice RCA (Mean) 0.694


@pytest.fixture(scope="module")
def rows_dir(data_dir: Path) -> Path:
    return data_dir / "cxr" / "chexmask-rows"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def centre_x(mask: np.ndarray) -> float:
    columns = np.asarray(mask).sum(axis=0)
    return float((columns * np.arange(columns.size)).sum() / columns.sum())


def polygon(points: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(canvas) > 0


def csv_ids(path: Path, column: str) -> list[str]:
    """The image ids of a CSV's records as the csv module reads them (independent of the index)."""
    csv.field_size_limit(sys.maxsize)  # the RLE mask columns are long
    with path.open(newline="") as handle:
        return [record[column] for record in csv.DictReader(handle)]


def first_row(rows_dir: Path, name: str = "VinDr-CXR.csv") -> CheXmaskRow:
    index = open_index(rows_dir / name)
    return index.row(next(iter(index.offsets)))


def edited(row: CheXmaskRow, **changes: str) -> CheXmaskRow:
    return CheXmaskRow(row.image_id, row.id_column, {**row.fields, **changes})


# --------------------------------------------------------------------------------------------------
# real rows
def test_every_real_row_decodes_and_matches_its_own_landmarks(rows_dir):
    worst: dict[str, float] = {}
    failures, total = [], 0
    for name, (column, dataset) in REAL_FILES.items():
        index = open_index(rows_dir / name)
        assert (index.id_column, index.dataset) == (column, dataset)
        # The index finds every record, in file order (tests/data keeps a few rows a file, the full set 305).
        assert list(index.offsets) == csv_ids(rows_dir / name, column)
        for image_id in index.offsets:
            row = index.row(image_id)
            loaded = row_masks(row)
            assert loaded.grid == (1024, 1024)  # Padchest's empty and "1024.0" sizes included
            points = parse_landmarks(row.value("Landmarks"))
            for organ, column_name in ORGAN_COLUMNS.items():
                mask = loaded.masks.get(organ).numpy()
                # The published RLE is canonical: re-encoding gives the same text.
                assert encode_rle(mask) == row.value(column_name)
                score = dice(mask, polygon(points[LANDMARK_SLICES[organ]], 1024, 1024))
                worst[organ] = min(worst.get(organ, 1.0), score)
                if score < 0.95:
                    failures.append((name, image_id, organ, round(score, 4)))
            # Patient's right lung on the image's left (PA view).
            cx = {o: centre_x(loaded.masks.get(o).numpy()) for o in ("right_lung", "left_lung")}
            assert cx["right_lung"] < 512 < cx["left_lung"], (name, image_id, cx)
            total += 1
    assert total >= 4 * len(REAL_FILES)
    assert not failures, failures
    assert min(worst.values()) > 0.99, worst


def test_height_and_width_quirks(rows_dir):
    padchest = open_index(rows_dir / "Padchest.csv")
    sizes = {(padchest.row(i).value("Height"), padchest.row(i).grid) for i in padchest.offsets}
    assert sizes == {("", (1024, 1024)), ("1024.0", (1024, 1024))}
    row = first_row(rows_dir)
    with pytest.raises(CXRInputError, match="not whole pixel counts"):
        _ = edited(row, Height="12.5", Width="10").grid


# --------------------------------------------------------------------------------------------------
# RLE codec
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.data())
def test_rle_round_trips(height, width, data):
    bits = data.draw(st.lists(st.booleans(), min_size=height * width, max_size=height * width))
    mask = np.array(bits, dtype=bool).reshape(height, width)
    text = encode_rle(mask)
    assert np.array_equal(decode_rle(text, height, width), mask)
    assert encode_rle(decode_rle(text, height, width)) == text


def test_rle_is_one_based_and_row_major():
    assert decode_rle("2 3", 2, 3).astype(int).tolist() == [[0, 1, 1], [1, 0, 0]]
    assert encode_rle(np.array([[0, 1, 1], [1, 0, 0]])) == "2 3"
    assert not decode_rle("", 2, 2).any()


@pytest.mark.parametrize(
    "rle, words",
    [
        ("1 2 3", "odd number"), ("1 x2", "'x2'"), ("1 -2", "'-2'"), ("1 ²", "'²'"), ("0 2", "1-based"),
        ("1 0", "length 0"), ("5 3", "past the"), ("1 99999999999999999999", "past the"),
    ],
)
def test_malformed_rle_is_a_clear_error(rle, words):
    with pytest.raises(CXRInputError) as err:
        decode_rle(rle, 2, 3)
    assert words in str(err.value) and "Fix:" in str(err.value)


# --------------------------------------------------------------------------------------------------
# landmarks
def test_landmarks_parse_flat_json_and_numpy_repr(rows_dir):
    flat = first_row(rows_dir).value("Landmarks")
    points = np.array(flat.split(","), dtype=float).reshape(-1, 2)
    for text in (flat, json.dumps(points.astype(int).tolist()), str(points.astype(int)), repr(points)):
        assert np.array_equal(parse_landmarks(text), points), text[:40]
    with pytest.raises(CXRInputError, match="shortened"):
        parse_landmarks(np.array2string(points, threshold=10))
    with pytest.raises(CXRInputError, match="238 numbers"):
        parse_landmarks(flat.rsplit(",", 2)[0])


def test_an_empty_mask_cell_falls_back_to_the_landmarks(rows_dir):
    row = first_row(rows_dir)
    full = row_masks(row)
    loaded = row_masks(edited(row, Heart=""))
    assert loaded.sources == {"right_lung": "RLE", "left_lung": "RLE", "heart": "landmarks"}
    assert dice(loaded.masks.get("heart"), full.masks.get("heart")) > 0.99
    with pytest.raises(CXRInputError, match="neither a 'Heart' mask nor landmarks"):
        row_masks(edited(row, Heart="", Landmarks=""))


# --------------------------------------------------------------------------------------------------
# undoing the preprocessing
def forward(native: np.ndarray, crop: tuple[int, int, int, int]) -> np.ndarray:
    """DataPreparation's steps: remove_padding crop, pad_to_square_centered, resize to 1024."""
    left, top, right, bottom = crop
    h, w = native.shape
    inner = native[top : h - bottom, left : w - right]
    side = max(inner.shape)
    square = np.zeros((side, side), dtype=np.uint8)
    pt, pl = (side - inner.shape[0]) // 2, (side - inner.shape[1]) // 2
    square[pt : pt + inner.shape[0], pl : pl + inner.shape[1]] = inner * 255
    return np.asarray(Image.fromarray(square).resize((1024, 1024), Image.BILINEAR)) > 127


@pytest.mark.parametrize("h, w, crop", [(899, 786, (0,) * 4), (600, 1000, (0,) * 4), (900, 800, (20, 5, 3, 11))])
def test_preprocessing_is_undone_exactly(h, w, crop):
    prep = Preprocessing(h, w, crop)
    rng = np.random.default_rng(0)
    left, top, right, bottom = crop
    points = np.stack([rng.integers(left, w - right, 50), rng.integers(top, h - bottom, 50)], axis=1)
    inner_h, inner_w = h - top - bottom, w - left - right
    side = max(inner_h, inner_w)
    pad = np.array([(side - inner_w) // 2, (side - inner_h) // 2])
    on_grid = (points - np.array([left, top]) + pad) * 1024 / side  # the forward map of the scripts
    assert np.array_equal(prep.points_to_native(on_grid), points)
    native = np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    native[((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 < 1] = True
    assert dice(prep.mask_to_native(forward(native, crop)), native) > 0.99


def test_real_row_mapped_by_landmarks_and_by_resampling_agree(rows_dir):
    row = first_row(rows_dir)
    prep = Preprocessing(899, 786)
    by_points = row_masks(row, prep)
    by_pixels = row_masks(edited(row, Landmarks=""), prep)
    assert by_points.grid == by_pixels.grid == (899, 786) and by_points.mapping.startswith("from the landmarks")
    for organ in ORGAN_COLUMNS:
        assert dice(by_points.masks.get(organ), by_pixels.masks.get(organ)) > 0.97, organ


def test_plan_native_maps_grid_rows_and_refuses_other_sizes(rows_dir):
    row = first_row(rows_dir)
    assert plan_native(row, np.zeros((1024, 1024))) is None
    grey = np.full((900, 800), 128, dtype=np.uint8)
    grey[:, :20] = 0
    assert plan_native(row, grey, "VinDr-CXR").crop == (0, 0, 0, 0)
    assert plan_native(row, grey, "MIMIC-CXR-JPG").crop == (20, 0, 0, 0)
    assert plan_native(row, grey, "MIMIC-CXR-JPG", "ignore").crop == (0, 0, 0, 0)
    native = edited(row, Height="600", Width="500")
    assert plan_native(native, np.zeros((600, 500))) is None
    with pytest.raises(CXRInputError, match="600×500 .*700×500"):
        plan_native(native, np.zeros((700, 500)))
    with pytest.raises(CXRInputError, match="turned by 90°"):
        plan_native(native, np.zeros((500, 600)))


# --------------------------------------------------------------------------------------------------
# the index and bad CSVs
def test_index_handles_quotes_crlf_bom_and_multiline_fields(tmp_path, rows_dir):
    row = first_row(rows_dir)
    points = parse_landmarks(row.value("Landmarks")).astype(int)
    header = ["Dice RCA (Mean)", "Path", "Landmarks", "Right Lung", "Left Lung", "Heart", "Height", "Width"]
    records = [
        ["0.9", 'train/a,"b".jpg', str(points), row.value("Right Lung"), row.value("Left Lung"), "", "", ""],
        ["0.8", "plain.jpg", row.value("Landmarks"), "", row.value("Left Lung"), row.value("Heart"), "1024.0", "1024"],
    ]
    path = tmp_path / "quoted.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        csv.writer(handle, lineterminator="\r\n").writerows([header, *records])
    assert b"\n [" in path.read_bytes()  # the numpy repr really spans lines
    index = CheXmaskIndex(path)
    assert index.id_column == "Path" and len(index) == 2
    for record in records:
        got = index.row(record[1])
        assert [got.fields[c] for c in header] == record
        assert row_masks(got).masks.names == ("right_lung", "left_lung", "heart")
    with pytest.raises(CXRInputError) as err:
        index.row("missing.jpg")
    assert "'missing.jpg'" in str(err.value) and "column 'Path'" in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.parametrize(
    "text, id_column, words",
    [
        ("", "auto", "no image id column"),
        ("foo,bar\n1,2\n", "auto", "'foo', 'bar'"),
        ("image_id,Height\nx,1\n", "auto", "neither a 'Right Lung' column nor 'Landmarks'"),
        ("image_id,Landmarks\nx,1\n", "Path", "no column 'Path'"),
    ],
)
def test_csv_without_the_expected_columns_is_refused(tmp_path, text, id_column, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(CXRInputError) as err:
        CheXmaskIndex(path, id_column)
    assert words in str(err.value)
    assert err.value.input_name in ("csv_file", "id_column") and err.value.fix


def test_an_unclosed_quote_cannot_pull_a_whole_file_into_memory(tmp_path, monkeypatch):
    from cxr_counterfactual.imaging import chexmask_index

    monkeypatch.setattr(chexmask_index, "MAX_RECORD_BYTES", 4096)
    path = tmp_path / "unclosed.csv"
    path.write_text("image_id,Landmarks\n" + 'a,"1,2\n' + "b,3,4\n" * 2000)
    with pytest.raises(CXRInputError, match="unclosed quote") as err:
        CheXmaskIndex(path)
    assert err.value.input_name == "csv_file"


def test_quality_threshold_names_the_rows_score(rows_dir):
    row = open_index(rows_dir / "MIMIC-CXR-JPG.csv").row(LOW_DICE_MIMIC)
    with pytest.raises(CXRInputError) as err:
        check_quality(row, 0.7)
    assert "0.694" in str(err.value) and err.value.input_name == "min_dice" and "0.69" in err.value.fix
    check_quality(row, 0.69)
    for fields in ({"image_id": "x"}, {"image_id": "x", "Dice RCA (Mean)": "nan"}):
        unscored = CheXmaskRow("x", "image_id", fields)
        check_quality(unscored, 0.0)
        with pytest.raises(CXRInputError, match="no 'Dice RCA \\(Mean\\)' score"):
            check_quality(unscored, 0.5)


def test_a_200_mb_csv_is_streamed_with_bounded_time_and_memory(tmp_path, rows_dir, pack_import_path):
    header, *lines = (rows_dir / "VinDr-CXR.csv").read_bytes().splitlines(keepends=True)
    bodies = [line.split(b",", 1)[1] for line in lines]
    path, size, count = tmp_path / "big.csv", len(header), 0
    # Peak resident memory over the lookups: VmHWM reset to the current size first (Linux), so the
    # interpreter's and torch's import peak does not hide what indexing costs.
    script = (
        "import json, re, sys, time\nfrom pathlib import Path\n"
        "from cxr_counterfactual.imaging.chexmask import row_masks\n"
        "from cxr_counterfactual.imaging.chexmask_index import open_index\n"
        "def kb(key): return int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS')\n"
        "t0 = time.perf_counter(); index = open_index(Path(sys.argv[1])); row_masks(index.row(sys.argv[2]))\n"
        "t1 = time.perf_counter(); row_masks(open_index(Path(sys.argv[1])).row(sys.argv[3]))\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'first_s': t1 - t0, 'second_s': t2 - t1, 'rows': len(index), "
        "'extra_mb': (kb('VmHWM') - base) / 1024}))\n"
    )
    try:
        with open(path, "wb") as handle:
            handle.write(header)
            while size < 200 * 1024 * 1024:
                for body in bodies:
                    record = b"synthetic-%08d," % count + body
                    handle.write(record)
                    size, count = size + len(record), count + 1
        out = subprocess.run(
            [sys.executable, "-c", script, str(path), f"synthetic-{count - 1:08d}", f"synthetic-{count // 2:08d}"],
            env={"PYTHONPATH": str(pack_import_path), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=300, check=True,
        )
    finally:
        path.unlink(missing_ok=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"200 MB CSV ({size / 2**20:.0f} MiB, {count} rows): {figures}")
    assert figures["rows"] == count
    assert figures["first_s"] < 60 and figures["second_s"] < 1.0, figures
    assert figures["extra_mb"] < 150, figures
