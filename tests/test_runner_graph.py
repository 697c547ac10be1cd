"""The headless runner without a server: overrides by title, manifest rows to jobs, the output folder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_helpers import ramp, write_dicom

from cxr_counterfactual.runner import graph as g
from cxr_counterfactual.runner.manifest import (
    ManifestError,
    RowJob,
    Upload,
    build_job,
    prepare,
    read_manifest,
    row_key,
)
from cxr_counterfactual.runner.results import ResultsBook, commit
from cxr_counterfactual.runner.server import free_port
from cxr_counterfactual.runner.worker import RowOutcome

CHEXMASK = "cxr_chexmask_edit"
DICOM = "cxr_dicom_masked_edit"


def test_overrides_by_title_convert_to_the_input_type():
    graph = g.load_workflow(CHEXMASK)
    out = g.apply_overrides(graph, ["Edit prompt + token map.text=chest x-ray, small effusion",
                                    "Sampler (img2img in the edit region).steps=3",
                                    "Sampler (img2img in the edit region).cfg=2",
                                    "Stage 2: anatomy gate.apply_to_uncond=true"])
    sampler = out[g.find_node(out, "Sampler (img2img in the edit region)")]["inputs"]
    assert sampler["steps"] == 3 and sampler["cfg"] == 2.0 and isinstance(sampler["cfg"], float)
    assert out["6"]["inputs"]["text"] == "chest x-ray, small effusion"
    assert out["11"]["inputs"]["apply_to_uncond"] is True
    assert graph["13"]["inputs"]["steps"] == 20  # the loaded workflow is left as it was
    # A title holding a dot: the input name is what follows the last dot.
    assert g.parse_assignment("Schedule (img2img, denoise 0.8).steps=4") == (
        "Schedule (img2img, denoise 0.8)", "steps", "4")


def test_override_errors_name_the_titles_and_inputs():
    graph = g.load_workflow(CHEXMASK)
    with pytest.raises(g.GraphError, match="no node titled 'Samplr'") as err:
        g.apply_overrides(graph, ["Samplr.steps=3"])
    assert "'Edit prompt + token map' (CXRTextEncode)" in str(err.value)  # every title is listed
    with pytest.raises(g.GraphError, match=r"has no input 'stepz'.*steps"):
        g.apply_overrides(graph, ["Sampler (img2img in the edit region).stepz=3"])
    with pytest.raises(g.GraphError, match="is linked from node"):
        g.apply_overrides(graph, ["Sampler (img2img in the edit region).model=3"])
    with pytest.raises(g.GraphError, match="not a int"):
        g.apply_overrides(graph, ["Sampler (img2img in the edit region).steps=many"])
    with pytest.raises(g.GraphError, match="expected 'Node title.input=value'"):
        g.apply_overrides(graph, ["steps=3"])
    ablation = g.load_workflow("cxr_ablation")
    with pytest.raises(g.GraphError, match="3 nodes .* titled 'Side by side'"):
        g.apply_overrides(ablation, ["Side by side.spacing_width=2"])
    with pytest.raises(g.GraphError, match="not found"):
        g.load_workflow("no_such_workflow")


def test_unknown_input_is_checked_against_the_servers_definitions():
    graph = g.load_workflow(DICOM)
    info = {"KSampler": {"input": {"required": {"steps": ["INT", {}], "seed": ["INT", {}]},
                                   "optional": {"extra": ["FLOAT", {}]}}}}
    out = g.apply_overrides(graph, ["Sampler.extra=0.5"], info)  # declared but absent from the graph
    assert out["11"]["inputs"]["extra"] == 0.5
    with pytest.raises(g.GraphError, match="it has extra, seed, steps"):
        g.apply_overrides(graph, ["Sampler.nothing=1"], info)


def test_metrics_saver_is_added_once():
    graph = g.load_workflow(CHEXMASK)
    node = g.add_metrics_saver(graph)
    assert graph[node]["class_type"] == "CXRSaveMetrics" and graph[node]["inputs"]["metrics"] == ["18", 1]
    assert g.add_metrics_saver(graph) == node
    assert g.add_metrics_saver(g.load_workflow(DICOM)) is None  # nothing evaluates the edit there


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_rows_become_jobs(tmp_path, chexmask_example, data_dir):
    rows_csv = data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"
    manifest = write_manifest(tmp_path / "m.csv", [
        {"id": "a", "radiograph": str(data_dir / "cxr" / "nih" / "00000001_000.png"), "chexmask_csv": str(rows_csv),
         "chexmask_id": "x.png", "prompt": "chest x-ray, effusion", "pathology": "effusion", "seed": "5",
         "Sampler (img2img in the edit region).steps": "2", "label": "kept"},
        {"id": "b", "radiograph": str(chexmask_example / "utils_example1.jpg"),
         "mask_right_lung": str(chexmask_example / "RL_mask.png"), "mask_heart": str(chexmask_example / "H_mask.png")},
        {"id": "c", "radiograph": str(tmp_path / "missing.png")},
    ])
    rows = read_manifest(manifest)
    base = g.load_workflow(CHEXMASK)
    jobs, problems = prepare(base, rows, tmp_path)
    a, b = jobs
    assert a.graph["2"]["class_type"] == "CXRLoadCheXmask" and a.graph["2"]["inputs"]["image_id"] == "x.png"
    mask_inputs = a.graph["2"]["inputs"]
    assert mask_inputs["csv_file"].endswith("ChestX-Ray8.csv") and mask_inputs["image"] == ["1", 0]
    assert a.graph["1"]["inputs"]["dicom_file"] == a.uploads[0].name and a.uploads[0].name.startswith("cxr-")
    assert a.graph["6"]["inputs"]["text"] == "chest x-ray, effusion"
    assert a.graph["6"]["inputs"]["pathology"] == "effusion"
    assert a.graph["13"]["inputs"]["seed"] == 5 and a.graph["13"]["inputs"]["steps"] == 2
    # Mask files replace the CheXmask source under the same id, so every link still holds.
    assert b.graph["2"]["class_type"] == "CXRLoadOrganMasks" and b.graph["2"]["inputs"]["left_lung"] == "(none)"
    assert b.graph["2"]["inputs"]["heart"].endswith("H_mask.png") and len(b.uploads) == 3
    assert list(problems) == [3] and "row 3 (c): radiograph file" in problems[3]
    # Keys: stable, and a changed row (or workflow) gets a new folder.
    assert a.key == row_key(rows[0], 1, base) and a.key.startswith("a-")
    assert row_key({**rows[0], "seed": "6"}, 1, base) != a.key
    assert row_key({**rows[0], "label": "changed"}, 1, base) == a.key  # not an input: no re-run
    assert row_key(rows[0], 1, g.apply_overrides(base, ["Negative prompt.text=x"])) != a.key
    # The pack's loader reads every format: a JPEG row drives the DICOM workflow too.
    jpeg = build_job(g.load_workflow(DICOM), rows[1], 2, tmp_path, lambda p: Upload(p.name, p))
    assert jpeg.graph["1"]["class_type"] == "CXRLoadDICOM" and jpeg.graph["1"]["inputs"]["dicom_file"] == \
        "utils_example1.jpg"
    # ComfyUI's Load Image (a user's own graph) reads no DICOM: refused with the reason and the fix.
    own = g.load_workflow(CHEXMASK)
    own["1"] = {"class_type": "LoadImage", "_meta": {"title": "My loader"}, "inputs": {"image": "x.png"}}
    dicom_row = {"id": "d", "radiograph": str(write_dicom(tmp_path / "chest.dcm", ramp(16, 16, 0, 900)))}
    with pytest.raises(ManifestError, match="reads no DICOM.*CXRLoadDICOM"):
        build_job(own, dicom_row, 4, tmp_path, lambda p: Upload(p.name, p))
    assert build_job(own, rows[1], 2, tmp_path, lambda p: Upload(p.name, p)).graph["1"]["inputs"]["image"] == \
        "utils_example1.jpg"


def test_manifest_needs_a_radiograph_column_and_unique_ids(tmp_path):
    with pytest.raises(ManifestError, match="'radiograph' column"):
        read_manifest(write_manifest(tmp_path / "a.csv", [{"image": "x.png"}]))
    with pytest.raises(ManifestError, match="more than once"):
        read_manifest(write_manifest(tmp_path / "b.csv", [{"id": "x", "radiograph": "a"},
                                                          {"id": "x", "radiograph": "b"}]))


def test_a_committed_row_is_never_overwritten_and_partials_are_cleared(tmp_path):
    folder = commit(tmp_path / "rows", "r1", {"a.png": b"one"}, {"k": 1})
    assert (folder / "a.png").read_bytes() == b"one" and json.loads((folder / "row.json").read_text()) == {"k": 1}
    with pytest.raises(FileExistsError):
        commit(tmp_path / "rows", "r1", {"a.png": b"two"}, {"k": 2})
    assert (folder / "a.png").read_bytes() == b"one" and not list((tmp_path / ".partial").iterdir())
    (tmp_path / ".partial" / "r2.dead").mkdir()  # what a killed run leaves
    book = ResultsBook(tmp_path, [{"radiograph": "x"}, {"radiograph": "y"}], ["r1", "r2"])
    assert book.is_done("r1") and not book.is_done("r2") and not (tmp_path / ".partial").exists()
    book.add_failure("r2", "boom\nline two")
    book.write()  # rows/ is the record; the CSV view is rewritten every few seconds and at the end
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "failed"] and rows[1]["error"] == "boom | line two"


def test_results_hold_metrics_columns(tmp_path):
    book = ResultsBook(tmp_path, [{"radiograph": "x"}], ["k"])
    job = RowJob(key="k", index=1, row={"radiograph": "x"}, graph={})
    book.add_success(job, RowOutcome(files={"a.png": b"1"}, outputs={}, metrics={"keep_ssim": 0.9}, server="s"))
    book.write()
    with (tmp_path / "results.csv").open() as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "done" and row["metric_keep_ssim"] == "0.9" and row["output_dir"] == "rows/k"


def test_cli_reports_a_server_that_is_down(pack_import_path, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "cxr_counterfactual", "run", DICOM, "--server", url,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(pack_import_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and url in proc.stderr + proc.stdout and "did not answer" in proc.stderr + proc.stdout
    assert not list(tmp_path.iterdir())


def test_organ_dice_links_the_edits_masks_into_every_evaluation():
    # --organ-dice atlas: an atlas fitted to each evaluation's edited image, never refusing a poor fit (a low Dice
    # is the finding), linked into edit_organ_masks; the source's masks stay the workflow's.
    for name in ("cxr_chexmask_edit", "cxr_counterfactual_edit", "cxr_ablation"):
        graph = g.load_workflow(name)
        evaluators = g.nodes_of(graph, ["CXREvaluateEdit"])
        before = {e: dict(graph[e]["inputs"]) for e in evaluators}
        added = g.add_organ_dice(graph, g.ATLAS, name)
        assert len(added) == len(evaluators) >= 1
        for evaluator, node_id in zip(evaluators, added, strict=True):
            inputs = graph[evaluator]["inputs"]
            assert inputs["edit_organ_masks"] == [node_id, 0]
            assert graph[node_id]["class_type"] == "CXRAtlasOrgans"
            assert graph[node_id]["inputs"] == {"image": before[evaluator]["edited"], "min_quality": 0.0}
            assert {k: v for k, v in inputs.items() if k != "edit_organ_masks"} == before[evaluator]
    graph = g.load_workflow("cxr_chexmask_edit")
    (node_id,) = g.add_organ_dice(graph, "pspnet.pth", "cxr_chexmask_edit")
    assert graph[node_id]["class_type"] == "CXRSegmentOrgans" and graph[node_id]["inputs"]["weights"] == "pspnet.pth"


def test_organ_dice_refusals_name_the_cause():
    with pytest.raises(g.GraphError, match="cxr_dicom_masked_edit has none"):
        g.add_organ_dice(g.load_workflow("cxr_dicom_masked_edit"), g.ATLAS, "cxr_dicom_masked_edit")
    info = {"CXRSegmentOrgans": {"input": {"required": {"weights": ["COMBO", {"options": ["a.pth"]}]}}}}
    with pytest.raises(g.GraphError, match="the server offers a.pth in its models/cxr_segmentation"):
        g.add_organ_dice(g.load_workflow("cxr_chexmask_edit"), "b.pth", "cxr_chexmask_edit", info)
    graph = g.load_workflow("cxr_chexmask_edit")
    g.add_organ_dice(graph, g.ATLAS, "cxr_chexmask_edit")
    with pytest.raises(g.GraphError, match="already takes the edit's organ masks"):
        g.add_organ_dice(graph, g.ATLAS, "cxr_chexmask_edit")
    graph = g.load_workflow("cxr_chexmask_edit")
    del graph[g.nodes_of(graph, ["CXREvaluateEdit"])[0]]["inputs"]["organ_masks"]
    with pytest.raises(g.GraphError, match="has no organ_masks input linked"):
        g.add_organ_dice(graph, g.ATLAS, "cxr_chexmask_edit")


def test_organ_dice_usage_errors_come_before_any_server(pack_import_path, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cxr_counterfactual", "run", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(pack_import_path), "PATH": "/usr/bin:/bin"})

    missing = run("cxr_chexmask_edit", "--radiograph", "x.png", "--organ-dice", str(tmp_path / "missing.pth"))
    assert missing.returncode == 2 and "neither 'atlas' nor an existing PSPNet weight file" in missing.stderr
    no_eval = run("cxr_dicom_masked_edit", "--radiograph", "x.png", "--organ-dice", "atlas")
    assert no_eval.returncode == 2 and "cxr_dicom_masked_edit has none" in no_eval.stderr
    assert not (tmp_path / "o").exists()
