"""The classifier inside the real ComfyUI: CXR Load Classifier (its models/cxr_classifiers folder, the file the
user is told to put there) and CXR Evaluate Edit's classifier metrics on a real radiograph, with the random-weight
DenseNet-121 of tests/classifier_fixtures.py; the target pathology from the words or the tokens.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from node_run import run, run_node
from test_evaluate import lesion, radiograph  # noqa: F401  (radiograph: the module fixture, used by name)

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging import classifier as clf
from cxr_counterfactual.imaging.metrics_report import format_table, to_csv, to_json

EVAL = "CXR Evaluate Edit"
LOAD = "CXR Load Classifier"


@pytest.fixture()
def model_folder(comfy, classifier_files):
    """The folder of the random-weight files registered as an extra cxr_classifiers path."""
    import folder_paths

    folder = str(classifier_files["whole"].parent)
    paths = folder_paths.folder_names_and_paths["cxr_classifiers"][0]
    paths.append(folder)
    yield classifier_files
    paths.remove(folder)


def test_load_node_registers_its_folder_and_says_which_file_goes_where(comfy, monkeypatch):
    import folder_paths

    from cxr_counterfactual.nodes.model_files import ModelFolder

    paths, extensions = folder_paths.folder_names_and_paths["cxr_classifiers"]
    assert paths[0].endswith("models/cxr_classifiers") and {".pt", ".pth", ".safetensors"} <= extensions
    cls = comfy.node("CXRLoadClassifier")
    schema = cls.GET_SCHEMA()
    assert schema.display_name == LOAD and [o.io_type for o in schema.outputs] == ["CXR_CLASSIFIER"]
    monkeypatch.setattr(ModelFolder, "files", lambda self: [])
    assert cls.GET_SCHEMA().inputs[0].options == []  # an empty folder: an empty combo, not an error
    for name in ("", "gone.pt"):
        msg = cls.validate_inputs(weights=name)
        assert isinstance(msg, str) and clf.OFFICIAL_WEIGHTS in msg and "models/cxr_classifiers" in msg
        assert LOAD in msg and "downloads nothing" in msg
    with pytest.raises(CXRInputError, match="'gone.pt' is not in .*models/cxr_classifiers"):
        run(cls, weights="gone.pt")


def test_evaluate_edit_with_the_classifier_on_a_real_radiograph(comfy, model_folder, radiograph, densenet):  # noqa: F811
    image, _, edit, bundle = radiograph
    load = comfy.node("CXRLoadClassifier")
    assert clf.OFFICIAL_WEIGHTS in load.GET_SCHEMA().inputs[0].options
    assert load.validate_inputs(weights=clf.OFFICIAL_WEIGHTS) is True
    (classifier,) = run(load, weights=clf.OFFICIAL_WEIGHTS)
    assert classifier.weights == clf.OFFICIAL_WEIGHTS and not classifier.calibrated
    edits = torch.cat([lesion(image, bundle), image])  # a visibly changed edit, and an unchanged one
    with torch.inference_mode():  # as ComfyUI runs nodes
        out = run_node(comfy.node("CXREvaluateEdit"), source=image, edited=edits, edit_region=edit,
                       classifier=classifier, target_pathology="pleural effusion")
    _, report, text = out.result
    assert report.classifier.target == "Effusion" and len(report.pairs) == 2
    changed, unchanged = (p.classifier for p in report.pairs)
    for scores in (changed, unchanged):
        target = scores["classifier_target_edit"] - scores["classifier_target_source"]
        assert scores["classifier_target_delta"] == target
        keys = [clf.pathology_key(p) for p in clf.PATHOLOGIES if p != "Effusion"]
        others = [abs(scores[f"classifier_{k}_edit"] - scores[f"classifier_{k}_source"]) for k in keys]
        assert scores["classifier_off_target_max_abs_delta"] == max(others)
        assert scores["classifier_target_source"] == scores["classifier_effusion_source"]
    assert changed["classifier_target_delta"] != 0.0 and changed["classifier_off_target_max_abs_delta"] > 0.0
    # The unchanged edit scores as its source (one batch), up to the batch-position rounding bound above.
    assert abs(unchanged["classifier_target_delta"]) <= 1e-5
    # The probabilities are the classifier's own on these images (the node's one batch: source, then edits).
    expected = clf.classify(clf.Classifier(densenet, "", "", False), torch.cat([image, edits])).probabilities
    assert changed["classifier_effusion_edit"] == float(expected[1, 7])
    assert unchanged["classifier_pneumothorax_source"] == float(expected[0, 3])
    body = json.loads(text)
    block = body["classifier"]
    assert block["weights"] == clf.OFFICIAL_WEIGHTS and block["target"] == "Effusion" and not block["calibrated"]
    assert block["sha256"] == hashlib.sha256(model_folder["whole"].read_bytes()).hexdigest()
    assert block["pathologies"] == list(clf.PATHOLOGIES)
    assert [(len(f["source"]), len(f["edit"])) for f in block["features"]] == [(1024, 1024)] * 2
    assert body["images"][0]["classifier_target_delta"] == changed["classifier_target_delta"]
    assert "classifier_target_delta" in body["definitions"]
    header = to_csv(report).splitlines()[0].split(",")
    assert "classifier_target_delta" in header and "classifier_atelectasis_edit" in header
    assert not any("feature" in column for column in header)  # features live in the JSON block only
    table = out.ui["text"][0]
    assert table == format_table(report) and "classifier_target_source" in table and "classifier_target_edit" in table
    assert "classifier target = Effusion" in table and "classifier_atelectasis_source" not in table
    assert to_json(report) == text


def test_the_target_comes_from_the_tokens_or_is_an_error(comfy, model_folder, radiograph):  # noqa: F811
    from cxr_counterfactual.attention.tokens import TokenMap

    image, _, edit, _ = radiograph
    (classifier,) = run(comfy.node("CXRLoadClassifier"), weights=model_folder["safetensors"].name)
    node = comfy.node("CXREvaluateEdit")
    small_image = image[:, ::8, ::8]  # the classifier resizes to 224 anyway: a small pair keeps this quick
    small_edit = edit[..., ::8, ::8]
    tokens = TokenMap(77, {"effusion": (5,)}, pathology=("effusion",))
    report = run(node, source=small_image, edited=small_image, edit_region=small_edit, classifier=classifier,
                 tokens=tokens)[1]
    assert report.classifier.target == "Effusion"
    for inputs, input_name in ((dict(), "target_pathology"),
                               (dict(target_pathology="normal heart"), "target_pathology"),
                               (dict(tokens=TokenMap(77, {"heart": (3,)})), "target_pathology")):
        with pytest.raises(CXRInputError) as info:
            run(node, source=small_image, edited=small_image, edit_region=small_edit, classifier=classifier, **inputs)
        assert info.value.node == EVAL and info.value.input_name == input_name and info.value.fix, str(info.value)
    assert "Effusion" in node.validate_inputs(target_pathology="normal heart")
    assert node.validate_inputs(target_pathology="effusion") is True and node.validate_inputs() is True
