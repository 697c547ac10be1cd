"""The names the pack's node schemas share: categories, link types, choices, tooltips, and the inputs and outputs
several nodes declare alike (declared once here, so a range or a tooltip changes in one place).

A choice list that one node alone offers stays beside that node, or beside the rule it names (the inversion's
schedulers in ``hosts/comfy/inversion.py``). Node ids, input names, their order and defaults are what saved
workflows store: a factory here must return exactly what the nodes declared before it existed.
"""

from __future__ import annotations

from comfy_api.latest import io

# The choices the core validates (one list each; the nodes offer them in this order).
from ..attention.gating import BACKGROUNDS  # noqa: F401
from ..attention.stage_builders import BLOCK_CHOICES, GRID_FACTORS  # noqa: F401

CATEGORY_ROOT = "CXR Counterfactual"
CATEGORY_INPUT = f"{CATEGORY_ROOT}/input"
CATEGORY_MASKS = f"{CATEGORY_ROOT}/masks"
CATEGORY_GEOMETRY = f"{CATEGORY_ROOT}/geometry"
CATEGORY_TEXT = f"{CATEGORY_ROOT}/conditioning"
CATEGORY_ATTENTION = f"{CATEGORY_ROOT}/attention"
CATEGORY_EDIT = f"{CATEGORY_ROOT}/edit"
CATEGORY_INSPECT = f"{CATEGORY_ROOT}/inspect"
CATEGORY_OUTPUT = f"{CATEGORY_ROOT}/output"

# Link types of the pack. A custom type is a plain type string in ComfyUI.
OrganMasksType = io.Custom("ORGAN_MASKS")
GeometryType = io.Custom("CXR_GEOMETRY")
TokensType = io.Custom("CXR_TOKENS")
FitType = io.Custom("CXR_FIT")
MetricsType = io.Custom("CXR_METRICS")
ClassifierType = io.Custom("CXR_CLASSIFIER")

NONE_CHOICE = "(none)"  # an optional file input left empty

WINDOW_TIP = (
    " A fraction of the model's noise range (ComfyUI's convention, as ControlNet uses), not of the step count."
)


def described(cls: type, *more: str) -> str:
    """A node's description (ComfyUI shows it on hovering over the node): its class docstring as one paragraph,
    then ``more`` sentences. One text serves the UI, ``help()`` and the docs."""
    return " ".join([*(cls.__doc__ or "").split(), *more])


def fraction_input(name: str, default: float, tooltip: str, step: float = 0.01) -> io.Input:
    """A number from 0 to 1 (a strength, a share, a threshold on a 0–1 scale)."""
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=step, tooltip=tooltip)


def window_inputs(start_tip: str, end_tip: str, end: float = 1.0) -> list[io.Input]:
    """``start_percent`` and ``end_percent``: the part of denoising a stage acts in (ComfyUI's percent convention)."""
    return [
        fraction_input("start_percent", 0.0, start_tip + WINDOW_TIP),
        fraction_input("end_percent", end, end_tip + WINDOW_TIP),
    ]


def target_organs_input() -> io.Input:
    """The organs whose union is a stage's target region (with the fitted organ masks)."""
    return io.String.Input("target_organs", default="left_lung", tooltip="Organs forming the target region.")


def organ_masks_input(tooltip: str, optional: bool = False) -> io.Input:
    return OrganMasksType.Input("organ_masks", optional=optional, tooltip=tooltip)


def organ_masks_output(tooltip: str = "The organs as one bundle.") -> io.Output:
    return OrganMasksType.Output(display_name="organ_masks", tooltip=tooltip)


def patched_model_output(tooltip: str = "A patched copy of the model.") -> io.Output:
    return io.Model.Output(display_name="model", tooltip=tooltip)
