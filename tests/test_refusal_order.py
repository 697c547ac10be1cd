"""A setting the connected model cannot serve is refused before any sampler or inversion starts.

Each shipped graph runs on a live headless server with a checkpoint that lacks grids a real SD1.5 has (the
first tiny recipe's two-level UNet: cross-attention at latent ÷ 1 and ÷ 2 only, still detected as SD1.5),
with one node at a time asking for latent ÷ 4. The websocket's ``executing`` events show which nodes ran
before the error: none of them may be a sampler or the inversion (the reported failure ran inversion and
sampling for five minutes, then refused the refinement's grid factor).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from host_fixtures import upload_shipped_inputs

from cxr_counterfactual.demo.tiny_checkpoint import TWO_LEVEL_UNET_CONFIG, build_tiny_sd15_checkpoint
from cxr_counterfactual.runner.protocol import ExecutionFailed
from cxr_counterfactual.runner.server import _link

pytestmark = pytest.mark.slow

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"
#: Nodes that run the model over many steps: nothing of these may run before a refusal.
LONG_RUNNING = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced", "CXRInvertLatent"}
SETTING_NODES = ("CXRRefinementSampler", "CXRCaptureAttention")


@pytest.fixture(scope="module")
def two_level_server(comfy_server, tmp_path_factory, data_dir, chexmask_example):
    """The session's server, with a two-level SD1.5-detected checkpoint beside the tiny one."""
    path = build_tiny_sd15_checkpoint(tmp_path_factory.mktemp("two-level") / "tiny-sd15-two-level.safetensors",
                                      unet_config=TWO_LEVEL_UNET_CONFIG)
    _link(path, comfy_server.base_dir / "models" / "checkpoints" / path.name)
    upload_shipped_inputs(comfy_server, data_dir, chexmask_example)  # run alone, too
    try:
        yield comfy_server, path.name
    finally:
        (comfy_server.base_dir / "models" / "checkpoints" / path.name).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def _cases() -> list[tuple[str, str]]:
    """(workflow, node id) of every shipped node holding a grid factor, in graphs that sample with it."""
    cases = []
    for path in sorted(WORKFLOWS.glob("*.json")):
        graph = json.loads(path.read_text(encoding="utf-8"))
        cases += [(path.stem, k) for k, v in graph.items() if v["class_type"] in SETTING_NODES]
    return cases


@pytest.mark.parametrize(("workflow", "node_id"), _cases())
def test_impossible_grid_factor_is_refused_before_anything_samples(two_level_server, chexmask_example, workflow,
                                                                   node_id):
    server, checkpoint = two_level_server
    graph = json.loads((WORKFLOWS / f"{workflow}.json").read_text(encoding="utf-8"))
    for node in graph.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = checkpoint
        if node["class_type"] == "CXRFitToModel":
            inputs["max_side"] = 64  # small: should anything sample after all, it is over quickly
        if node["class_type"] == "CXREditKeepRegions":
            inputs.update(margin_px=2, feather_px=1.0)  # the shipped 16 px margin covers a 64 px image
        if node["class_type"] in SETTING_NODES:
            inputs["grid_factor"] = "2"  # a grid this model has: only the node under test asks for another
        if node["class_type"] == "LoadImage":
            inputs["image"] = server.upload_input(chexmask_example / "utils_example1.jpg")
    graph[node_id]["inputs"]["grid_factor"] = "4"  # latent ÷ 4: the two-level UNet has no attention there
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph, timeout=600)
    err = failed.value
    assert err.node_id == node_id and "'grid_factor'" in err.exception_message, err
    assert "÷ 4" in err.exception_message and "Fix:" in err.exception_message
    ran = [graph[n]["class_type"] for n in err.executed if n in graph]
    assert ran and ran[-1] == graph[node_id]["class_type"], ran
    assert not LONG_RUNNING & set(ran), f"{workflow}: {ran} ran before the refusal"
