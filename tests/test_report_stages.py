"""report/stages.py on the shipped API workflows: which stages a row's graph runs on the evaluated image (the
configuration rule), the edit-mask source, and the neutral values against the core's own ``neutral`` rule."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import ROOT
from cxr_counterfactual.report.stages import configuration, edit_mask_source, is_neutral, mask_source, stages_on

API = ROOT / "workflows" / "api"


def graph(name: str) -> dict:
    return json.loads((API / f"{name}.json").read_text())


def titled(g: dict, title: str) -> dict:
    return next(n for n in g.values() if n.get("_meta", {}).get("title") == title)["inputs"]


def test_the_shipped_workflows_run_every_stage_on_the_evaluated_image():
    # cxr_ablation evaluates the "all stages" branch: gate → boost → SamplerCustom with the refinement sampler.
    assert configuration(graph("cxr_ablation")) == "gate + boost + refinement"
    assert configuration(graph("cxr_counterfactual_edit")) == "gate + boost + refinement"
    assert configuration(graph("cxr_chexmask_edit")) == "gate + boost"  # KSampler: no refinement sampler


def test_only_the_evaluated_branch_counts():
    # Point the ablation's evaluation at the "gated" branch's decode: its sampler's model is the gate alone.
    g = graph("cxr_ablation")
    evaluate = next(n for n in g.values() if n["class_type"] == "CXREvaluateEdit")
    evaluate["inputs"]["edited"] = ["23", 0]  # Decode: gated
    assert stages_on(g) == ("gate",)
    evaluate["inputs"]["edited"] = ["19", 0]  # Decode: stock
    assert configuration(g) == "stock"


@pytest.mark.parametrize(("title", "values", "neutral"), [
    ("Stage 2: anatomy gate", {"strength": 0.0, "token_strength": 0.0}, True),
    ("Stage 2: anatomy gate", {"strength": 0.0, "token_strength": 0.5}, False),
    ("Stage 2: anatomy gate", {"strength": 0.3, "token_strength": 0.0}, False),
    ("Stage 3: pathology boost", {"factor": 1.0}, True),
    ("Stage 3: pathology boost", {"factor": 1.0, "outside_damping": 0.5}, False),
    ("Stage 3: pathology boost", {"factor": 3.0, "words": "effusion=1"}, True),  # the word's own factor wins
    ("Stage 3: pathology boost", {"factor": 1.0, "words": "effusion=2, edema"}, False),
    ("Stage 3: pathology boost", {"factor": 1.0, "words": "effusion, edema"}, True),  # bare words take factor
    ("Stage 4: latent refinement (Euler)", {"iterations": 0}, True),
    ("Stage 4: latent refinement (Euler)", {"iterations": 2}, False),
])
def test_neutral_values(title, values, neutral):
    g = copy.deepcopy(graph("cxr_counterfactual_edit"))
    titled(g, title).update(values)
    node = next(n for n in g.values() if n.get("_meta", {}).get("title") == title)
    assert is_neutral(node) is neutral
    stage = {"Stage 2": "gate", "Stage 3": "boost", "Stage 4": "refinement"}[title[:7]]
    assert (stage in stages_on(g)) is not neutral


def test_the_neutral_values_are_the_cores(comfy, chest):
    """The same inputs through the real builders: ``neutral`` of the core's stage agrees with the report's rule."""
    from cxr_counterfactual.attention.stage_builders import boost_stage, gate_stage, target_region

    def to_sigma(_: float) -> float:
        return 1.0

    for strength, token_strength in ((0.0, 0.0), (0.0, 0.5), (0.4, 0.0), (1.0, 1.0)):
        stage = gate_stage(chest.masks, to_sigma, tokens=chest.tokens, strength=strength,
                           token_strength=token_strength)
        node = {"class_type": "CXRAnatomyAttentionGate", "inputs": {"strength": strength,
                                                                    "token_strength": token_strength}}
        assert stage.neutral is is_neutral(node), (strength, token_strength)
    for factor, words, damping in ((1.0, "", 1.0), (3.0, "", 1.0), (1.0, "", 0.5), (3.0, "effusion=1", 1.0)):
        stage = boost_stage(chest.tokens, target_region(chest.masks, "left_lung"), to_sigma, factor=factor, words=words,
                            outside_damping=damping)
        node = {"class_type": "CXRPathologyBoost", "inputs": {"factor": factor, "words": words,
                                                              "outside_damping": damping}}
        assert stage.neutral is is_neutral(node), (factor, words, damping)


def test_edit_mask_source_is_read_from_the_evaluation():
    g = graph("cxr_counterfactual_edit")
    assert edit_mask_source(g).startswith("none (edit_organ_masks not connected")
    evaluate = next(n for n in g.values() if n["class_type"] == "CXREvaluateEdit")
    g["90"] = {"class_type": "CXRAtlasOrgans", "inputs": {"image": ["21", 0], "min_quality": 0.5}}
    evaluate["inputs"]["edit_organ_masks"] = ["90", 0]
    assert edit_mask_source(g).startswith("weight-free atlas")
    g["90"] = {"class_type": "CXRSegmentOrgans", "inputs": {"image": ["21", 0]}}
    assert edit_mask_source(g).startswith("segmentation node")


def test_the_source_and_edit_mask_sources_are_told_apart():
    from cxr_counterfactual.runner import graph as g

    chexmask = graph("cxr_chexmask_edit")
    g.add_organ_dice(chexmask, g.ATLAS, "cxr_chexmask_edit")
    assert mask_source(chexmask, "organ_masks").startswith("CheXmask annotation")
    assert edit_mask_source(chexmask).startswith("weight-free atlas")  # two methods: the report notes it
    full = graph("cxr_counterfactual_edit")
    g.add_organ_dice(full, g.ATLAS, "cxr_counterfactual_edit")
    assert mask_source(full, "organ_masks") == edit_mask_source(full)  # the atlas on both sides
