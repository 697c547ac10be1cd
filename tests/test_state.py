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
from api_graph import CHEXMASK_FILES, CHEXMASK_IMAGE, Graph
from safetensors.torch import load_file

from cxr_counterfactual.demo.tiny_checkpoint import build_tiny_sd15_checkpoint
from cxr_counterfactual.runner.protocol import ExecutionInterrupted

pytestmark = pytest.mark.slow

PROMPT = "chest x-ray, left lung with pleural effusion, normal heart"


def branch(g: Graph, prefix: str, ckpt_node: str, regulation: dict, seed: int, steps: int = 4) -> str:
    """Add one regulated sampler branch to ``g`` (ids ``prefix + n``); returns the SaveLatent node id.

    ``regulation``: ``gate`` (strength), ``boost`` (factor), ``iterations`` (refinement steps).
    """
    p = prefix
    masks, tokens = ["fit", 1], [p + "text", 1]
    g.gate([ckpt_node, 0], masks, tokens, node_id=p + "gate", strength=regulation["gate"],
           token_strength=regulation["gate"])
    g.boost([p + "gate", 0], tokens, masks, node_id=p + "boost", factor=regulation["boost"], end_percent=0.75)
    g.capture([p + "boost", 0], tokens, masks, node_id=p + "capture", label=p + "edit")
    g.add("CXRTextEncode", p + "text", clip=[ckpt_node, 1], text=PROMPT, anatomy="left lung, heart",
          pathology="effusion")
    g.add("CLIPTextEncode", p + "neg", clip=[ckpt_node, 1], text="")
    g.add("VAEEncode", p + "encode", pixels=["fit", 0], vae=[ckpt_node, 2])
    g.refiner(tokens, masks, node_id=p + "refine", iterations=regulation["iterations"], end_percent=0.75)
    g.add("BasicScheduler", p + "sigmas", model=[p + "capture", 0], scheduler="normal", steps=steps, denoise=0.8)
    g.add("SamplerCustom", p + "sampler", model=[p + "capture", 0], add_noise=True, noise_seed=seed, cfg=5.0,
          positive=[p + "text", 0], negative=[p + "neg", 0], sampler=[p + "refine", 0], sigmas=[p + "sigmas", 0],
          latent_image=[p + "encode", 0])
    return g.save_latent([p + "sampler", 0], f"state/{p}latent", node_id=p + "save")


def base_graph(server, ckpts: dict[str, str]) -> Graph:
    """Radiograph + masks fitted to 64 px, and one checkpoint loader per entry of ``ckpts`` (id → file)."""
    g = Graph(next(iter(ckpts.values())), server.object_info())
    g.add("LoadImage", "image", image=CHEXMASK_IMAGE)
    g.add("CXRLoadOrganMasks", "masks", **CHEXMASK_FILES, threshold=0.5)
    g.add("CXRFitToModel", "fit", image=["image", 0], max_side=64, organ_masks=["masks", 0])
    for node, name in ckpts.items():
        g.add("CheckpointLoaderSimple", node, ckpt_name=name)
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


def run(server, g: Graph, saves: list[str], on_progress=None) -> list[torch.Tensor]:
    """Run ``g``; the latents its SaveLatent nodes wrote, after checking every sampler really ran."""
    result = server.run(g.nodes, on_progress=on_progress)
    samplers = [s.replace("save", "sampler") for s in saves]
    assert not set(samplers) & set(result.cached), f"sampler answered from ComfyUI's cache: {result.cached}"
    latents = []
    for save in saves:
        (path,) = result.files(save, "latents")
        latents.append(load_file(str(Path(path)))["latent_tensor"])
    return latents


def one(server, ckpt: str, regulation: dict, seed: int, steps: int = 4, on_progress=None) -> torch.Tensor:
    g = base_graph(server, {"ckpt": ckpt})
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
    g = base_graph(server, {"ckpt": ckpt, "ckpt_b": other})
    saves = [branch(g, "a_", "ckpt", STRONG, seed=5), branch(g, "b_", "ckpt", OTHER, seed=5),
             branch(g, "c_", "ckpt_b", OTHER, seed=5)]
    together = run(server, g, saves)
    for mixed, single in zip(together, alone, strict=True):
        assert torch.equal(mixed, single)
    assert not torch.equal(together[0], together[1]) and not torch.equal(together[1], together[2])
