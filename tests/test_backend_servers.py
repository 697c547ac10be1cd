"""The user's attention backend end to end: a real headless ComfyUI started with each attention flag a CPU user can
give, a small gated (hard and soft) + boosted graph on the CheXmask radiograph, and the server's log saying which
backend the gated layers ran on (ComfyUI's own choice: ``comfy.ldm.modules.attention.optimized_attention``).

Each flag other than the default costs one server start (a few seconds on 2 cores): the graph is kept at 64 px and
2 steps. The default reuses the session's server (``comfy_server``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from api_graph import CHEXMASK_FILES, CHEXMASK_IMAGE, Graph
from safetensors.torch import load_file

from cxr_counterfactual.runner.server import ComfyServer

pytestmark = pytest.mark.slow

#: ComfyUI's flag → the backend it picks on a CPU (comfy/ldm/modules/attention.py); None: no flag.
FLAGS = {
    None: "attention_sub_quad",
    "--use-split-cross-attention": "attention_split",
    "--use-quad-cross-attention": "attention_sub_quad",
    "--use-pytorch-cross-attention": "attention_pytorch",
}
HARD, SOFT = "21", "22"


def graph(ckpt: str, object_info: dict) -> dict:
    """Radiograph + masks → fit (64 px) → CXR text encode → hard gate → KSampler → SaveLatent, and
    soft gate + boost → KSampler → SaveLatent."""
    g = Graph(ckpt, object_info)
    image = g.image(CHEXMASK_IMAGE)
    fitted, masks, _ = g.fitted(g.file_masks(**CHEXMASK_FILES), image, max_side=64)
    positive = g.encode("chest x-ray, left lung with pleural effusion, normal heart")
    negative, latent = g.negative(), g.latent(fitted)
    tokens = [positive[0], 1]
    hard = g.gate(g.model, masks, tokens, strength=1.0)
    soft = g.boost(g.gate(g.model, masks, tokens, strength=0.5), tokens, masks, factor=3.0)
    for model, save in ((hard, HARD), (soft, SOFT)):
        g.save_latent(g.sample(model, positive, negative, latent, steps=2, cfg=5.0), f"backend/{save}", node_id=save)
    return g.nodes


@pytest.fixture(scope="module", params=list(FLAGS), ids=lambda f: f or "default")
def server(request, comfy_server, comfyui_path: Path, tiny_checkpoint: Path, chexmask_example: Path,
           tmp_path_factory) -> Iterator[tuple[ComfyServer, str]]:
    flag = request.param
    if flag is None:
        started = comfy_server
    else:
        base = tmp_path_factory.mktemp("comfy-backend")
        started = ComfyServer(comfyui_path, checkpoints=[tiny_checkpoint], base_dir=base, extra_args=[flag]).start()
    try:
        for name in (CHEXMASK_IMAGE, *CHEXMASK_FILES.values()):
            started.upload_input(chexmask_example / name)
        yield started, FLAGS[flag]
    finally:
        if started is not comfy_server:
            started.stop()


def test_gated_layers_run_on_the_backend_of_the_flag(server, tiny_checkpoint: Path) -> None:
    srv, backend = server
    before = len(srv.log_text())
    result = srv.run(graph(tiny_checkpoint.name, srv.object_info()))
    log = srv.log_text()[before:]
    for node in (HARD, SOFT):
        (path,) = result.files(node, "latents")
        assert torch.isfinite(load_file(str(path))["latent_tensor"]).all()
    assert f"hard gating runs on {backend}\n" in log, log
    warning = f"the attention backend {backend} gives no log-sum-exp"
    if backend == "attention_pytorch":  # torch's fused kernels give soft gating its log-sum-exp
        assert f"soft gating runs on {backend}\n" in log and "log-sum-exp" not in log, log
    else:  # no log-sum-exp: the exact fallback, said once for the run
        assert f"soft gating runs on {backend} (no log-sum-exp: fallback)\n" in log, log
        assert log.count(warning) == 1, log
