"""The runner's ``--classifier`` step: the classifier node linked into a workflow's evaluation, the weights file
linked into the classifier folder of servers the runner starts, and a batch row scored against a real headless
ComfyUI with the random-weight DenseNet-121 of tests/classifier_fixtures.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_runner import CHEXMASK, cli, results, small, write_manifest


def test_runner_graph_links_a_classifier_into_the_evaluation():
    from cxr_counterfactual.runner import graph as g

    graph = g.load_workflow(CHEXMASK)
    node_id = g.add_classifier(graph, "densenet.pt", None, CHEXMASK)
    evaluator = graph[g.nodes_of(graph, ["CXREvaluateEdit"])[0]]["inputs"]
    assert graph[node_id] == {"class_type": "CXRLoadClassifier", "_meta": {"title": "Classifier (runner)"},
                              "inputs": {"weights": "densenet.pt"}}
    # No tokens on the evaluator: the one CXR Text Encode's (output 1), so each row's pathology words are its target.
    assert evaluator["classifier"] == [node_id, 0]
    assert evaluator["tokens"] == [g.nodes_of(graph, ["CXRTextEncode"])[0], 1]
    typed = g.load_workflow(CHEXMASK)
    g.add_classifier(typed, "densenet.pt", "pneumothorax", CHEXMASK)
    assert typed[g.nodes_of(typed, ["CXREvaluateEdit"])[0]]["inputs"]["target_pathology"] == "pneumothorax"
    info = {"CXRLoadClassifier": {"input": {"required": {"weights": ["COMBO", {"options": ["a.pt", "b.pt"]}]}}}}
    with pytest.raises(g.GraphError, match="the server offers a.pt, b.pt"):
        g.add_classifier(g.load_workflow(CHEXMASK), "densenet.pt", None, CHEXMASK, info)
    with pytest.raises(g.GraphError, match="cxr_dicom_masked_edit has none"):
        g.add_classifier(g.load_workflow("cxr_dicom_masked_edit"), "densenet.pt", None, "cxr_dicom_masked_edit")


def test_servers_started_here_get_the_file_in_their_classifier_folder(comfyui_path, classifier_files, tmp_path):
    from cxr_counterfactual.runner.server import ComfyServer

    server = ComfyServer(comfyui_path, models={"cxr_classifiers": [classifier_files["whole"]]}, base_dir=tmp_path,
                         link_pack=False)
    server._prepare_base()  # what start() does first; no process is started here
    linked = tmp_path / "models" / "cxr_classifiers" / classifier_files["whole"].name
    assert linked.is_symlink() and linked.resolve() == classifier_files["whole"].resolve()


@pytest.mark.slow
def test_runner_scores_a_batch_row_with_the_classifier(comfy_server, tiny_checkpoint, classifier_files,
                                                       pack_import_path, data_dir, chexmask_example, tmp_path):
    folder = comfy_server.base_dir / "models" / "cxr_classifiers"  # where the server's models folder looks
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(classifier_files["whole"], folder / "densenet-test.pt")
    manifest = write_manifest(tmp_path / "rows.csv", data_dir, chexmask_example, seeds=[31])
    out = tmp_path / "out"
    args = [CHEXMASK, "--manifest", str(manifest), "--out", str(out), "--server", comfy_server.url,
            "--classifier", "densenet-test.pt", "--no-progress", *small(tiny_checkpoint)]
    done = cli(pack_import_path, *args)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    (row,) = results(out)
    assert row["status"] == "done" and row["metric_classifier_target_source"]
    delta = float(row["metric_classifier_target_delta"])
    assert delta == float(row["metric_classifier_target_edit"]) - float(row["metric_classifier_target_source"])
    assert not any("feature" in column for column in row)
    saved = json.loads(next((out / row["output_dir"]).glob("save-metrics*.json")).read_text())
    block = saved["classifier"]
    assert block["weights"] == "densenet-test.pt" and block["target"] == "Effusion"  # the row's pathology words
    assert [len(f["source"]) for f in block["features"]] == [1024] and len(block["features"][0]["edit"]) == 1024


@pytest.mark.slow
def test_runner_usage_errors_for_the_classifier(comfy_server, pack_import_path, tmp_path):
    common = ["--server", comfy_server.url, "--out", str(tmp_path)]
    no_eval = cli(pack_import_path, "cxr_dicom_masked_edit", "--classifier", "densenet.pt", *common, timeout=120)
    assert no_eval.returncode == 2
    assert "cxr_dicom_masked_edit has none" in no_eval.stderr and "CXR Evaluate Edit" in no_eval.stderr
    not_offered = cli(pack_import_path, CHEXMASK, "--classifier", "not-there.pt", *common, timeout=120)
    assert not_offered.returncode == 2 and "--classifier not-there.pt: the server offers" in not_offered.stderr
    assert "models/cxr_classifiers" in not_offered.stderr
