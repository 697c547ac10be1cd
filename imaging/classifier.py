"""TorchXRayVision's DenseNet-121 chest classifier (18 pathologies) from a local file: a classifier's view of an edit.

``torchxrayvision.models.DenseNet(weights=None)`` builds the architecture with untrained weights and downloads
nothing (only a ``weights=`` name makes it fetch a file); the weights come from a file the user placed:

- TorchXRayVision's released ``.pt`` files are whole pickled models (``torch.save(model)``; torchxrayvision
  itself reads them with ``weights_only=False``). They are read with ``weights_only=True`` and an allowlist of
  exactly the classes such a pickle holds (:func:`allowed_classes`); any other global is refused with a
  conversion command (:mod:`.weight_files`). No method of the unpickled object runs: its tensors are copied
  into a freshly built network.
- a state dict (``.pt``/``.pth``) or ``.safetensors`` file of the same network.

Pre-processing follows TorchXRayVision: grey values in [0, 1] mapped to its [-1024, 1024] range, the long side
centre-cropped to a square (its ``XRayCenterCrop``: what the networks were trained on), resized to 224×224 with
the bilinear, anti-aliased resize its models apply to other sizes, one channel. Outputs per image: the 18
pathology probabilities (a sigmoid of the logits, then TorchXRayVision's operating-point normalisation when the
file carries ``op_threshs``: 0.5 is then each pathology's operating point) and the 1024-d pooled feature vector
(``features2``: ReLU then global average pool, what FID-style distances use).

torchxrayvision is optional (``pip install "cxr-counterfactual[seg]"``); it is imported only when a model is built.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from ..errors import CXRInputError
from .weight_files import file_sha256, load_matching, read_tensors, require_torchxrayvision

LOG = logging.getLogger(__name__)

# torchxrayvision's datasets.default_pathologies: the order of the DenseNet's 18 outputs.
PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum",
)
INPUT_SIZE = 224
FEATURES = 1024
XRV_RANGE = 1024.0  # torchxrayvision's pixel range is [-1024, 1024]
OFFICIAL_WEIGHTS = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
OFFICIAL_URL = f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{OFFICIAL_WEIGHTS}"
WHAT = "the DenseNet classifier"
USE = f"Use TorchXRayVision's DenseNet-121 weights ({OFFICIAL_WEIGHTS}, 'densenet121-res224-all') or a state dict " \
      "of torchxrayvision.models.DenseNet()."

# Words users write for a finding, beyond the 18 names themselves (compared after normalise()).
SYNONYMS = {
    "pleural effusion": "Effusion", "effusions": "Effusion", "hydrothorax": "Effusion",
    "oedema": "Edema", "pulmonary edema": "Edema", "pulmonary oedema": "Edema",
    "enlarged heart": "Cardiomegaly", "cardiac enlargement": "Cardiomegaly",
    "collapse": "Atelectasis", "lung collapse": "Atelectasis",
    "infiltrate": "Infiltration", "infiltrates": "Infiltration",
    "opacity": "Lung Opacity", "opacities": "Lung Opacity",
    "nodules": "Nodule", "masses": "Mass", "fractures": "Fracture", "rib fracture": "Fracture",
    "lesion": "Lung Lesion", "lesions": "Lung Lesion", "hiatal hernia": "Hernia",
    "widened mediastinum": "Enlarged Cardiomediastinum",
}


def allowed_classes() -> list[type]:
    """Every class a ``torch.save(model)`` of the DenseNet pickles, besides tensors and containers (torch's
    weights-only unpickler names each one it meets; this is the list it asked for, and nothing else)."""
    require_torchxrayvision(WHAT)
    from torch import nn
    from torchxrayvision import models

    return [models.DenseNet, models._DenseBlock, models._DenseLayer, models._Transition, nn.Sequential, nn.Conv2d,
            nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear]


def build_densenet() -> torch.nn.Module:
    """TorchXRayVision's DenseNet-121 (18 outputs, one input channel) with untrained weights; downloads nothing."""
    require_torchxrayvision(WHAT)
    from torchxrayvision.models import DenseNet

    return DenseNet(weights=None)


@dataclass(frozen=True, eq=False)
class Classifier:
    """A loaded classifier (the ``CXR_CLASSIFIER`` link type).

    Attributes:
        model: the DenseNet, in eval mode.
        weights: the file's name (as the models folder lists it).
        sha256: the file's SHA-256.
        calibrated: the file carries ``op_threshs`` (probabilities are operating-point normalised).
        pathologies: the output order.
    """

    model: torch.nn.Module
    weights: str
    sha256: str
    calibrated: bool
    pathologies: tuple[str, ...] = PATHOLOGIES


def load_classifier(path: Path, name: str | None = None) -> Classifier:
    """The DenseNet with the weights of ``path`` (a whole pickled model, a state dict or safetensors), on the CPU.

    Raises:
        CXRInputError: torchxrayvision missing, unreadable file, a pickle holding anything but the DenseNet's
            classes (with a conversion command), or weights of another network.
    """
    require_torchxrayvision(WHAT)
    state = read_tensors(path, fix=USE, allowed=allowed_classes())
    thresholds = state.pop("op_threshs", None)
    model = load_matching(build_densenet(), state, path, "TorchXRayVision's DenseNet-121 classifier", fix=USE)
    if thresholds is not None:
        if thresholds.shape != (len(PATHOLOGIES),):
            raise CXRInputError(f"'{path.name}' has op_threshs of shape {tuple(thresholds.shape)}, not "
                                f"({len(PATHOLOGIES)},).", fix=USE)
        model.op_threshs = thresholds.float()
    LOG.info("classifier %s: %s probabilities", path.name, "calibrated" if thresholds is not None else "uncalibrated")
    return Classifier(model, name or path.name, file_sha256(path), thresholds is not None)


def preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (or ``[B, H, W]``) in [0, 1] → ``[B, 1, size, size]`` in [-1024, 1024]."""
    grey = images[..., :3].float().mean(-1) if images.ndim == 4 else images.float()
    if grey.ndim != 3:
        raise CXRInputError(f"expected images [B, H, W(, C)], got shape {tuple(images.shape)}.",
                            fix="Connect an IMAGE.")
    h, w = int(grey.shape[-2]), int(grey.shape[-1])
    side = min(h, w)
    y0, x0 = h // 2 - side // 2, w // 2 - side // 2  # XRayCenterCrop's corner
    square = grey[:, y0:y0 + side, x0:x0 + side].clamp(0, 1)
    x = F.interpolate(square[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (2 * x - 1) * XRV_RANGE


@dataclass(frozen=True)
class Scores:
    """The classifier's view of a batch: ``probabilities`` ``[B, 18]`` and ``features`` ``[B, 1024]`` (float32)."""

    probabilities: torch.Tensor
    features: torch.Tensor


def classify(classifier: Classifier, images: torch.Tensor, device: torch.device | str | None = None,
             size: int = INPUT_SIZE) -> Scores:
    """Probabilities and pooled features of every image of a batch (no gradients; on ``device``, default the
    model's own, in the model's dtype).

    Raises:
        CXRInputError: the network gave non-finite values (the weights are broken).
    """
    model = classifier.model if device is None else classifier.model.to(device)
    param = next(model.parameters())
    x = preprocess(images, size).to(param.device, param.dtype)
    with torch.no_grad():
        # nn.Module's attributes are typed Tensor | Module: name the DenseNet's two callables as such.
        features = cast(Callable[[torch.Tensor], torch.Tensor], model.features2)(x)
        logits = cast(Callable[[torch.Tensor], torch.Tensor], model.classifier)(features)
    probs = torch.sigmoid(logits)
    if classifier.calibrated:
        from torchxrayvision.models import op_norm

        probs = op_norm(probs, model.op_threshs.to(probs))
    probs, features = probs.float().cpu(), features.float().cpu()
    if not (bool(torch.isfinite(probs).all()) and bool(torch.isfinite(features).all())):
        raise CXRInputError(f"the classifier '{classifier.weights}' gave non-finite values.", fix=USE)
    return Scores(probs, features)


def pathology_key(name: str) -> str:
    """A pathology as a metric-name part: lower case, every run of other characters one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.split("#")[0].lower()).split())


def _names() -> dict[str, str]:
    return {**SYNONYMS, **{normalise(p): p for p in PATHOLOGIES}}


def pathologies_named(phrase: str) -> set[str]:
    """The pathologies a phrase names: the names and synonyms it contains as whole words, a match inside a longer
    one left out (``large left pleural effusion`` → Effusion; ``lung opacity`` is not also ``opacity``)."""
    words = normalise(phrase).split()
    spans = []  # (first word, end word, pathology)
    for key, pathology in _names().items():
        k = key.split()
        spans += [(i, i + len(k), pathology) for i in range(len(words) - len(k) + 1) if words[i:i + len(k)] == k]
    return {p for a, b, p in spans
            if not any(c <= a and b <= d and (c, d) != (a, b) for c, d, _ in spans)}


def resolve_target(words: str | Sequence[str], input_name: str = "target_pathology") -> str:
    """The one pathology of the 18 that ``words`` (a name, or the pathology words of a prompt) name.

    Raises:
        CXRInputError: nothing matches (the message lists the 18), or several pathologies are named.
    """
    phrases = [words] if isinstance(words, str) else list(words)
    found: list[str] = []
    for phrase in phrases:
        found += [p for p in sorted(pathologies_named(phrase)) if p not in found]
    shown = ", ".join(repr(p) for p in phrases)
    if not found:
        raise CXRInputError(f"{shown} names none of the classifier's pathologies.", input_name=input_name,
                            fix=f"Use one of: {', '.join(PATHOLOGIES)}.")
    if len(found) > 1:
        raise CXRInputError(f"{shown} names several pathologies ({', '.join(found)}).", input_name=input_name,
                            fix="Type the one to score in 'target_pathology'.")
    return found[0]


def pair_scores(source: Sequence[float], edit: Sequence[float], target: str,
                pathologies: Sequence[str] = PATHOLOGIES) -> dict[str, float]:
    """The per-pair classifier metrics from the probabilities of a source and its edit (Python floats, so a
    delta is exactly the difference of the two numbers written beside it)."""
    t = list(pathologies).index(target)
    s, e = [float(v) for v in source], [float(v) for v in edit]
    out = {"classifier_target_source": s[t], "classifier_target_edit": e[t],
           "classifier_target_delta": e[t] - s[t],
           "classifier_off_target_max_abs_delta": max(abs(e[k] - s[k]) for k in range(len(s)) if k != t)}
    for name, sv, ev in zip(pathologies, s, e, strict=True):
        out[f"classifier_{pathology_key(name)}_source"] = sv
        out[f"classifier_{pathology_key(name)}_edit"] = ev
    return out


@dataclass(frozen=True)
class ClassifierView:
    """What the metrics JSON's ``classifier`` block holds (the features feed the report's FID-style distance)."""

    weights: str
    sha256: str
    target: str
    calibrated: bool
    pathologies: tuple[str, ...] = PATHOLOGIES
    features: tuple[dict[str, list[float]], ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        return {"weights": self.weights, "sha256": self.sha256, "target": self.target,
                "pathologies": list(self.pathologies), "calibrated": self.calibrated, "features": list(self.features)}
