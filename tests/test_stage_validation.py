"""One validation for both hosts: the same bad inputs, fed to the ComfyUI nodes (executed in-process by the real
ComfyUI) and to the diffusers builders, are refused with the same message (the node adds its title).

Inputs are real: the CheXmask example's organ masks fitted to 64 px, and the same prompt's token map from CXR Text
Encode (ComfyUI's CLIP) and from transformers' CLIP tokenizer (the diffusers side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from cxr_helpers import PROMPT, run
from diffusers_helpers import SD_SCHEDULER, clip_tokenizer, require_diffusers

from cxr_counterfactual.attention.schedule import DiscreteSchedule
from cxr_counterfactual.attention.stage_builders import target_region
from cxr_counterfactual.errors import CXRInputError

NAN, INF = math.nan, math.inf
GATE, BOOST, CAPTURE = "CXRAnatomyAttentionGate", "CXRPathologyBoost", "CXRCaptureAttention"


@dataclass(frozen=True)
class Bad:
    """One bad input: the node and its overridden inputs (node input names); ``diffusers`` overrides the
    diffusers builder's keywords where its names or types differ (``words`` → ``factors`` mapping, ...)."""

    node: str
    inputs: dict
    diffusers: dict = field(default_factory=dict)


BAD = {
    # the gate
    "gate_strength_nan": Bad(GATE, {"strength": NAN}),
    "gate_strength_inf": Bad(GATE, {"strength": INF}),
    "gate_strength_above_1": Bad(GATE, {"strength": 1.5}),
    "gate_token_strength_negative": Bad(GATE, {"token_strength": -0.1}),
    "gate_background_unknown": Bad(GATE, {"background": "sideways"}),
    "gate_blocks_unknown": Bad(GATE, {"blocks": "everything"}),
    "gate_margin_above_max": Bad(GATE, {"margin_px": 300}),
    "gate_window_reversed": Bad(GATE, {"start_percent": 0.8, "end_percent": 0.2}),
    "gate_window_end_nan": Bad(GATE, {"end_percent": NAN}),
    "gate_window_start_inf": Bad(GATE, {"start_percent": INF}),
    "gate_organ_absent": Bad(GATE, {"organs": "left_lung, clavicle"}),
    "gate_anatomy_word_without_mask": Bad(GATE, {"organ_masks": "lungs only", "organs": "right_lung, left_lung"}),
    "gate_isolation_unknown": Bad(GATE, {"anatomy_isolation": "sideways"}),
    # the boost (the diffusers builder takes the target built by target_region)
    "boost_factor_nan": Bad(BOOST, {"factor": NAN}),
    "boost_factor_inf": Bad(BOOST, {"factor": INF}),
    "boost_factor_zero": Bad(BOOST, {"factor": 0.0}),
    "boost_factor_above_max": Bad(BOOST, {"factor": 51.0}),
    "boost_damping_nan": Bad(BOOST, {"outside_damping": NAN}, {"damping": NAN}),
    "boost_damping_above_1": Bad(BOOST, {"outside_damping": 1.5}, {"damping": 1.5}),
    "boost_word_factor_nan": Bad(BOOST, {"words": "effusion=nan"}, {"factors": {"effusion": NAN}}),
    "boost_word_factor_inf": Bad(BOOST, {"words": "effusion=inf"}, {"factors": {"effusion": INF}}),
    "boost_word_factor_zero": Bad(BOOST, {"words": "effusion=0"}, {"factors": {"effusion": 0.0}}),
    "boost_word_not_in_token_map": Bad(BOOST, {"words": "pneumothorax=2"}, {"factors": {"pneumothorax": 2.0}}),
    "boost_word_occurrence_beyond_count": Bad(BOOST, {"words": "effusion#2=2"}, {"factors": {"effusion#2": 2.0}}),
    "boost_word_occurrence_malformed": Bad(BOOST, {"words": "effusion#x"}, {"factors": {"effusion#x": 3.0}}),
    "boost_word_named_twice": Bad(BOOST, {"words": "effusion, effusion#1"},
                                  {"factors": {"effusion": 3.0, "effusion#1": 3.0}}),
    "boost_blocks_unknown": Bad(BOOST, {"blocks": "encoder"}),
    "boost_window_reversed": Bad(BOOST, {"start_percent": 0.5, "end_percent": 0.1}),
    "boost_target_organ_absent": Bad(BOOST, {"target_organs": "clavicle"}),
    "boost_target_mask_empty": Bad(BOOST, {"target_mask": 0.0}),
    "boost_target_mask_nan": Bad(BOOST, {"target_mask": NAN}),
    # the capture
    "capture_grid_factor_unknown": Bad(CAPTURE, {"grid_factor": "3"}, {"grid_factor": 3}),
    "capture_window_reversed": Bad(CAPTURE, {"start_percent": 0.9, "end_percent": 0.1}),
    "capture_window_end_nan": Bad(CAPTURE, {"end_percent": NAN}),
    "capture_target_organ_absent": Bad(CAPTURE, {"target_organs": "clavicle"}),
}


@pytest.fixture(scope="module")
def hosts(comfy, comfyui_path, tiny_model, chest):
    """Both hosts' valid inputs: the node inputs (ComfyUI's model, masks, CXR Text Encode's token map) and the
    diffusers builders' (the same masks, the tokenizer's token map, a DDIM scheduler's schedule)."""
    require_diffusers()
    from diffusers import DDIMScheduler

    from cxr_counterfactual.hosts.diffusers.stages import token_map

    tokens = token_map(clip_tokenizer(comfyui_path), PROMPT, anatomy="left lung, heart", pathology="effusion")
    assert tokens.positions == chest.tokens.positions  # the same words at the same places: a fair comparison
    schedule = DiscreteSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER))
    return tiny_model.model, chest, tokens, schedule


def _node_inputs(node: str, model, chest, overrides: dict) -> dict:
    masks = chest.masks
    if overrides.get("organ_masks") == "lungs only":  # the token map ties 'heart' to an organ these masks lack
        masks = masks.select("right_lung, left_lung")
    common = dict(model=model, tokens=chest.tokens, organ_masks=masks, start_percent=0.0, end_percent=1.0)
    if node == GATE:
        inputs = dict(common, strength=1.0, token_strength=1.0, organs="right_lung, left_lung, heart",
                      background="free", margin_px=0, blocks="all", apply_to_uncond=False)
    elif node == BOOST:
        inputs = dict(common, target_organs="left_lung", factor=3.0, words="", outside_damping=1.0, blocks="all",
                      end_percent=0.4)
    else:
        inputs = dict(common, label="run", grid_factor="2", target_organs="left_lung")
    inputs.update({k: v for k, v in overrides.items() if k != "organ_masks"})
    if "target_mask" in inputs:
        inputs["target_mask"] = torch.full((1, *masks.data.shape[-2:]), inputs["target_mask"])
    return inputs


def _diffusers_build(node: str, tokens, schedule, inputs: dict, extra: dict):
    """The diffusers side of one case: the same values through the diffusers builders."""
    from cxr_counterfactual.hosts.diffusers import stages

    masks = inputs["organ_masks"]
    window = {k: inputs[k] for k in ("start_percent", "end_percent")}
    if node == GATE:
        keys = ("strength", "token_strength", "organs", "background", "margin_px", "blocks", "apply_to_uncond",
                "anatomy_isolation")
        return stages.gate_stage(masks, schedule, tokens=tokens, **{k: inputs[k] for k in keys if k in inputs},
                                 **window)
    if node == BOOST:
        target = target_region(masks, inputs["target_organs"], inputs.get("target_mask"))
        kwargs = dict(factor=inputs["factor"], damping=inputs["outside_damping"], blocks=inputs["blocks"], **window)
        return stages.boost_stage(tokens, target, schedule, **{**kwargs, **extra})
    target = target_region(masks, inputs["target_organs"])
    kwargs = dict(label=inputs["label"], grid_factor=int(inputs["grid_factor"]), **window)
    return stages.capture_stage(tokens, schedule, target=target, **{**kwargs, **extra})


@pytest.mark.parametrize("case", list(BAD))
def test_both_hosts_refuse_a_bad_input_with_the_same_message(comfy, hosts, case):
    model, chest, tokens, schedule = hosts
    bad = BAD[case]
    inputs = _node_inputs(bad.node, model, chest, bad.inputs)
    node = comfy.node(bad.node)
    with pytest.raises(CXRInputError) as by_node:
        run(node, **inputs)
    with pytest.raises(CXRInputError) as by_diffusers:
        _diffusers_build(bad.node, tokens, schedule, inputs, bad.diffusers)
    n, d = by_node.value, by_diffusers.value
    assert n.node == node.TITLE and d.node == ""  # the node adds its title; a diffusers builder is no node
    assert (n.input_name, n.problem, n.fix) == (d.input_name, d.problem, d.fix)
    assert str(n) == f"[{node.TITLE}] {d}"
    overridden = {"organ_masks": "tokens"}.get(next(iter(bad.inputs)), next(iter(bad.inputs)))
    assert n.input_name == overridden, n  # refused for the input that is bad, not for another


def test_the_valid_inputs_build_the_same_stage_in_both_hosts(comfy, hosts):
    """The baseline of every case is valid in both hosts and builds stages with the same settings; the ComfyUI
    host patches exactly the attention kinds the stage states."""
    from cxr_counterfactual.hosts.comfy.patch import run_state

    model, chest, tokens, schedule = hosts
    for node_id, overrides in ((GATE, {}), (GATE, {"token_strength": 0.0}), (BOOST, {}), (CAPTURE, {})):
        inputs = _node_inputs(node_id, model, chest, overrides)
        patched = run(comfy.node(node_id), **inputs)[0]
        assert patched is not model and run_state(patched) is not None
        stage = _diffusers_build(node_id, tokens, schedule, inputs, {})
        replace = patched.model_options["transformer_options"]["patches_replace"]
        assert {k for k in ("attn1", "attn2") if replace.get(k)} == set(stage.kinds)  # the host read the kinds
        ours = next(iter(replace[stage.kinds[-1]].values())).stages[-1]
        assert type(ours) is type(stage) and ours.kinds == stage.kinds and ours.blocks == stage.blocks
        for name in ("organs", "self_leak", "token_leak", "background", "token_words", "positions", "factors",
                     "damping", "grid_factor", "label", "pathology"):
            assert getattr(ours, name, None) == getattr(stage, name, None), (node_id, name)
