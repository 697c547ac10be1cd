"""Node: TorchXRayVision's DenseNet chest classifier, with weights from a ComfyUI models folder."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..imaging import classifier as clf
from ..imaging.weight_files import require_torchxrayvision
from .common import user_errors
from .model_files import ModelFolder, WeightFileNode
from .schema import CATEGORY_INSPECT, ClassifierType, described

LOG = logging.getLogger(__name__)
FOLDER = ModelFolder("cxr_classifiers", clf.OFFICIAL_WEIGHTS, clf.OFFICIAL_URL).register()


class CXRLoadClassifier(WeightFileNode):
    """Loads TorchXRayVision's DenseNet-121 chest classifier (18 pathologies) from a file in models/cxr_classifiers,
    for CXR Evaluate Edit's classifier view of an edit (the target pathology's probability before and after, the
    change on the other 17, and 1024-d features for set-level distances). Nothing is downloaded. A released
    TorchXRayVision .pt file (a whole pickled model) is read without running code: only the DenseNet's own classes
    are accepted, anything else is refused with a command that converts the file to .safetensors. Needs the
    optional torchxrayvision: pip install "cxr-counterfactual[seg]"."""

    TITLE = "CXR Load Classifier"
    FOLDER = FOLDER

    @classmethod
    def define_schema(cls) -> io.Schema:
        files = FOLDER.files()
        return io.Schema(
            node_id="CXRLoadClassifier", display_name=cls.TITLE, category=CATEGORY_INSPECT,
            description=described(cls),
            inputs=[
                io.Combo.Input(
                    "weights", options=files, default=FOLDER.default(files),
                    tooltip=f"DenseNet-121 weight file from models/{FOLDER.name} (.pt/.pth/.safetensors): "
                    f"TorchXRayVision's {clf.OFFICIAL_WEIGHTS} ('densenet121-res224-all'), another of its "
                    "DenseNet-121 files, or a state dict of torchxrayvision.models.DenseNet().",
                ),
            ],
            outputs=[ClassifierType.Output(display_name="classifier",
                                           tooltip="For CXR Evaluate Edit's 'classifier' input.")],
        )

    @classmethod
    def execute(cls, weights: str) -> io.NodeOutput:
        with user_errors(cls.TITLE, "weights"):
            require_torchxrayvision(clf.WHAT)
            loaded = clf.load_classifier(FOLDER.path(weights), weights)
        LOG.info("classifier %s (sha256 %s, %s)", weights, loaded.sha256[:12],
                 "calibrated" if loaded.calibrated else "uncalibrated")
        return io.NodeOutput(loaded)


NODES: list[type[io.ComfyNode]] = [CXRLoadClassifier]
