"""State between runs in a real headless ComfyUI: a regulated graph gives the same latent as its first run
after other seeds, an ``/interrupt`` in the middle of a refined run, a switch to another checkpoint, and
inside one graph that also holds a differently regulated model.

The graph is the whole regulated chain (gate → boost → capture → refinement sampler, one SamplerCustom).
ComfyUI keeps the outputs of the last prompt's nodes, so a repeated graph would be answered from its cache
and prove nothing: every comparison first checks that the sampler really ran again (not in ``cached``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cxr_counterfactual.demo.tiny_checkpoint import build_tiny_sd15_checkpoint
from cxr_counterfactual.runner.protocol import ExecutionInterrupted

pytestmark = pytest.mark.slow

PROMPT = "chest x-ray, left lung with pleural effusion, normal heart"


def branch(g: dict, prefix: str, ckpt_node: str, regulation: dict, seed: int, steps: int = 4) -> str:
    """Add one regulated sampler branch to ``g`` (ids ``prefix + n``); returns the SaveLatent node id.

    ``regulation``: ``gate`` (strength), ``boost`` (factor), ``iterations`` (refinement steps).
    """
    p = prefix
    g[p + "gate"] = {"class_type": "CXRAnatomyAttentionGate", "inputs": {
        "model": [ckpt_node, 0], "organ_masks": ["fit", 1], "tokens": [p + "text", 1],
        "strength": regulation["gate"], "token_strength": regulation["gate"], "organs": "right_lung, left_lung, heart",
        "background": "free", "margin_px": 0, "blocks": "all", "start_percent": 0.0, "end_percent": 1.0,
        "apply_to_uncond": False}}
    g[p + "boost"] = {"class_type": "CXRPathologyBoost", "inputs": {
        "model": [p + "gate", 0], "tokens": [p + "text", 1], "organ_masks": ["fit", 1], "target_organs": "left_lung",
        "factor": regulation["boost"], "words": "", "outside_damping": 1.0, "blocks": "all", "start_percent": 0.0,
        "end_percent": 0.75}}
    g[p + "capture"] = {"class_type": "CXRCaptureAttention", "inputs": {
        "model": [p + "boost", 0], "tokens": [p + "text", 1], "organ_masks": ["fit", 1], "label": p + "edit",
        "grid_factor": "2", "target_organs": "left_lung", "start_percent": 0.0, "end_percent": 1.0}}
    g[p + "text"] = {"class_type": "CXRTextEncode", "inputs": {
        "clip": [ckpt_node, 1], "text": PROMPT, "anatomy": "left lung, heart", "pathology": "effusion"}}
    g[p + "neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [ckpt_node, 1], "text": ""}}
    g[p + "encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["fit", 0], "vae": [ckpt_node, 2]}}
    g[p + "refine"] = {"class_type": "CXRRefinementSampler", "inputs": {
        "tokens": [p + "text", 1], "organ_masks": ["fit", 1], "target_organs": "left_lung",
        "iterations": regulation["iterations"], "step_size": 0.1, "start_percent": 0.0, "end_percent": 0.75,
        "thresholds": "", "grid_factor": "2", "smoothing": 0.5, "extent_weight": 0.0, "extent_threshold": 0.5}}
    g[p + "sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": [p + "capture", 0], "scheduler": "normal", "steps": steps, "denoise": 0.8}}
    g[p + "sampler"] = {"class_type": "SamplerCustom", "inputs": {
        "model": [p + "capture", 0], "add_noise": True, "noise_seed": seed, "cfg": 5.0, "positive": [p + "text", 0],
        "negative": [p + "neg", 0], "sampler": [p + "refine", 0], "sigmas": [p + "sigmas", 0],
        "latent_image": [p + "encode", 0]}}
    g[p + "save"] = {"class_type": "SaveLatent", "inputs": {"samples": [p + "sampler", 0],
                                                           "filename_prefix": f"state/{p}latent"}}
    return p + "save"


def base_graph(ckpts: dict[str, str]) -> dict:
    """Radiograph + masks fitted to 64 px, and one checkpoint loader per entry of ``ckpts`` (id → file)."""
    g: dict = {
        "image": {"class_type": "LoadImage", "inputs": {"image": "utils_example1.jpg"}},
        "masks": {"class_type": "CXRLoadOrganMasks", "inputs": {"right_lung": "RL_mask.png",
                                                                "left_lung": "LL_mask.png", "heart": "H_mask.png",
                                                                "threshold": 0.5}},
        "fit": {"class_type": "CXRFitToModel", "inputs": {"image": ["image", 0], "max_side": 64,
                                                          "organ_masks": ["masks", 0]}},
    }
    for node, name in ckpts.items():
        g[node] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
    return g


STRONG = {"gate": 1.0, "boost": 3.0, "iterations": 1}
OTHER = {"gate": 0.5, "boost": 1.5, "iterations": 2}


@pytest.fixture(scope="module")
def server(comfy_server, chexmask_example, tiny_checkpoint, tmp_path_factory):
    for name in ("utils_example1.jpg", "RL_mask.png", "LL_mask.png", "H_mask.png"):
        comfy_server.upload_input(chexmask_example / name)
    # A second checkpoint of the same layout with other weights, for switching models between runs.
    other = build_tiny_sd15_checkpoint(tmp_path_factory.mktemp("other-ckpt") / "tiny-sd15-seed1.safetensors", seed=1)
    link = comfy_server.base_dir / "models" / "checkpoints" / other.name
    if not link.exists():
        link.symlink_to(other)
    return comfy_server


def run(server, g: dict, saves: list[str], on_progress=None) -> list[torch.Tensor]:
    """Run ``g``; the latents its SaveLatent nodes wrote, after checking every sampler really ran."""
    result = server.run(g, on_progress=on_progress)
    samplers = [s.replace("save", "sampler") for s in saves]
    assert not set(samplers) & set(result.cached), f"sampler answered from ComfyUI's cache: {result.cached}"
    latents = []
    for save in saves:
        (path,) = result.files(save, "latents")
        latents.append(load_file(str(Path(path)))["latent_tensor"])
    return latents


def one(server, ckpt: str, regulation: dict, seed: int, steps: int = 4, on_progress=None) -> torch.Tensor:
    g = base_graph({"ckpt": ckpt})
    save = branch(g, "a_", "ckpt", regulation, seed, steps)
    return run(server, g, [save], on_progress)[0]


def test_runs_in_between_leave_no_state(server, tiny_checkpoint):
    ckpt, other = tiny_checkpoint.name, "tiny-sd15-seed1.safetensors"
    first = one(server, ckpt, STRONG, seed=5)
    assert torch.isfinite(first).all()

    # Other seeds in between.
    assert not torch.equal(one(server, ckpt, STRONG, seed=6), first)
    assert torch.equal(one(server, ckpt, STRONG, seed=5), first)

    # /interrupt while the refined sampler is in its third step (of 30).
    interrupted = threading.Event()

    def stop_midway(event) -> None:
        if event.node == "a_sampler" and event.value >= 2 and not interrupted.is_set():
            interrupted.set()
            server.interrupt()

    with pytest.raises(ExecutionInterrupted):
        one(server, ckpt, STRONG, seed=7, steps=30, on_progress=stop_midway)
    assert interrupted.is_set()
    assert torch.equal(one(server, ckpt, STRONG, seed=5), first)

    # Another checkpoint, then back.
    switched = one(server, other, STRONG, seed=5)
    assert torch.isfinite(switched).all() and not torch.equal(switched, first)
    assert torch.equal(one(server, ckpt, STRONG, seed=5), first)


def test_two_differently_regulated_models_in_one_graph(server, tiny_checkpoint):
    ckpt, other = tiny_checkpoint.name, "tiny-sd15-seed1.safetensors"
    spacer = dict(ckpt=ckpt, regulation=STRONG, seed=9)  # a prompt in between empties ComfyUI's cache
    one(server, **spacer)
    alone = [one(server, ckpt, STRONG, seed=5), one(server, ckpt, OTHER, seed=5), one(server, other, OTHER, seed=5)]
    one(server, **spacer)
    g = base_graph({"ckpt": ckpt, "ckpt_b": other})
    saves = [branch(g, "a_", "ckpt", STRONG, seed=5), branch(g, "b_", "ckpt", OTHER, seed=5),
             branch(g, "c_", "ckpt_b", OTHER, seed=5)]
    together = run(server, g, saves)
    for mixed, single in zip(together, alone, strict=True):
        assert torch.equal(mixed, single)
    assert not torch.equal(together[0], together[1]) and not torch.equal(together[1], together[2])
