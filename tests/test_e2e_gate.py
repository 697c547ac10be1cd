"""Gate and boost end to end in a real headless ComfyUI: the neutral setting is the stock graph, and the
effect grows with the strength / factor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def graph(ckpt: str, strength: float | None, seed: int = 4, stage: str = "gate") -> dict:
    """Radiograph + masks → fit → CXR text encode → [gate] → KSampler → SaveLatent (API format)."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "utils_example1.jpg"}},
        "2": {"class_type": "CXRLoadOrganMasks", "inputs": {"right_lung": "RL_mask.png", "left_lung": "LL_mask.png",
                                                              "heart": "H_mask.png", "threshold": 0.5}},
        "3": {"class_type": "CXRFitToModel", "inputs": {"image": ["1", 0], "max_side": 128, "organ_masks": ["2", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "CXRTextEncode", "inputs": {"clip": ["4", 1], "anatomy": "left lung, heart",
                                                         "pathology": "effusion",
                                                         "text": "chest x-ray, left lung with pleural effusion, "
                                                                 "normal heart"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["4", 2]}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                   "latent_image": ["7", 0], "seed": seed, "steps": 4, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "gate/latent"}},
    }
    if strength is not None and stage == "boost":
        g["10"] = {"class_type": "CXRPathologyBoost", "inputs": {
            "model": ["4", 0], "tokens": ["5", 1], "organ_masks": ["3", 1], "target_organs": "left_lung",
            "factor": strength, "words": "", "outside_damping": 1.0, "blocks": "all", "start_percent": 0.0,
            "end_percent": 0.5}}
        g["8"]["inputs"]["model"] = ["10", 0]
    elif strength is not None:
        g["10"] = {"class_type": "CXRAnatomyAttentionGate", "inputs": {
            "model": ["4", 0], "organ_masks": ["3", 1], "tokens": ["5", 1], "strength": strength,
            "token_strength": strength, "organs": "right_lung, left_lung, heart", "background": "free",
            "margin_px": 0, "blocks": "all", "start_percent": 0.0, "end_percent": 1.0, "apply_to_uncond": False}}
        g["8"]["inputs"]["model"] = ["10", 0]
    return g


@pytest.fixture(scope="module")
def latent(comfy_server, chexmask_example, tiny_checkpoint):
    for name in ("utils_example1.jpg", "RL_mask.png", "LL_mask.png", "H_mask.png"):
        comfy_server.upload_input(chexmask_example / name)

    def run(strength, stage="gate"):
        (path,) = comfy_server.run(graph(tiny_checkpoint.name, strength, stage=stage)).files("9", "latents")
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
