"""The classifier view: TorchXRayVision's DenseNet-121 with random weights of the real architecture, saved the ways
users will have it (a whole pickled model, as TorchXRayVision releases its weights; a state dict; safetensors),
loaded without running code, on real radiographs; the load node, CXR Evaluate Edit's classifier metrics, and the
runner's ``--classifier`` step against a real headless ComfyUI.

No published weights are used (none may be downloaded). Random DenseNet features reach ~10^3, so the random head
is scaled down (see ``densenet``): otherwise every probability saturates at 0 or 1 and no change could show.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from cxr_helpers import chexmask_radiograph
from node_run import run, run_node
from test_evaluate import lesion, radiograph  # noqa: F401  (radiograph: the module fixture, used by name)
from test_runner import CHEXMASK, cli, results, small, write_manifest

from conftest import need
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging import classifier as clf
from cxr_counterfactual.imaging import weight_files
from cxr_counterfactual.imaging.metrics_report import format_table, to_csv, to_json

EVAL = "CXR Evaluate Edit"
LOAD = "CXR Load Classifier"
EPS32 = torch.finfo(torch.float32).eps
# Batched and single forward passes add the same products in another order (the convolution kernels depend on the
# batch size). A float32 sum of K terms is then off by about sqrt(K) eps of its scale, K up to 1024 x 3 x 3 here:
# 100 eps of the features' scale covers that with margin (measured: ~1 eps).
FEATURE_RTOL = 100 * EPS32

RAN: list[str] = []  # what the payload below appends when it is unpickled


def _record(tag: str) -> str:
    RAN.append(tag)
    return tag


class Payload:
    """Unpickling this calls ``_record``: a stand-in for a pickle that runs code (harmless: it appends to RAN)."""

    def __reduce__(self):
        return _record, ("payload ran",)


def xrv_available() -> None:
    need(weight_files.torchxrayvision_available(),
         'torchxrayvision is not installed: pip install "cxr-counterfactual[seg]"')


@pytest.fixture(scope="module")
def densenet() -> torch.nn.Module:
    """The real DenseNet-121 with seeded random weights; the head scaled so the 18 probabilities spread over (0, 1)
    (logit ~ N(0, 1)-sized for features of norm ~10^4)."""
    xrv_available()
    torch.manual_seed(0)
    model = clf.build_densenet().eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1e-4)
        model.classifier.bias.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def files(densenet, tmp_path_factory) -> dict[str, Path]:
    """The same weights as users will have them: a whole pickled model (TorchXRayVision's release form), a state
    dict and safetensors; and a whole model carrying op_threshs (calibrated)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("cxr_classifiers")
    out = {"whole": folder / clf.OFFICIAL_WEIGHTS, "state": folder / "densenet-state.pth",
           "safetensors": folder / "densenet.safetensors", "calibrated": folder / "densenet-calibrated.pt"}
    torch.save(densenet, out["whole"])
    torch.save(densenet.state_dict(), out["state"])
    save_file(densenet.state_dict(), str(out["safetensors"]))
    calibrated = copy.deepcopy(densenet)
    calibrated.op_threshs = torch.linspace(0.05, 0.6, 18)
    calibrated.op_threshs[13] = math.nan  # as in TorchXRayVision's per-dataset weights: an untrained output
    torch.save(calibrated, out["calibrated"])
    return out


@pytest.fixture(scope="module")
def chest(chexmask_example) -> torch.Tensor:
    """The CheXmask example radiograph, 786 x 899 (W x H): not square."""
    return chexmask_radiograph(chexmask_example)[0]


def in_memory(model: torch.nn.Module) -> clf.Classifier:
    return clf.Classifier(model, "in memory", "", getattr(model, "op_threshs", None) is not None)


# the core ------------------------------------------------------------------------------------------------------------
def test_pathologies_and_allowlist_are_torchxrayvisions(files):
    import torchxrayvision as xrv

    assert list(clf.PATHOLOGIES) == xrv.datasets.default_pathologies == xrv.models.DenseNet.targets
    # The allowlist is exactly what torch's weights-only unpickler asks for in a torch.save(model) file: grow a list
    # from its refusals until the file loads, and compare.
    asked: list[type] = []
    for _ in range(40):
        try:
            with torch.serialization.safe_globals(asked):
                torch.load(files["whole"], map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as err:
            module, _, name = re.search(r"GLOBAL ([\w.]+)", str(err)).group(1).rpartition(".")
            asked.append(getattr(__import__(module, fromlist=[name]), name))
    assert set(asked) == set(clf.allowed_classes()) and len(asked) == len(clf.allowed_classes()) == 11


def test_every_file_form_loads_and_scores_exactly_as_the_model(densenet, files, chest):
    reference = clf.classify(in_memory(densenet), chest)
    assert reference.probabilities.shape == (1, 18) and reference.features.shape == (1, clf.FEATURES)
    assert 0.01 < float(reference.probabilities.min()) and float(reference.probabilities.max()) < 0.99
    for form in ("whole", "state", "safetensors"):
        loaded = clf.load_classifier(files[form], files[form].name)
        assert loaded.weights == files[form].name and not loaded.calibrated and not loaded.model.training
        assert loaded.sha256 == hashlib.sha256(files[form].read_bytes()).hexdigest()
        got = clf.classify(loaded, chest)  # same network, same weights, same input: bit for bit
        assert torch.equal(got.probabilities, reference.probabilities), form
        assert torch.equal(got.features, reference.features), form
    # Uncalibrated probabilities are the sigmoid of TorchXRayVision's own forward (which returns logits).
    with torch.no_grad():
        assert torch.equal(reference.probabilities, torch.sigmoid(densenet(clf.preprocess(chest))))


def test_a_file_with_op_threshs_is_calibrated_as_torchxrayvision_does(files, chest):
    loaded = clf.load_classifier(files["calibrated"])
    assert loaded.calibrated
    got = clf.classify(loaded, chest).probabilities
    with torch.no_grad():  # TorchXRayVision's forward applies op_norm when the model has op_threshs
        assert torch.equal(got, loaded.model(clf.preprocess(chest)))
    assert float(got[0, 13]) == 0.5  # a NaN threshold (untrained output) reads as "at the operating point"


def test_a_pickle_holding_any_other_class_is_refused_and_runs_nothing(densenet, tmp_path):
    assert pickle.loads(pickle.dumps(Payload())) == "payload ran" and RAN == ["payload ran"]  # the payload is live
    RAN.clear()
    model = copy.deepcopy(densenet)
    model.extra = Payload()
    path = tmp_path / "tampered.pt"
    torch.save(model, path)
    with pytest.raises(CXRInputError) as info:
        clf.load_classifier(path)
    assert RAN == []  # refused before the payload's call
    message = str(info.value)
    assert "'tampered.pt' holds" in message and "_record" in message and "could run code" in message
    # The fix is one command, run where the user trusts the file, that writes safetensors.
    assert "save_file(" in message and "torch.load('tampered.pt'" in message and "'tampered.safetensors'" in message


def test_weights_of_another_architecture_are_refused_naming_the_file(densenet, tmp_path):
    import torchvision

    from cxr_counterfactual.imaging import segmentation as seg

    torch.save(torchvision.models.resnet18(num_classes=18).state_dict(), tmp_path / "resnet.pth")
    torch.save(seg.build_pspnet(block_config=(1, 1, 1, 1)).state_dict(), tmp_path / "pspnet.pth")
    narrow = clf.build_densenet()
    narrow.classifier = torch.nn.Linear(1024, 14)  # a DenseNet trained for 14 findings
    torch.save(narrow.state_dict(), tmp_path / "densenet14.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name, detail in (("resnet.pth", "missing keys (e.g. features.conv0.weight"),
                         ("pspnet.pth", "unexpected keys"),
                         ("densenet14.pth", "2 shape mismatches (e.g. classifier.weight (14, 1024) (expected (18, "
                                            "1024))"),
                         ("junk.pt", "not a readable weight file")):
        with pytest.raises(CXRInputError) as info:
            clf.load_classifier(tmp_path / name)
        assert f"'{name}'" in str(info.value) and detail in str(info.value), str(info.value)
        assert clf.OFFICIAL_WEIGHTS in info.value.fix


def test_preprocessing_follows_torchxrayvision_on_a_real_radiograph(densenet, chest):
    import torchxrayvision as xrv

    x = clf.preprocess(chest)
    assert x.shape == (1, 1, clf.INPUT_SIZE, clf.INPUT_SIZE) and x.dtype == torch.float32
    assert -1024 <= float(x.min()) < float(x.max()) <= 1024
    # The crop is TorchXRayVision's XRayCenterCrop (the long side, centred): at the crop's own size no resampling
    # happens, so it must match exactly.
    side = min(chest.shape[1:3])
    crop = xrv.datasets.XRayCenterCrop()(chest[..., :3].mean(-1).numpy())
    assert torch.equal(clf.preprocess(chest, size=side)[0, 0], (2 * torch.from_numpy(crop[0]) - 1) * 1024)
    assert set(clf.preprocess(torch.zeros(1, 20, 30, 3)).unique().tolist()) == {-1024.0}
    assert set(clf.preprocess(torch.ones(1, 20, 30)).unique().tolist()) == {1024.0}


def test_a_batch_scores_as_its_images_one_by_one(densenet, chest):
    other = chest.flip(2)  # the same radiograph mirrored: another image of the same size
    model = in_memory(densenet)
    batch = clf.classify(model, torch.cat([chest, other]))
    singles = [clf.classify(model, image) for image in (chest, other)]
    assert batch.features.shape == (2, clf.FEATURES)
    feature_tol = FEATURE_RTOL * float(batch.features.abs().max())
    # |delta p| <= |delta logit| / 4 <= ||w|| ||delta f|| / 4 (Cauchy-Schwarz), ||delta f|| <= sqrt(1024) max|delta f|.
    prob_tol = float(densenet.classifier.weight.detach().norm(dim=1).max()) * math.sqrt(clf.FEATURES) * feature_tol / 4
    for i, one in enumerate(singles):
        torch.testing.assert_close(batch.features[i], one.features[0], rtol=0, atol=feature_tol)
        torch.testing.assert_close(batch.probabilities[i], one.probabilities[0], rtol=0, atol=prob_tol)
    assert not torch.allclose(batch.features[0], batch.features[1])  # two different images, two different vectors


@pytest.mark.parametrize("words, expected", [
    ("effusion", "Effusion"), ("pleural effusion", "Effusion"), ("large left pleural effusion", "Effusion"),
    ("Pneumothorax", "Pneumothorax"), ("consolidation", "Consolidation"), ("cardiomegaly", "Cardiomegaly"),
    ("pulmonary oedema", "Edema"), ("edema", "Edema"), ("Pleural_Thickening", "Pleural_Thickening"),
    ("lung opacity", "Lung Opacity"), ("effusion#2", "Effusion"), (("left", "effusion"), "Effusion"),
])
def test_pathology_words_name_one_of_the_18(words, expected):
    assert clf.resolve_target(words) == expected


def test_pathology_words_that_name_none_or_several_are_errors():
    with pytest.raises(CXRInputError) as info:
        clf.resolve_target("normal heart")
    assert all(p in info.value.fix for p in clf.PATHOLOGIES) and info.value.input_name == "target_pathology"
    with pytest.raises(CXRInputError, match="several pathologies .Consolidation, Effusion."):
        clf.resolve_target("consolidation with effusion")


def test_pair_scores():
    source = [0.1 * (k % 7) + 0.05 for k in range(18)]
    edit = list(source)
    edit[7] += 0.3  # Effusion up
    edit[4] -= 0.125  # Edema down: the largest off-target change
    scores = clf.pair_scores(source, edit, "Effusion")
    assert scores["classifier_target_delta"] == scores["classifier_target_edit"] - scores["classifier_target_source"]
    assert scores["classifier_off_target_max_abs_delta"] == abs(edit[4] - source[4])
    assert scores["classifier_pleural_thickening_source"] == source[9]
    assert scores["classifier_enlarged_cardiomediastinum_edit"] == edit[17]
    assert len(scores) == 4 + 2 * 18


# the nodes inside the real ComfyUI -----------------------------------------------------------------------------------
@pytest.fixture()
def model_folder(comfy, files):
    """The folder of the random-weight files registered as an extra cxr_classifiers path."""
    import folder_paths

    folder = str(files["whole"].parent)
    paths = folder_paths.folder_names_and_paths["cxr_classifiers"][0]
    paths.append(folder)
    yield files
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


# the runner ----------------------------------------------------------------------------------------------------------
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


def test_servers_started_here_get_the_file_in_their_classifier_folder(comfyui_path, files, tmp_path):
    from cxr_counterfactual.runner.server import ComfyServer

    server = ComfyServer(comfyui_path, models={"cxr_classifiers": [files["whole"]]}, base_dir=tmp_path, link_pack=False)
    server._prepare_base()  # what start() does first; no process is started here
    linked = tmp_path / "models" / "cxr_classifiers" / files["whole"].name
    assert linked.is_symlink() and linked.resolve() == files["whole"].resolve()


@pytest.mark.slow
def test_runner_scores_a_batch_row_with_the_classifier(comfy_server, tiny_checkpoint, files, pack_import_path,
                                                       data_dir, chexmask_example, tmp_path):
    folder = comfy_server.base_dir / "models" / "cxr_classifiers"  # where the server's models folder looks
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files["whole"], folder / "densenet-test.pt")
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
