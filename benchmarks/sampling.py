"""Stock vs regulated sampling of the same graph in ComfyUI, back to back in one process.

    python benchmarks/sampling.py [--repeats 5] [--steps 4] [--quick] [--dit]

Models: the tiny random-weight SD1.5-shaped checkpoint at 256 and 512 px, and a full-size SD1.5 random-weight UNet
(with the tiny checkpoint's full-size CLIP-L) at 256 px. ``--dit``: the tiny SD3.5-family checkpoint (two MMDiT-X
blocks, ``testing/tiny_models.py`` recipe ``sd35``) at 128 and 256 px (64 and 224 image tokens: its position table
covers latents up to 32×32), stock vs gated / boosted / captured joint attention through the same nodes
(``benchmarks/joint_attention.py`` times one joint call at 1024 and 4096 image tokens). Same seed, same prompt, same
ComfyUI attention backend flags (the defaults) for every case; the radiograph and organ masks are
``cxr/chexmask-example``. Each case's time is the median of ``--repeats`` runs, interleaved with the stock runs;
memory is the peak RSS growth during a run (sampled every 5 ms) minus stock's, except for the refined cases: their
peak RSS is measured in fresh processes (one sampling run each, stock Euler vs refinement), because memory freed by
earlier runs stays resident and would hide the refinement's weight copies. Prints ``case=... model=... px=...
ratio_vs_stock=... extra_mem_mb=...`` per case (refined: ``extra_mem_pct=`` too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_LINK = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
_LINK.symlink_to(HERE.parent, target_is_directory=True)
sys.path.insert(0, str(_LINK.parent))

from cxr_counterfactual.demo.tiny_checkpoint import ensure_tiny_checkpoint, random_unet_model  # noqa: E402
from cxr_counterfactual.hosts.comfy.standalone import prepare_comfy_import  # noqa: E402
from cxr_counterfactual.runner.comfyui_path import require_comfyui  # noqa: E402
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402

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


def radiograph():
    """The CheXmask example radiograph (IMAGE ``[1, H, W, 3]``)."""
    import numpy as np
    import torch
    from PIL import Image

    path = test_data_dir() / "cxr" / "chexmask-example" / "utils_example1.jpg"
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)[None]


def prepare(nodes, ckpt, px: int):
    import torch

    from cxr_counterfactual.attention.organs import OrganMasks
    from cxr_counterfactual.imaging.mask_files import read_mask_image

    folder = test_data_dir() / "cxr" / "chexmask-example"
    with torch.inference_mode():
        model, clip, vae = node(nodes, "CheckpointLoaderSimple")().load_checkpoint(ckpt.name)[:3]
        image = radiograph()
        masks = OrganMasks.from_dict({n: read_mask_image(folder / f) for n, f in
                                      (("right_lung", "RL_mask.png"), ("left_lung", "LL_mask.png"),
                                       ("heart", "H_mask.png"))})
        fitted, fitted_masks, _ = run_v3(nodes, "CXRFitToModel", image=image, max_side=px, organ_masks=masks)
        latent = node(nodes, "VAEEncode")().encode(vae, fitted)[0]
        positive, tokens = run_v3(nodes, "CXRTextEncode", clip=clip, text=PROMPT, anatomy="left lung, heart",
                                  pathology="effusion")
        negative = node(nodes, "CLIPTextEncode")().encode(clip, "")[0]
    return model, fitted_masks, latent, positive, negative, tokens


def with_controlnet(nodes, ckpt, px: int, positive, negative):
    """Both prompts with the tiny random-weight ControlNet (testing/tiny_controlnet.py) applied by Apply ControlNet,
    the fitted radiograph as its hint."""
    import comfy.controlnet
    import torch

    from cxr_counterfactual.testing.tiny_controlnet import ensure_tiny_controlnet

    with torch.inference_mode():
        image = run_v3(nodes, "CXRFitToModel", image=radiograph(), max_side=px, organ_masks=None, geometry=None)[0]
        net = comfy.controlnet.load_controlnet(str(ensure_tiny_controlnet(ckpt.parent)))
        return node(nodes, "ControlNetApplyAdvanced")().apply_controlnet(positive, negative, net, image, 1.0, 0.0, 1.0)


def gated(nodes, model, masks, tokens):
    return run_v3(nodes, "CXRAnatomyAttentionGate", model=model, organ_masks=masks, tokens=tokens, strength=1.0,
                  token_strength=1.0, organs="right_lung, left_lung, heart", background="confined",
                  margin_px=0, blocks="all", start_percent=0.0, end_percent=1.0, apply_to_uncond=True)[0]


def boosted(nodes, model, masks, tokens):
    return run_v3(nodes, "CXRPathologyBoost", model=model, tokens=tokens, organ_masks=masks, target_organs="left_lung",
                  factor=3.0, words="", outside_damping=1.0, blocks="all", start_percent=0.0, end_percent=0.4)[0]


def captured(nodes, model, masks, tokens):
    return run_v3(nodes, "CXRCaptureAttention", model=model, tokens=tokens, label="bench", grid_factor="2",
                  organ_masks=masks, target_organs="left_lung", start_percent=0.0, end_percent=1.0)[0]


def cases(nodes, model, masks, tokens) -> dict:
    """stock, and each stage alone on the same model (the targets are per stage)."""
    return {
        "stock": model,
        "gated": gated(nodes, model, masks, tokens),
        "boosted": boosted(nodes, model, masks, tokens),
        "captured": captured(nodes, model, masks, tokens),
    }


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


# Refined cases (CXR Refinement Sampler vs plain Euler through SamplerCustom, same sigmas and noise).
# Fixed settings: 1 iteration per step over the first half of the noise range (A&E's released code updates once per
# step for the first 25 of 50 steps: config.py max_iter_to_alter), step 0.1.
REFINE = dict(target_organs="left_lung", iterations=1, step_size=0.1, start_percent=0.0, end_percent=0.5,
              thresholds="", smoothing=0.5, extent_weight=0.0, extent_threshold=0.5)


def bench_refined(nodes, label, px, model, masks, tokens, latent, positive, negative, steps, repeats,
                  grid_factor: str, sampler_name: str = "euler", control: str = "") -> None:
    """``case=refined-gN``: time and peak-RSS ratio of the refinement sampler vs SamplerCustom + the same stock
    sampler (``sampler_name``; other than euler the cases are ``refined-<name>-gN`` vs ``stock-<name>``, time only;
    ``control`` names the conditioning's ControlNet in the label)."""
    import torch

    with torch.inference_mode():
        sigmas = node(nodes, "BasicScheduler")().get_sigmas(model, "normal", steps, 1.0)[0]
    stock = node(nodes, "KSamplerSelect")().get_sampler(sampler_name)[0]
    name = "" if sampler_name == "euler" else f"{sampler_name}-"
    refined_case, stock_case = f"refined-{name}g{grid_factor}", f"stock-{sampler_name}"
    samplers = {
        stock_case: stock,
        refined_case: run_v3(nodes, "CXRRefinementSampler", tokens=tokens, organ_masks=masks, grid_factor=grid_factor,
                             sampler=None if sampler_name == "euler" else stock, **REFINE)[0],
    }

    def sample(sampler):
        with torch.inference_mode():
            node(nodes, "SamplerCustom")().sample(model, True, 7, 7.0, positive, negative, sampler, sigmas, latent)

    times = {c: [] for c in samplers}
    mems = {c: [] for c in samplers}
    for s in samplers.values():
        sample(s)  # warm-up
    for _ in range(repeats):
        for case, s in samplers.items():
            with PeakRss() as rss:
                t = time.perf_counter()
                sample(s)
                times[case].append(time.perf_counter() - t)
            mems[case].append(rss.growth_mb)
    stock_t = statistics.median(times[stock_case])
    refined = samplers[refined_case].sampler_function.store.latest()
    copied = refined.weights_copied_mb
    gain = [f"{st.before:.3f}->{st.after:.3f}" for st in refined.refine or []]
    # Peak memory from fresh processes: in this one, memory freed by earlier runs stays resident (glibc keeps
    # freed chunks below its mmap threshold), which hides the weight copies in any later run's RSS growth.
    peaks = ({case: peak_in_fresh_process(label, px, steps, case) for case in samplers}
             if sampler_name == "euler" and not control else {})
    model_label = f"{label}+{control}" if control else label
    for case in samplers:
        ratio = statistics.median(times[case]) / stock_t
        tail = f" weights_copied_mb={copied:.0f} energies={','.join(gain)}" if case == refined_case else ""
        if peaks:
            extra = peaks[case] - peaks[stock_case]
            tail = (f" extra_mem_mb={extra:.0f} extra_mem_pct={100 * extra / peaks[stock_case]:.1f}{tail}"
                    if case == refined_case else f" peak_mem_mb={peaks[case]:.0f}")
        print(f"case={case} model={model_label} px={px} steps={steps} ratio_vs_stock={ratio:.3f} "
              f"median_s={statistics.median(times[case]):.2f}{tail}", flush=True)


def peak_in_fresh_process(label: str, px: int, steps: int, case: str) -> float:
    """Peak RSS (MiB, ``VmHWM``) of a fresh process that loads the model and samples once with ``case``."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", label, str(px), str(steps), case],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def memory_probe(label: str, px: int, steps: int, case: str) -> None:
    """One sampling run in this (fresh) process, weights already resident; prints the run's peak RSS as JSON."""
    import torch

    nodes, ckpt = load_host()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, masks, latent, positive, negative, tokens = prepare(nodes, ckpt, px)
    if label == "sd15-full":
        model = random_unet_model()
    with torch.inference_mode():
        sigmas = node(nodes, "BasicScheduler")().get_sigmas(model, "normal", steps, 1.0)[0]
    sampler = (node(nodes, "KSamplerSelect")().get_sampler("euler")[0] if case == "stock-euler" else
               run_v3(nodes, "CXRRefinementSampler", tokens=tokens, organ_masks=masks,
                      grid_factor=case.removeprefix("refined-g"), **REFINE)[0])
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # weights resident first: loading peaks higher than sampling
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    with torch.inference_mode():
        node(nodes, "SamplerCustom")().sample(model, True, 7, 7.0, positive, negative, sampler, sigmas, latent)
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mb": peak_kb / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny model at 256 px only")
    parser.add_argument("--refined-only", action="store_true", help="only the refinement sampler's cases")
    parser.add_argument("--dit", action="store_true", help="the tiny SD3.5-family DiT only")
    parser.add_argument("--memory-probe", nargs=4, metavar=("MODEL", "PX", "STEPS", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        label, px, steps, case = args.memory_probe
        memory_probe(label, int(px), int(steps), case)
        return
    nodes, ckpt = load_host()
    import comfy.ldm.modules.attention as attention
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # keep the output to the result lines

    print(f"# ComfyUI attention backend: {attention.optimized_attention.__name__}; threads={torch.get_num_threads()}")
    if args.dit:
        from cxr_counterfactual.testing.tiny_models import ensure_tiny_model_checkpoint

        dit = ensure_tiny_model_checkpoint("sd35", ckpt.parent)
        for px in (128,) if args.quick else (128, 256):
            model, masks, latent, pos, neg, tokens = prepare(nodes, dit, px)
            bench(nodes, "tiny-sd35", px, cases(nodes, model, masks, tokens), latent, pos, neg, args.steps,
                  args.repeats)
        return
    for px in (256,) if args.quick else (256, 512):
        model, masks, latent, pos, neg, tokens = prepare(nodes, ckpt, px)
        if not args.refined_only:
            bench(nodes, "tiny", px, cases(nodes, model, masks, tokens), latent, pos, neg, args.steps, args.repeats)
        bench_refined(nodes, "tiny", px, model, masks, tokens, latent, pos, neg, args.steps, args.repeats, "2")
        for name in ("dpmpp_2m", "dpmpp_2m_sde"):  # a multistep and an SDE sampler (the refined step restarts both)
            bench_refined(nodes, "tiny", px, model, masks, tokens, latent, pos, neg, args.steps, args.repeats, "2",
                          name)
        cpos, cneg = with_controlnet(nodes, ckpt, px, pos, neg)
        bench_refined(nodes, "tiny", px, model, masks, tokens, latent, cpos, cneg, args.steps, args.repeats, "2",
                      control="controlnet")
    if not args.quick:
        model, masks, latent, pos, neg, tokens = prepare(nodes, ckpt, 256)
        full = random_unet_model()
        if not args.refined_only:
            bench(nodes, "sd15-full", 256, cases(nodes, full, masks, tokens), latent, pos, neg, args.steps,
                  args.repeats)
        for gf in ("2", "4"):
            bench_refined(nodes, "sd15-full", 256, full, masks, tokens, latent, pos, neg, args.steps, args.repeats, gf)


if __name__ == "__main__":
    main()
