"""Stock vs regulated sampling of the same graph in ComfyUI, back to back in one process.

    python benchmarks/sampling.py [--repeats 5] [--steps 4] [--quick]

Models: the tiny random-weight SD1.5-shaped checkpoint at 256 and 512 px, and a full-size SD1.5
random-weight UNet (with the tiny checkpoint's full-size CLIP-L) at 256 px. Same seed, same prompt, same
ComfyUI attention backend flags (the defaults) for every case; the radiograph and organ masks are
``cxr/chexmask-example``. Each case's time is the median of ``--repeats`` runs, interleaved with the stock
runs; memory is the peak RSS growth during a run (sampled every 5 ms) minus stock's. Prints
``case=... model=... px=... ratio_vs_stock=... extra_mem_mb=...`` per case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_LINK = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
_LINK.symlink_to(HERE.parent, target_is_directory=True)
sys.path.insert(0, str(_LINK.parent))

from cxr_counterfactual.testing.paths import require_comfyui, test_data_dir  # noqa: E402
from cxr_counterfactual.testing.tiny_checkpoint import (  # noqa: E402
    ensure_tiny_checkpoint,
    prepare_comfy_import,
    random_unet_model,
)

PROMPT = "chest x-ray, left lung with large pleural effusion, normal heart"


class PeakRss:
    """Peak resident memory while the block runs (a 5 ms polling thread)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth_mb = (self.peak - self.start) / 2**20


def load_host():
    prepare_comfy_import(require_comfyui())
    import asyncio

    import folder_paths
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    import os

    cwd = os.getcwd()
    os.chdir(_LINK.parent)
    try:
        asyncio.run(nodes.load_custom_node("cxr_counterfactual"))
    finally:
        os.chdir(cwd)
    cache = Path(tempfile.gettempdir()) / "cxr-bench-cache"
    ckpt = ensure_tiny_checkpoint(cache)
    folder_paths.add_model_folder_path("checkpoints", str(cache))
    return nodes, ckpt


def node(nodes, name):
    return nodes.NODE_CLASS_MAPPINGS[name]


def run_v3(nodes, name, **inputs):
    return node(nodes, name).PREPARE_CLASS_CLONE({}).execute(**inputs).result


def prepare(nodes, ckpt, px: int):
    import numpy as np
    import torch
    from PIL import Image

    from cxr_counterfactual.attention.organs import OrganMasks
    from cxr_counterfactual.imaging.mask_files import read_mask_image

    folder = test_data_dir() / "cxr" / "chexmask-example"
    with torch.inference_mode():
        model, clip, vae = node(nodes, "CheckpointLoaderSimple")().load_checkpoint(ckpt.name)[:3]
        image = torch.from_numpy(np.asarray(Image.open(folder / "utils_example1.jpg").convert("RGB"),
                                            dtype=np.float32) / 255.0)[None]
        masks = OrganMasks.from_dict({n: read_mask_image(folder / f) for n, f in
                                      (("right_lung", "RL_mask.png"), ("left_lung", "LL_mask.png"),
                                       ("heart", "H_mask.png"))})
        fitted, fitted_masks, _ = run_v3(nodes, "CXRFitToModel", image=image, max_side=px, organ_masks=masks)
        latent = node(nodes, "VAEEncode")().encode(vae, fitted)[0]
        positive, tokens = run_v3(nodes, "CXRTextEncode", clip=clip, text=PROMPT, anatomy="left lung, heart",
                                  pathology="effusion")
        negative = node(nodes, "CLIPTextEncode")().encode(clip, "")[0]
    return model, fitted_masks, latent, positive, negative, tokens


def gated(nodes, model, masks, tokens):
    return run_v3(nodes, "CXRAnatomyAttentionGate", model=model, organ_masks=masks, tokens=tokens, strength=1.0,
                  token_strength=1.0, organs="right_lung, left_lung, heart", background="confined",
                  margin_px=0, blocks="all", start_percent=0.0, end_percent=1.0, apply_to_uncond=True)[0]


def bench(nodes, label, px, models: dict, latent, positive, negative, steps, repeats):
    import torch

    def sample(model):
        with torch.inference_mode():
            node(nodes, "KSampler")().sample(model, 7, steps, 7.0, "euler", "normal", positive, negative, latent)

    times = {c: [] for c in models}
    mems = {c: [] for c in models}
    for m in models.values():
        sample(m)  # warm-up (loads weights, builds region caches)
    for _ in range(repeats):
        for case, m in models.items():
            with PeakRss() as rss:
                t = time.perf_counter()
                sample(m)
                times[case].append(time.perf_counter() - t)
            mems[case].append(rss.growth_mb)
    stock_t, stock_m = statistics.median(times["stock"]), statistics.median(mems["stock"])
    for case in models:
        ratio = statistics.median(times[case]) / stock_t
        extra = statistics.median(mems[case]) - stock_m
        print(f"case={case} model={label} px={px} steps={steps} ratio_vs_stock={ratio:.3f} "
              f"median_s={statistics.median(times[case]):.2f} extra_mem_mb={extra:.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny model at 256 px only")
    args = parser.parse_args()
    nodes, ckpt = load_host()
    import comfy.ldm.modules.attention as attention
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # keep the output to the result lines

    print(f"# ComfyUI attention backend: {attention.optimized_attention.__name__}; threads={torch.get_num_threads()}")
    for px in (256,) if args.quick else (256, 512):
        model, masks, latent, pos, neg, tokens = prepare(nodes, ckpt, px)
        bench(nodes, "tiny", px, {"stock": model, "gated": gated(nodes, model, masks, tokens)}, latent, pos, neg,
              args.steps, args.repeats)
    if not args.quick:
        model, masks, latent, pos, neg, tokens = prepare(nodes, ckpt, 256)
        full = random_unet_model()
        bench(nodes, "sd15-full", 256, {"stock": full, "gated": gated(nodes, full, masks, tokens)}, latent, pos,
              neg, args.steps, args.repeats)


if __name__ == "__main__":
    main()
