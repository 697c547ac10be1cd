"""Fixtures of the classifier tests (tests/test_classifier_*.py), registered in conftest.py so that each is built once
per session whichever of those files run.

- ``densenet``: TorchXRayVision's DenseNet-121, the real architecture with seeded random weights (no published weights
  are used: none may be downloaded). Random DenseNet features reach ~10^3, so the random head is scaled down:
  otherwise every probability saturates at 0 or 1 and no change could show.
- ``classifier_files``: those weights saved the ways users will have them (a whole pickled model, as TorchXRayVision
  releases its weights; a state dict; safetensors; a whole model carrying op_threshs).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import need


def xrv_available() -> None:
    from cxr_counterfactual.imaging import weight_files

    need(weight_files.torchxrayvision_available(),
         'torchxrayvision is not installed: pip install "cxr-counterfactual[seg]"')


@pytest.fixture(scope="session")
def densenet() -> torch.nn.Module:
    """The real DenseNet-121 with seeded random weights; the head scaled so the 18 probabilities spread over (0, 1)
    (logit ~ N(0, 1)-sized for features of norm ~10^4)."""
    from cxr_counterfactual.imaging import classifier as clf

    xrv_available()
    torch.manual_seed(0)
    model = clf.build_densenet().eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1e-4)
        model.classifier.bias.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def classifier_files(densenet, tmp_path_factory) -> dict[str, Path]:
    """The same weights as users will have them: a whole pickled model (TorchXRayVision's release form), a state
    dict and safetensors; and a whole model carrying op_threshs (calibrated)."""
    from safetensors.torch import save_file

    from cxr_counterfactual.imaging import classifier as clf

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
