"""Gate and boost end to end in a real headless ComfyUI: the neutral setting is the stock graph, and the
effect grows with the strength / factor."""

from __future__ import annotations

import pytest
import torch
from api_graph import CHEXMASK_FILES, CHEXMASK_IMAGE, Graph
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def graph(ckpt: str, object_info: dict, strength: float | None, seed: int = 4, stage: str = "gate") -> dict:
    """Radiograph + masks → fit → CXR text encode → [gate] → KSampler → SaveLatent (API format)."""
    g = Graph(ckpt, object_info)
    image = g.image(CHEXMASK_IMAGE)
    fitted, masks, _ = g.fitted(g.file_masks(**CHEXMASK_FILES), image, max_side=128)
    positive = g.encode("chest x-ray, left lung with pleural effusion, normal heart")
    negative, latent = g.negative(), g.latent(fitted)
    model, tokens = g.model, [positive[0], 1]
    if strength is not None and stage == "boost":
        model = g.boost(model, tokens, masks, node_id="10", factor=strength, end_percent=0.5)
    elif strength is not None:
        model = g.gate(model, masks, tokens, node_id="10", strength=strength, token_strength=strength)
    g.save_latent(g.sample(model, positive, negative, latent, steps=4, cfg=7.0, seed=seed, node_id="8"),
                  "gate/latent", node_id="9")
    return g.nodes


@pytest.fixture(scope="module")
def latent(comfy_server, chexmask_example, tiny_checkpoint):
    for name in ("utils_example1.jpg", "RL_mask.png", "LL_mask.png", "H_mask.png"):
        comfy_server.upload_input(chexmask_example / name)
    info = comfy_server.object_info()

    def run(strength, stage="gate"):
        (path,) = comfy_server.run(graph(tiny_checkpoint.name, info, strength, stage=stage)).files("9", "latents")
        return load_file(str(path))["latent_tensor"]
    return run


def test_gate_strength_zero_is_stock_and_effect_grows(latent):
    stock = latent(None)
    assert torch.equal(latent(0.0), stock)
    diffs = [float((latent(s) - stock).abs().mean()) for s in (1e-3, 1e-2, 1e-1)]
    assert 0 < diffs[0] < diffs[1] < diffs[2], diffs


def test_boost_factor_one_is_stock_and_effect_grows(latent):
    stock = latent(None)
    assert torch.equal(latent(1.0, "boost"), stock)
    diffs = [float((latent(f, "boost") - stock).abs().mean()) for f in (1.5, 3.0, 10.0)]
    assert 0 < diffs[0] < diffs[1] < diffs[2], diffs
