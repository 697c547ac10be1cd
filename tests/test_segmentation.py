"""The PSPNet segmentation: the real architecture with random weights from a file, and its error paths.

No published weights are used (none may be downloaded): the tests build torchxrayvision's ChestX-Det
PSPNet layout, save random weights the way the official file stores them (DataParallel ``module.``
keys), and run the network at a small input size so a CPU test stays quick.
"""

from __future__ import annotations

import pytest
import torch
from node_run import run

from conftest import need
from cxr_counterfactual.errors import CXRInputError
from cxr_counterfactual.imaging import segmentation as seg
from cxr_counterfactual.imaging import weight_files

SIGMOID_HIGH = 4.0  # logit of a structure forced present everywhere (p = 0.98)


def xrv_available() -> None:
    need(weight_files.torchxrayvision_available(),
         'torchxrayvision is not installed: pip install "cxr-counterfactual[seg]"')


def forced_head(model: torch.nn.Module, logits: list[float]) -> torch.nn.Module:
    """Make every pixel's logits exactly ``logits``: the channel → organ mapping becomes observable."""
    with torch.no_grad():
        model.classification.weight.zero_()
        model.classification.bias.copy_(torch.tensor(logits))
    return model


@pytest.fixture(scope="module")
def pspnet() -> torch.nn.Module:
    xrv_available()
    torch.manual_seed(0)
    return seg.build_pspnet().eval()


@pytest.fixture(scope="module")
def official_layout_file(pspnet, tmp_path_factory):
    """Random weights saved like torchxrayvision's pspnet_chestxray_best_model_4.pth (full ResNet-101)."""
    logits = [SIGMOID_HIGH] * 14
    logits[seg.ORGAN_NAMES.index("spine")] = -SIGMOID_HIGH
    state = forced_head(pspnet, logits).state_dict()
    path = tmp_path_factory.mktemp("cxr_segmentation") / seg.OFFICIAL_WEIGHTS
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path


# --------------------------------------------------------------------------------------------------
# core
def test_targets_and_names_match_torchxrayvision():
    xrv_available()
    from torchxrayvision.baseline_models.chestx_det import PSPNet  # the class: constructing it would download

    assert list(seg.PSPNET_TARGETS) == PSPNet.targets
    assert seg.ORGAN_NAMES[4:6] == ("left_lung", "right_lung") and seg.ORGAN_NAMES[8] == "heart"
    assert seg.ORGAN_NAMES == (
        "left_clavicle", "right_clavicle", "left_scapula", "right_scapula", "left_lung", "right_lung",
        "left_hilus_pulmonis", "right_hilus_pulmonis", "heart", "aorta", "facies_diaphragmatica",
        "mediastinum", "weasand", "spine",
    )


def test_random_weights_give_14_probability_maps_at_native_size(pspnet):
    torch.manual_seed(1)
    image = torch.rand(90, 70, 3)  # portrait, not square: padded for the network, cropped back
    with torch.inference_mode():
        probs = seg.segment_probabilities(pspnet, image, input_size=64)
    assert probs.shape == (14, 90, 70)
    assert torch.isfinite(probs).all() and 0 < float(probs.min()) and float(probs.max()) < 1


def test_channel_to_organ_mapping(pspnet):
    logits = [float(i) - 6.5 for i in range(14)]  # a distinct probability per channel
    forced_head(pspnet, logits)
    with torch.inference_mode():
        probs = seg.segment_probabilities(pspnet, torch.rand(80, 80), input_size=64)
    for channel, name in enumerate(seg.ORGAN_NAMES):
        expected = torch.sigmoid(torch.tensor(logits[channel]))
        assert torch.allclose(probs[channel], expected.expand(80, 80), atol=1e-5), name
    # "Left Lung" is channel 4: the patient's left lung (image right), our left_lung.
    assert seg.ORGAN_NAMES[seg.PSPNET_TARGETS.index("Left Lung")] == "left_lung"


def test_masks_leave_absent_structures_out_and_require_lungs_and_heart():
    probs = torch.full((14, 40, 30), 0.9)
    probs[seg.ORGAN_NAMES.index("aorta")] = 0.1
    masks = seg.probabilities_to_masks(probs, 0.5)
    assert masks.names == tuple(n for n in seg.ORGAN_NAMES if n != "aorta")
    assert (masks.height, masks.width) == (40, 30) and float(masks.get("left_lung").min()) == 1.0
    probs[seg.ORGAN_NAMES.index("heart")] = 0.2
    with pytest.raises(CXRInputError, match="no heart at threshold 0.50"):
        seg.probabilities_to_masks(probs, 0.5)


def test_loader_reads_official_layout_and_safetensors_and_rejects_others(official_layout_file, tmp_path):
    model = seg.load_pspnet(official_layout_file)
    assert not model.training and model.classification.out_channels == 14
    # A lighter encoder (1 block per stage) saved as safetensors: the layout is read from the keys.
    from safetensors.torch import save_file

    small = seg.build_pspnet(block_config=(1, 1, 1, 1))
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    loaded = seg.load_pspnet(tmp_path / "small.safetensors")
    assert len(loaded.res_block4.layers) == 1
    torch.save({"classification.weight": torch.zeros(3, 512, 1, 1)}, tmp_path / "other.pth")
    with pytest.raises(CXRInputError, match="not the 14-structure ChestX-Det PSPNet"):
        seg.load_pspnet(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CXRInputError, match="not a readable weight file"):
        seg.load_pspnet(tmp_path / "junk.pth")


def test_without_torchxrayvision_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(weight_files, "torchxrayvision_available", lambda: False)
    with pytest.raises(CXRInputError, match=r'pip install "cxr-counterfactual\[seg\]"'):
        seg.build_pspnet()


# --------------------------------------------------------------------------------------------------
# the node
@pytest.fixture()
def model_folder(comfy, official_layout_file):
    """The folder of the random-weight file registered as an extra cxr_segmentation path."""
    import folder_paths

    folder = str(official_layout_file.parent)
    paths = folder_paths.folder_names_and_paths["cxr_segmentation"][0]
    paths.append(folder)
    yield official_layout_file
    paths.remove(folder)


def test_node_registers_its_model_folder(comfy):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["cxr_segmentation"]
    assert paths[0].endswith("models/cxr_segmentation") and {".pth", ".pt", ".safetensors"} <= extensions
    schema = comfy.node("CXRSegmentOrgans").GET_SCHEMA()
    assert schema.display_name == "Segment Organs (PSPNet)" and schema.category == "CXR Counterfactual/masks"


def test_missing_weights_say_which_file_goes_where(comfy, monkeypatch):
    cls = comfy.node("CXRSegmentOrgans")
    from cxr_counterfactual.nodes import segmentation as node_module

    monkeypatch.setattr(node_module, "weight_files", lambda: [])
    assert cls.GET_SCHEMA().inputs[1].options == []  # an empty folder: the combo is empty, not an error
    for name in ("", "gone.pth"):
        msg = cls.validate_inputs(weights=name)
        assert isinstance(msg, str) and seg.OFFICIAL_WEIGHTS in msg and "models/cxr_segmentation" in msg
        assert "Fix:" in msg and "downloads nothing" in msg
    with pytest.raises(CXRInputError, match=seg.OFFICIAL_WEIGHTS):
        run(cls, image=torch.zeros(1, 64, 64, 3), weights="gone.pth", threshold=0.5)


def test_node_without_torchxrayvision_says_pip_install(comfy, monkeypatch):
    monkeypatch.setattr(weight_files, "torchxrayvision_available", lambda: False)
    cls = comfy.node("CXRSegmentOrgans")
    assert 'pip install "cxr-counterfactual[seg]"' in cls.validate_inputs(weights=seg.OFFICIAL_WEIGHTS)
    with pytest.raises(CXRInputError, match="torchxrayvision"):
        run(cls, image=torch.zeros(1, 64, 64, 3), weights=seg.OFFICIAL_WEIGHTS, threshold=0.5)


def test_node_segments_with_a_weight_file_from_the_folder(comfy, model_folder, monkeypatch):
    cls = comfy.node("CXRSegmentOrgans")
    assert seg.OFFICIAL_WEIGHTS in cls.GET_SCHEMA().inputs[1].options
    assert cls.validate_inputs(weights=seg.OFFICIAL_WEIGHTS) is True
    monkeypatch.setattr(seg, "INPUT_SIZE", 64)  # the real 512 input costs ~15 s on a CPU
    with torch.inference_mode():  # as ComfyUI runs nodes
        out = run(cls, image=torch.rand(1, 90, 70, 3), weights=seg.OFFICIAL_WEIGHTS, threshold=0.5)
    (masks,) = out
    # The file's head marks every structure present except the spine, which is left out.
    assert masks.names == tuple(n for n in seg.ORGAN_NAMES if n != "spine")
    assert (masks.height, masks.width) == (90, 70) and float(masks.get("right_lung").mean()) == 1.0
    # A batch is segmented image by image: set i is what image i alone gives.
    images = torch.rand(2, 90, 70, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        (batch,) = run(cls, image=images, weights=seg.OFFICIAL_WEIGHTS, threshold=0.5)
        alone = [run(cls, image=images[i:i + 1], weights=seg.OFFICIAL_WEIGHTS, threshold=0.5)[0] for i in range(2)]
    assert batch.count == 2
    for got, one in zip(batch.samples, alone, strict=True):
        assert got.names == one.names and torch.equal(got.data, one.data)
