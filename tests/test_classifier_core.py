"""The classifier core: TorchXRayVision's DenseNet-121 with random weights of the real architecture (fixtures
``densenet`` and ``classifier_files`` in tests/classifier_fixtures.py), loaded from every file form users will have
(a whole pickled model, a state dict, safetensors, a calibrated model) without running code: the unpickling allowlist,
the refusals of tampered pickles and of other architectures, TorchXRayVision's preprocessing on a real radiograph,
batched scoring, the pathology words and the pair scores.
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import re

import pytest
import torch
from cxr_helpers import chexmask_radiograph

from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging import classifier as clf

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


@pytest.fixture(scope="module")
def chest(chexmask_example) -> torch.Tensor:
    """The CheXmask example radiograph, 786 x 899 (W x H): not square."""
    return chexmask_radiograph(chexmask_example)[0]


def in_memory(model: torch.nn.Module) -> clf.Classifier:
    return clf.Classifier(model, "in memory", "", getattr(model, "op_threshs", None) is not None)


def test_pathologies_and_allowlist_are_torchxrayvisions(classifier_files):
    import torchxrayvision as xrv

    assert list(clf.PATHOLOGIES) == xrv.datasets.default_pathologies == xrv.models.DenseNet.targets
    # The allowlist is exactly what torch's weights-only unpickler asks for in a torch.save(model) file: grow a list
    # from its refusals until the file loads, and compare.
    asked: list[type] = []
    for _ in range(40):
        try:
            with torch.serialization.safe_globals(asked):
                torch.load(classifier_files["whole"], map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as err:
            module, _, name = re.search(r"GLOBAL ([\w.]+)", str(err)).group(1).rpartition(".")
            asked.append(getattr(__import__(module, fromlist=[name]), name))
    assert set(asked) == set(clf.allowed_classes()) and len(asked) == len(clf.allowed_classes()) == 11


def test_every_file_form_loads_and_scores_exactly_as_the_model(densenet, classifier_files, chest):
    reference = clf.classify(in_memory(densenet), chest)
    assert reference.probabilities.shape == (1, 18) and reference.features.shape == (1, clf.FEATURES)
    assert 0.01 < float(reference.probabilities.min()) and float(reference.probabilities.max()) < 0.99
    for form in ("whole", "state", "safetensors"):
        loaded = clf.load_classifier(classifier_files[form], classifier_files[form].name)
        assert loaded.weights == classifier_files[form].name and not loaded.calibrated and not loaded.model.training
        assert loaded.sha256 == hashlib.sha256(classifier_files[form].read_bytes()).hexdigest()
        got = clf.classify(loaded, chest)  # same network, same weights, same input: bit for bit
        assert torch.equal(got.probabilities, reference.probabilities), form
        assert torch.equal(got.features, reference.features), form
    # Uncalibrated probabilities are the sigmoid of TorchXRayVision's own forward (which returns logits).
    with torch.no_grad():
        assert torch.equal(reference.probabilities, torch.sigmoid(densenet(clf.preprocess(chest))))


def test_a_file_with_op_threshs_is_calibrated_as_torchxrayvision_does(classifier_files, chest):
    loaded = clf.load_classifier(classifier_files["calibrated"])
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
