"""The repo's own test fixtures (tests/data): a plain clone holds every real file the tests name, with its
licence and provenance, and the trimmed CheXmask rows keep every row a test relies on.

These tests read ``tests/data`` itself, whatever ``CXR_TEST_DATA`` says: an override pointing at a fuller
folder must not hide a fixture missing from the repo (a plain clone would then skip, or fail under CI=true).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from bad_input_files import CSV_ROWS
from PIL import Image
from test_atlas import LANDMARK_FILES, MASK_FILES
from test_chexmask import LOW_DICE_MIMIC, REAL_FILES
from test_workflows import SAVED

from cxr_counterfactual.imaging.atlas import ATLAS_PATH
from cxr_counterfactual.testing import data as paths
from cxr_counterfactual.testing.data import REPO_TEST_DATA

EXAMPLE = [*MASK_FILES.values(), *LANDMARK_FILES, "utils_example1.jpg"]
ROW_FILES = sorted({*REAL_FILES, CSV_ROWS, "ChestX-Ray8.csv"})  # ChestX-Ray8: the workflow, runner, browser tests
GPL = "LICENSE-GPL-3.0.txt"
# Every file the tests and their helpers open under the data folder, plus the licences and the README.
FIXTURES = sorted(
    [f"cxr/chexmask-example/{name}" for name in [*EXAMPLE, GPL]]
    + [f"cxr/{folder}/{name}" for folder in ("chexmask-rows", "chexmask-landmarks") for name in [*ROW_FILES, GPL]]
    + ["cxr/nih/00000001_000.png", "README.md"]
    # the workflow files as saved before the one-loader change: they must keep loading (tests/test_workflows.py)
    + [f"{SAVED.name}/{sub}{name}.json" for sub in ("", "api/")
       for name in ("cxr_ablation", "cxr_chexmask_edit", "cxr_counterfactual_edit", "cxr_dicom_masked_edit")]
    + [f"{SAVED.name}/README.md"]
)
SIZE_LIMIT = 3 * 2**20  # the repo carries these in every clone: keep them small
MASK_COLUMNS = ("Left Lung", "Right Lung", "Heart")


def records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    csv.field_size_limit(sys.maxsize)  # the RLE mask columns are long
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_data_dir_is_the_repo_copy_unless_cxr_test_data_overrides_it(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_TEST_DATA", raising=False)
    assert paths.test_data_dir() == REPO_TEST_DATA == Path(__file__).resolve().parent / "data"
    monkeypatch.setenv("CXR_TEST_DATA", str(tmp_path))
    assert paths.test_data_dir() == tmp_path


def test_every_fixture_the_tests_name_is_in_the_repo_and_nothing_else():
    present = sorted(str(p.relative_to(REPO_TEST_DATA)) for p in REPO_TEST_DATA.rglob("*") if p.is_file())
    missing = sorted(set(FIXTURES) - set(present))
    assert not missing, f"missing from tests/data (copy them, see tests/data/README.md): {missing}"
    assert present == FIXTURES, f"files in tests/data no test names: {sorted(set(present) - set(FIXTURES))}"
    size = sum((REPO_TEST_DATA / name).stat().st_size for name in present)
    assert size < SIZE_LIMIT, f"tests/data holds {size / 2**20:.2f} MiB"


def test_licences_and_provenance_sit_beside_the_files():
    for folder in ("chexmask-example", "chexmask-rows", "chexmask-landmarks"):
        text = (REPO_TEST_DATA / "cxr" / folder / GPL).read_text()
        assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text, folder
    readme = (REPO_TEST_DATA / "README.md").read_text()
    for word in ("cxr/chexmask-example/", "cxr/chexmask-rows/", "cxr/chexmask-landmarks/", "cxr/nih/00000001_000.png",
                 "GPL-3.0", "CC0", "NIH Clinical Center", "ngaggion/CheXmask-Database", "mlmed/torchxrayvision",
                 "CXR_TEST_DATA"):
        assert word in readme, word


def test_trimmed_rows_keep_the_rows_the_tests_use_and_agree_with_the_landmark_copy():
    atlas = json.loads(ATLAS_PATH.read_text())
    landmark_total = 0
    for name in ROW_FILES:
        columns, rows = records(REPO_TEST_DATA / "cxr" / "chexmask-rows" / name)
        lm_columns, lm_rows = records(REPO_TEST_DATA / "cxr" / "chexmask-landmarks" / name)
        # Same columns in the file's own order (Padchest has Max before Mean), less the RLE masks.
        assert lm_columns == [c for c in columns if c not in MASK_COLUMNS] and set(MASK_COLUMNS) < set(columns)
        # The whole rows are a subset, in file order, of all rows, and both copies hold the same values.
        by_id = {r[lm_columns[0]]: (i, r) for i, r in enumerate(lm_rows)}
        order = [by_id[r[columns[0]]][0] for r in rows]
        assert order == sorted(order) and order[:4] == [0, 1, 2, 3], name
        for row in rows:
            assert {c: row[c] for c in lm_columns} == by_id[row[columns[0]]][1], (name, row[columns[0]])
        # Every row below Dice 0.7 is kept whole (quality-threshold tests), as is every size quirk.
        low = [r[lm_columns[0]] for r in lm_rows if float(r["Dice RCA (Mean)"]) < 0.7]
        assert set(low) <= {r[columns[0]] for r in rows}, name
        assert {(r["Height"], r["Width"]) for r in lm_rows} == {(r["Height"], r["Width"]) for r in rows}, name
        assert sum(float(r["Dice RCA (Mean)"]) >= 0.7 for r in lm_rows) == atlas["source_rows"][Path(name).stem]
        landmark_total += len(lm_rows)
    assert landmark_total == 305 and sum(atlas["source_rows"].values()) == atlas["n_rows"] == 296
    _, mimic = records(REPO_TEST_DATA / "cxr" / "chexmask-rows" / "MIMIC-CXR-JPG.csv")
    assert LOW_DICE_MIMIC in {r["dicom_id"] for r in mimic}
    _, padchest = records(REPO_TEST_DATA / "cxr" / "chexmask-rows" / "Padchest.csv")
    assert {r["Height"] for r in padchest} == {"", "1024.0"}
    _, nih_rows = records(REPO_TEST_DATA / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv")
    assert any(float(r["Dice RCA (Mean)"]) >= 0.7 and r["Height"] == r["Width"] for r in nih_rows)


@pytest.mark.parametrize("name", ["chexmask-example/utils_example1.jpg", "nih/00000001_000.png"])
def test_the_radiographs_are_real_images(name):
    with Image.open(REPO_TEST_DATA / "cxr" / name) as image:
        assert min(image.size) >= 512 and image.mode in ("L", "RGB")
