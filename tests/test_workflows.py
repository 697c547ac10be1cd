"""The shipped workflows: every UI graph has an API twin that the frontend's conversion rules reproduce, every
node type and widget value is valid for the running server, and every API graph runs end to end on the tiny
checkpoint with real radiographs (outputs checked as files and floats, never as PNG bytes)."""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import need
from cxr_counterfactual.runner.comfyui_path import PACK_ROOT
from cxr_counterfactual.tools.workflow_format import VIRTUAL_NODES, api_to_ui, check_values, ui_to_api, widget_values

FOLDER = PACK_ROOT / "workflows"
NAMES = sorted(p.stem for p in FOLDER.glob("*.json"))
# Combo inputs listing the user's own files: a fresh install does not have the shipped names.
FILE_INPUTS = frozenset({"ckpt_name", "image", "dicom_file", "csv_file"})


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_ui_workflow_has_a_twin_and_a_thumbnail():
    assert {"cxr_counterfactual_edit", "cxr_ablation", "cxr_chexmask_edit"} <= set(NAMES), NAMES
    for name in NAMES:
        assert (FOLDER / "api" / f"{name}.json").is_file(), name
        thumb = FOLDER / f"{name}.jpg"
        assert thumb.is_file(), f"{name}.jpg (the template's thumbnail) is missing"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_agree_and_are_valid(comfy_server, name):
    object_info = comfy_server.object_info()
    ui, api = load(FOLDER / f"{name}.json"), load(FOLDER / "api" / f"{name}.json")
    types = {n["type"] for n in ui["nodes"]} - VIRTUAL_NODES
    assert types <= set(object_info), types - set(object_info)
    assert ui_to_api(ui, object_info) == api  # the frontend's widget order and links give back the twin
    assert check_values(api, object_info, FILE_INPUTS) == []
    # Every node says what its stage is; links join declared slots of matching types.
    assert all(n.get("title") for n in ui["nodes"])
    for link_id, origin, slot, target, target_slot, kind in ui["links"]:
        source = next(n for n in ui["nodes"] if n["id"] == origin)
        sink = next(n for n in ui["nodes"] if n["id"] == target)
        assert source["outputs"][slot]["type"] == kind == sink["inputs"][target_slot]["type"], link_id
        assert link_id in source["outputs"][slot]["links"] and sink["inputs"][target_slot]["link"] == link_id


SAVED = Path(__file__).parent / "data" / "workflows-c6de3a8"


@pytest.mark.parametrize("name", sorted(p.stem for p in SAVED.glob("*.json")))
def test_workflows_saved_before_the_loader_read_png_load_unchanged(comfy_server, name):
    """A user's copy of a workflow saved before CXRLoadDICOM read PNG/JPEG (taken unchanged from commit c6de3a8):
    the frontend maps its widget values by position onto today's node definitions and must give every input
    the value it had (inputs appended since, at the end, take their defaults), and saving it again must write the
    same widget list followed by those defaults."""
    object_info = comfy_server.object_info()
    ui, api = load(SAVED / f"{name}.json"), load(SAVED / "api" / f"{name}.json")
    loaded = ui_to_api(ui, object_info)
    for node_id, entry in api.items():  # inputs appended since then (at the end) come at their defaults
        appended = {k: v for k, v in loaded[node_id]["inputs"].items() if k not in entry["inputs"]}
        spec = object_info[entry["class_type"]]["input"]
        declared = {k: d[1].get("default") for group in ("required", "optional") for k, d in spec.get(group, {}).items()
                    if len(d) > 1 and isinstance(d[1], dict)}
        assert appended == {k: declared[k] for k in appended}, (entry["class_type"], appended)
        kept = {k: v for k, v in loaded[node_id]["inputs"].items() if k in entry["inputs"]}
        assert {**loaded[node_id], "inputs": kept} == entry  # every saved value as it was
    assert check_values(loaded, object_info, FILE_INPUTS) == []
    for node in ui["nodes"]:
        if node["type"] not in VIRTUAL_NODES:
            inputs = loaded[str(node["id"])]["inputs"]
            saved = node["widgets_values"]
            assert widget_values(object_info[node["type"]], inputs)[: len(saved)] == saved, node["type"]
    assert any(n["type"] == "CXRLoadDICOM" for n in ui["nodes"]) == (name in ("cxr_counterfactual_edit",
                                                                              "cxr_dicom_masked_edit"))


def test_conversion_round_trip_and_bad_graphs(comfy_server):
    object_info = comfy_server.object_info()
    api = load(FOLDER / "api" / "cxr_ablation.json")
    assert ui_to_api(api_to_ui(api, object_info), object_info) == api
    bad = json.loads(json.dumps(api))
    bad["8"]["inputs"]["edit_organs"] = 3  # a STRING widget given a number
    first = next(k for k, v in bad.items() if v["class_type"] == "CXRAnatomyAttentionGate")
    bad[first]["inputs"]["strength"] = 2.0  # above max
    bad[first]["inputs"]["background"] = "nowhere"  # not an option
    problems = check_values(bad, object_info, FILE_INPUTS)
    assert any("'strength'" in p and "outside" in p for p in problems), problems
    assert any("'background'" in p and "not one of" in p for p in problems), problems
    bad["99"] = {"class_type": "NoSuchNode", "inputs": {}}
    assert any("unknown type NoSuchNode" in p for p in check_values(bad, object_info, FILE_INPUTS))


# end to end on the tiny checkpoint ------------------------------------------------------------------------------------
def small(graph: dict, checkpoint: str, max_side: int = 64, steps: int = 4) -> dict:
    """The graph at test size: the tiny checkpoint, a small fitted image, few steps."""
    for node in graph.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = checkpoint
        if node["class_type"] == "CXRFitToModel":
            inputs["max_side"] = max_side
        if node["class_type"] in ("KSampler", "BasicScheduler", "CXRInvertLatent"):
            inputs["steps"] = steps
        if node["class_type"] == "CXREditKeepRegions":
            inputs.update(margin_px=2, feather_px=1.0)
        if node["class_type"] in ("CXRRefinementSampler", "CXRCaptureAttention"):
            inputs["grid_factor"] = "1"  # the energy's grid is the small latent itself
    return graph


def by_type(graph: dict, class_type: str) -> list[str]:
    return [k for k, v in graph.items() if v["class_type"] == class_type]


@pytest.mark.slow
def test_full_edit_workflow_runs_end_to_end(comfy_server, tiny_checkpoint):
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    need(path is not None, "pydicom-data's RG1_UNCR.dcm not found: pip install pydicom-data")
    comfy_server.upload_input(Path(path))
    graph = small(load(FOLDER / "api" / "cxr_counterfactual_edit.json"), tiny_checkpoint.name)
    result = comfy_server.run(graph)

    (export,) = by_type(graph, "CXRExportCounterfactual")
    pngs = result.files(export)  # shown in the UI; the DICOM beside it is listed in the node's text
    dicoms = [pngs[0].with_suffix(".dcm")]
    assert len(pngs) == 1 and dicoms[0].is_file() and dicoms[0].name in json.dumps(result.outputs[export]), pngs
    with Image.open(pngs[0]) as im:
        assert im.size == (1841, 1955) and im.mode.startswith("I")  # native size, 16-bit grey from a 15-bit DICOM
        assert "synthetic" in json.dumps(im.info).lower()
    ds = pydicom.dcmread(dicoms[0])
    source = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns) and ds.SOPInstanceUID != source.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in str(ds.SeriesDescription).upper()
    assert not str(ds.get("PatientName", "")) and not str(ds.get("PatientID", ""))
    # The audit trail, collected from the graph that ran: what each stage measured, the checkpoint's hash, the SEG.
    trail = json.loads(pngs[0].with_suffix(".json").read_text())
    by_class = {v["class_type"]: k for k, v in graph.items()}
    measured = trail["measurements"]
    assert 0 < measured[by_class["CXRAtlasOrgans"]]["atlas_fit_quality"][0] <= 1
    assert measured[by_class["CXRInvertLatent"]]["inversion"]["reconstruction_error"] is not None
    energy = measured[by_class["SamplerCustomAdvanced"]]["refinement"]["refinement_energy"]
    assert energy and all(step["energies"] and all(np.isfinite(step["energies"])) for step in energy)
    (model,) = trail["recipe"]["models"]
    assert model["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    seg = pydicom.dcmread(pngs[0].with_name(pngs[0].name.replace("_.png", "_seg.dcm")))
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        ds.SOPInstanceUID and seg.FrameOfReferenceUID == ds.FrameOfReferenceUID

    (metrics_node,) = by_type(graph, "CXRSaveMetrics")
    listed = json.dumps(result.outputs[metrics_node])  # the node lists the files it wrote
    saved = {f.suffix: f for f in comfy_server.folders["output"].glob("cxr_counterfactual/metrics*")
             if f.name in listed}
    assert set(saved) == {".json", ".csv"}, listed
    (row,) = load(saved[".json"])["images"]
    # Native composite: the right lung (far from the edit) is the patient's own pixels; the change sits in the
    # edit region (the rest is its feather's outer half, which counts as keep).
    assert row["organ_mad_right_lung"] == 0.0 and row["organ_mad_left_lung"] > 0.05, row
    assert row["change_in_edit_share"] > 0.8 and row["keep_ssim"] > 0.95, row
    for node in ("CXRAttentionPreview", "CXRRefinementPreview", "CXRPreviewOrganMasks", "CXRApplyKeepRegion",
                 "CXREvaluateEdit"):
        (node_id,) = by_type(graph, node)
        assert result.outputs[node_id].get("images"), f"{node} showed no preview"


@pytest.mark.slow
def test_ablation_workflow_runs_end_to_end(comfy_server, chexmask_example, tiny_checkpoint):
    comfy_server.upload_input(chexmask_example / "utils_example1.jpg", "chest_pa.png")
    graph = small(load(FOLDER / "api" / "cxr_ablation.json"), tiny_checkpoint.name, max_side=96)
    result = comfy_server.run(graph)
    (save,) = by_type(graph, "SaveImage")
    (row,) = result.files(save)
    grid = np.asarray(Image.open(row).convert("L"), dtype=np.float32)
    decoded = [k for k in by_type(graph, "VAEDecode")]
    assert len(decoded) == 4
    width = (grid.shape[1] - 3 * 8) // 4  # four panels, 8 px white spacing
    panels = [grid[:, i * (width + 8): i * (width + 8) + width] for i in range(4)]
    # Same seed and keep region: the panels share the kept anatomy, and the stages change the edit.
    assert all(p.shape == panels[0].shape for p in panels)
    diffs = [float(np.abs(p - panels[0]).mean()) for p in panels[1:]]
    assert all(d > 0 for d in diffs), diffs
    for node in ("CXRAttentionPreview", "CXRRefinementPreview"):
        (node_id,) = by_type(graph, node)
        assert result.outputs[node_id].get("images"), f"{node} showed no preview"


@pytest.mark.slow
def test_chexmask_workflow_runs_end_to_end(comfy_server, data_dir, tiny_checkpoint):
    rows = data_dir / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"
    with rows.open(newline="") as f:  # a row on the 1024 px grid: the NIH radiograph (512 px) has its aspect
        row = next(r for r in csv.DictReader(f) if float(r["Dice RCA (Mean)"]) >= 0.7
                   and float(r["Height"] or 1024) == float(r["Width"] or 1024))
    comfy_server.upload_input(rows)
    comfy_server.upload_input(data_dir / "cxr" / "nih" / "00000001_000.png")
    graph = small(load(FOLDER / "api" / "cxr_chexmask_edit.json"), tiny_checkpoint.name)
    (loader,) = by_type(graph, "CXRLoadCheXmask")
    graph[loader]["inputs"]["image_id"] = row["Image Index"]  # the rows' own images are not in the test data
    result = comfy_server.run(graph)
    (save,) = by_type(graph, "SaveImage")
    (edit,) = result.files(save)
    assert Image.open(edit).size == (512, 512)  # back at native size
    (evaluate,) = by_type(graph, "CXREvaluateEdit")
    assert result.outputs[evaluate].get("images")


def test_the_server_offers_the_workflows_as_templates_with_thumbnails(comfy_server):
    """ComfyUI lists a pack's ``workflows/*.json`` under ``/workflow_templates`` and serves the folder (the
    API twins in ``workflows/api/`` are not templates)."""
    import urllib.request

    # ComfyUI serves the first of these folders a pack has under /api/workflow_templates/<pack>, so any other one
    # (an "examples/" of scripts, say) would hide workflows/ from the template browser.
    others = ["example_workflows", "example", "examples", "workflow"]
    assert not [name for name in others if (PACK_ROOT / name).exists()]
    listed = comfy_server._request("GET", "/workflow_templates")
    assert sorted(listed["cxr_counterfactual"]) == NAMES
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for name in NAMES:
        with opener.open(f"{comfy_server.url}/api/workflow_templates/cxr_counterfactual/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"  # a JPEG
        with opener.open(f"{comfy_server.url}/api/workflow_templates/cxr_counterfactual/{name}.json", timeout=30) as r:
            assert json.loads(r.read())["nodes"]


DOCS = PACK_ROOT / "docs"


def test_the_docs_document_every_node_and_the_readme_shows_pictures_made_by_the_pack(comfy_server):
    nodes_page = (DOCS / "nodes.md").read_text(encoding="utf-8")
    readme = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
    ours = [name for name, spec in comfy_server.object_info().items() if spec["python_module"].endswith(
        "cxr_counterfactual")]
    assert len(ours) >= 30
    missing = [name for name in ours if f"(`{name}`)" not in nodes_page]
    assert not missing, f"nodes without a row in docs/nodes.md: {missing}"
    for picture in ("frontend_cxr_counterfactual_edit-outputs.png", "full_edit.png", "full_edit_attention.png",
                    "ablation.png"):
        assert f"docs/images/{picture}" in readme and (DOCS / "images" / picture).is_file(), picture


def test_the_readme_links_every_docs_page_and_every_link_resolves():
    readme = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(pages) >= 8
    assert not [name for name in pages if f"(docs/{name})" not in readme]
    # every relative link and picture of the README and the docs points at a file that exists
    for doc in [PACK_ROOT / "README.md", PACK_ROOT / "CHANGELOG.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: {target}"


def test_the_readme_test_command_is_the_one_ci_runs():
    readme = (PACK_ROOT / "README.md").read_text(encoding="utf-8")
    ci = (PACK_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (line,) = [ln for ln in readme.splitlines() if "pytest" in ln and "pip install" in ln]
    install, command = (part.strip() for part in line.split("&&"))
    (ci_command,) = [re.sub(r"^timeout \d+ ", "", ln.strip()) for ln in ci.splitlines()
                     if re.fullmatch(r"\s*(timeout \d+ )?python -m pytest\s*", ln)]
    assert command == ci_command == "python -m pytest"
    requirement_files = re.findall(r"-r (\S+)", install)
    assert requirement_files == ["requirements.txt", "requirements-test.txt"]
    assert any(all(f"-r {f}" in ln for f in requirement_files) for ln in ci.splitlines() if "pip install" in ln)


def test_the_docs_name_only_modules_that_exist():
    # Module paths in backticks and the Python import lines of the README and the docs: a move must update them.
    docs = [PACK_ROOT / "README.md", *DOCS.glob("*.md")]
    dirs = "attention|imaging|hosts|nodes|runner|demo|testing|tools|benchmarks|scripts|tests"
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for path in re.findall(rf"`((?:{dirs})/[\w/]+\.py)`", text):
            assert (PACK_ROOT / path).is_file(), f"{doc.name}: {path}"
        for module, names in re.findall(r"^from (cxr_counterfactual\.[\w.]+) import ([\w, ]+)$", text, re.M):
            imported = importlib.import_module(module)
            assert all(hasattr(imported, n.strip()) for n in names.split(",")), f"{doc.name}: {module}"
