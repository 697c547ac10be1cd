"""The audit trail's document, read from the shipped workflows' graphs (pure: no ComfyUI), the measurement journal,
and the runner's share: the provenance hash per row in results.csv."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os

import pytest

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging.provenance import (
    PATIENT_INPUT,
    SCHEMA,
    Journal,
    canonical_json,
    collect,
    gone,
    node_signature,
    upstream,
)
from cxr_counterfactual.runner.comfyui_path import PACK_ROOT
from cxr_counterfactual.runner.manifest import RowJob
from cxr_counterfactual.runner.results import ResultsBook
from cxr_counterfactual.runner.worker import RowOutcome
from cxr_counterfactual.runner.worker import collect as collect_outputs

VERSIONS = {"cxr_counterfactual": "0.1.0", "comfyui": "0.3.64"}


def shipped(name: str) -> dict:
    return json.loads((PACK_ROOT / "workflows" / "api" / f"{name}.json").read_text())


def fake_hash(folder: str, name: str, node_id: str, widget: str) -> str:
    return hashlib.sha256(f"{folder}/{name}".encode()).hexdigest()


def export_id(graph: dict) -> str:
    return next(n for n, v in graph.items() if v["class_type"] == "CXRExportCounterfactual")


def document(graph: dict, keep: bool = False, **kw) -> dict:
    return collect(graph, export_id(graph), hash_file=fake_hash, keep_patient_data=keep, versions=VERSIONS, **kw)


def renumbered(graph: dict, offset: int = 100) -> dict:
    """The same graph under other node ids (as a batch graph or another client would number it)."""
    new = {n: str(int(n) + offset) for n in graph}
    out = {}
    for n, node in graph.items():
        node = copy.deepcopy(node)
        node["inputs"] = {k: [new[v[0]], v[1]] if isinstance(v, list) and len(v) == 2 and v[0] in new else v
                          for k, v in node["inputs"].items()}
        out[new[n]] = node
    return out


def test_the_document_holds_the_recipe_of_the_nodes_upstream_of_the_export():
    graph = shipped("cxr_counterfactual_edit")
    doc = document(graph)
    assert doc["schema"] == SCHEMA and doc["graph"]["complete"] and doc["patient_data"] == "removed"
    nodes = doc["recipe"]["nodes"]
    assert set(nodes) == set(upstream(graph, export_id(graph)))
    assert "CXRSaveMetrics" not in {n["class_type"] for n in nodes.values()}  # not upstream of the export
    (model,) = doc["recipe"]["models"]
    assert model["widget"] == "ckpt_name" and model["sha256"] == fake_hash("checkpoints", model["name"], "", "")
    inversion = next(n for n in nodes.values() if n["class_type"] == "CXRInvertLatent")
    assert inversion["settings"] == {"cfg": 1.0, "steps": 20, "scheduler": "karras", "start_percent": 0.5,
                                     "refine": 4}
    assert any(s["class_type"] == "CXRInvertLatent" and s["scheduler"] == "karras" for s in doc["recipe"]["sampling"])
    assert "filename_prefix" not in nodes[export_id(graph)]["settings"]  # where it went is not how it was made
    (atlas,) = doc["mask_source"]
    assert atlas["kind"] == "atlas fit" and atlas["class_type"] == "CXRAtlasOrgans"
    canonical_json(doc)  # plain JSON, no NaN


def test_seeds_and_sampler_settings_are_recorded():
    graph = shipped("cxr_chexmask_edit")
    graph["99"] = {"class_type": "CXRExportCounterfactual", "inputs": {
        "image": [next(n for n, v in graph.items() if v["class_type"] == "CXRCompositeNative"), 0],
        "fit": [next(n for n, v in graph.items() if v["class_type"] == "CXRFitToModel"), 2],
        "filename_prefix": "x", "format": "png", "bit_depth": "auto", "keep_patient_data": False,
        "include_workflow": True}}
    doc = document(graph)
    (sampler,) = [n for n, v in graph.items() if v["class_type"] == "KSampler"]
    assert doc["recipe"]["seeds"] == {sampler: {"seed": 7}}
    (sampling,) = [s for s in doc["recipe"]["sampling"] if s["node"] == sampler]
    assert sampling == {"node": sampler, "class_type": "KSampler", "sampler_name": "euler", "scheduler": "normal",
                        "steps": 20, "cfg": 7.0, "denoise": 0.8}
    (row,) = doc["mask_source"]
    assert row["kind"] == "CheXmask row" and row["row_id"] == {"sha256": hashlib.sha256(b"00000001_000.png")
                                                              .hexdigest()}
    assert "00000001_000.png" not in canonical_json(doc)  # the row id and the file names are the patient's
    kept = document(graph, keep=True)
    assert kept["mask_source"][0]["row_id"] == {"value": "00000001_000.png"}
    assert kept["inputs"][row["node"]]["csv_file"]["name"] == "ChestX-Ray8.csv"


def test_the_hash_recognises_exports_made_the_same_way():
    graph = shipped("cxr_counterfactual_edit")
    first = document(graph)["provenance_sha256"]
    other_patient = copy.deepcopy(graph)
    other_patient["1"]["inputs"]["dicom_file"] = "case_0002.dcm"
    elsewhere = copy.deepcopy(graph)
    elsewhere[export_id(graph)]["inputs"]["filename_prefix"] = "another/folder"
    assert document(other_patient)["provenance_sha256"] == first  # another radiograph, same recipe
    assert document(elsewhere)["provenance_sha256"] == first  # another output folder
    assert document(renumbered(graph))["provenance_sha256"] == first  # node ids play no part
    assert document(graph, measurements={"2": {"atlas_fit_quality": [0.9]}})["provenance_sha256"] == first
    changed = copy.deepcopy(graph)
    changed["15"]["inputs"]["steps"] = 21
    newer = dict(VERSIONS, comfyui="0.3.65")
    assert document(changed)["provenance_sha256"] != first
    assert collect(graph, export_id(graph), hash_file=fake_hash, keep_patient_data=False,
                   versions=newer)["provenance_sha256"] != first
    other_weights = collect(graph, export_id(graph), hash_file=lambda *a: "0" * 64, keep_patient_data=False,
                            versions=VERSIONS)
    assert other_weights["provenance_sha256"] != first  # another checkpoint file under the same name


def test_patient_files_are_hashed_and_named_only_when_kept():
    graph = shipped("cxr_counterfactual_edit")
    removed, kept = document(graph), document(graph, keep=True)
    assert removed["inputs"]["1"]["dicom_file"] == {"sha256": fake_hash("input", "RG1_UNCR.dcm", "", "")}
    assert "RG1_UNCR" not in canonical_json(removed)
    assert kept["inputs"]["1"]["dicom_file"]["name"] == "RG1_UNCR.dcm" and kept["patient_data"] == "kept"
    assert removed["recipe"]["nodes"]["1"]["settings"] == {"window": "auto"}
    assert PATIENT_INPUT not in canonical_json(removed)  # the placeholder lives only inside the hash


def test_a_graph_without_the_export_node_is_recorded_as_incomplete():
    graph = shipped("cxr_counterfactual_edit")
    for prompt, node in ((graph, "999"), (None, "26"), (graph, None)):
        doc = collect(prompt, node, hash_file=fake_hash, keep_patient_data=False, versions=VERSIONS)
        assert not doc["graph"]["complete"] and doc["graph"]["problem"] and doc["provenance_sha256"]
        assert doc["recipe"] == {"versions": VERSIONS}
    assert "999" in collect(graph, "999", hash_file=fake_hash, keep_patient_data=False,
                            versions=VERSIONS)["graph"]["problem"]


def test_a_file_that_cannot_be_hashed_stops_the_document():
    def missing(folder, name, node_id, widget):
        if folder != "checkpoints":
            return fake_hash(folder, name, node_id, widget)
        raise gone("checkpoint", name, node_id, widget)

    with pytest.raises(CXRInputError) as info:
        collect(shipped("cxr_counterfactual_edit"), "26", hash_file=missing, keep_patient_data=False,
                versions=VERSIONS)
    assert "tiny-sd15.safetensors" in str(info.value) and "nothing was written" in str(info.value)
    assert info.value.fix
    assert "RG1_UNCR" not in str(gone("input", "RG1_UNCR.dcm", "1", "dicom_file"))  # a patient's file: not named


def test_the_journal_finds_a_cached_nodes_measurements_in_an_earlier_prompt():
    graph = shipped("cxr_counterfactual_edit")
    journal = Journal(keep=3)
    journal.remember("p1", graph)
    journal.note("p1", "2", "atlas_fit_quality", [0.91])
    journal.note("p1", "18", "run", {"refinement_energy": []})
    # p2: the same graph with another edit prompt: the atlas node (unchanged) came from ComfyUI's cache.
    again = renumbered(graph)
    again["106"]["inputs"]["text"] = "chest x-ray, small left pleural effusion"
    journal.remember("p2", again)
    found = journal.measurements("p2", again, upstream(again, "126"))
    assert found["102"] == {"atlas_fit_quality": [0.91], "from_cache_of_prompt": "p1"}
    assert "118" not in found  # the sampler's inputs changed: the old run is not this one's
    journal.note("p2", "118", "run", {"refinement_energy": [{"step": 0}]})
    assert journal.measurements("p2", again, ["118"])["118"] == {"run": {"refinement_energy": [{"step": 0}]}}
    assert node_signature(graph, "2") == node_signature(again, "102")
    for i in range(3, 7):
        journal.note(f"p{i}", "1", "k", i)
    assert journal.measurements("p9", graph, ["2"]) == {}  # only the last prompts are kept
    for i in range(100):  # exports of prompts that noted nothing: the graphs kept are bounded too
        journal.remember(f"q{i}", graph)
    assert len(journal._prompts) <= 3 and len(journal._notes) <= 3


class _Files:
    """A ComfyUI answering GET /view from a dict."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def fetch(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        return self.files[f"{subfolder}/{filename}" if subfolder else filename]


def test_the_runner_keeps_the_provenance_hash_of_each_row(tmp_path):
    digest = "ab" * 32
    sidecar = json.dumps({"schema": SCHEMA, "provenance_sha256": digest}).encode()
    names = ["cxr/x_00001_.png", "cxr/x_00001_.dcm", "cxr/x_00001_seg.dcm", "cxr/x_00001_.json"]
    client = _Files({n: n.encode() for n in names[:3]} | {names[3]: sidecar})
    graph = {"26": {"class_type": "CXRExportCounterfactual", "_meta": {"title": "Export"}, "inputs": {}}}
    files, _, _, trail = collect_outputs(client, graph, {"26": {"text": ["\n".join(names)]}})
    assert sorted(files) == ["export-seg.dcm", "export.dcm", "export.json", "export.png"]
    assert files["export-seg.dcm"] == b"cxr/x_00001_seg.dcm" and trail == [digest]

    rows = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    book = ResultsBook(tmp_path, rows, ["a", "b", "c"])
    for key, made in (("a", [digest]), ("b", [digest]), ("c", [])):  # c: a workflow without the export node
        job = RowJob(key=key, index=1, row={"id": key}, graph=graph, uploads=[])
        book.add_success(job, RowOutcome(files={}, outputs={}, provenance=made))
    book.write()
    with (tmp_path / "results.csv").open(newline="") as f:
        got = {r["key"]: r["provenance_sha256"] for r in csv.DictReader(f)}
    assert got == {"a": digest, "b": digest, "c": ""}
    record = json.loads((tmp_path / "rows" / "a" / "row.json").read_text())
    assert record["provenance"] == [digest]


def test_a_file_is_hashed_once_per_path_size_and_modification_time(tmp_path):
    from cxr_counterfactual.imaging.weight_files import file_sha256

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 64)
    first = file_sha256(path)
    assert first == hashlib.sha256(b"a" * 64).hexdigest()
    stat = path.stat()
    path.write_bytes(b"b" * 64)  # same size; the same modification time restored: the cached hash answers
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again
    assert file_sha256(path) == hashlib.sha256(b"b" * 64).hexdigest()
    path.unlink()
    with pytest.raises(FileNotFoundError):  # the export turns this into its "gone" message, writing nothing
        file_sha256(path)
