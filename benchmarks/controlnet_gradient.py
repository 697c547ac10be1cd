"""The refinement's gradient pass with a ControlNet: its residuals as constants vs differentiated through clones.

    python benchmarks/controlnet_gradient.py [--px 128 256] [--repeats 5]

The tiny SD1.5 checkpoint with the anatomy gate, the tiny random-weight ControlNet (``testing/tiny_controlnet.py``)
applied by ComfyUI's Apply ControlNet to both prompts with the real radiograph (CheXmask example, fitted) as the hint,
the refinement at grid factor 2; the pass is measured at the first step (sigma_max) inside a real SamplerCustom run.
Per size it prints the cosine between the two latent gradients and, per way: the median wall and CPU time (all
threads; less sensitive to other load on the machine) of one energy+gradient pass (``--repeats``), the weight clones
it needs beyond the UNet's path weights, what autograd saves for backward, and
the peak RSS growth of one pass in a fresh process (memory freed earlier in a process stays resident and would hide
it). ``path=`` is the UNet path-weight clones both ways share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from sampling import REFINE, gated, load_host, node, prepare, radiograph, run_v3

MODES = ("constant", "differentiate")
GRID = "2"


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(px: int, repeats: int, fresh_mode: str | None = None) -> dict:
    """Run one SamplerCustom whose sampler function measures the gradient pass at its first step."""
    nodes, ckpt = load_host()
    import comfy.controlnet
    import comfy.model_management
    import comfy.samplers
    import comfy.utils
    import torch

    from cxr_counterfactual.hosts.comfy.refinement_energy import (
        control_parameters,
        energy_function,
        energy_layers,
        path_parameters,
    )
    from cxr_counterfactual.testing.tiny_controlnet import ensure_tiny_controlnet

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, masks, latent, positive, negative, tokens = prepare(nodes, ckpt, px)
    with torch.inference_mode():
        image = run_v3(nodes, "CXRFitToModel", image=radiograph(), max_side=px, organ_masks=None,
                       geometry=None)[0]
        net = comfy.controlnet.load_controlnet(str(ensure_tiny_controlnet(ckpt.parent)))
        positive, negative = node(nodes, "ControlNetApplyAdvanced")().apply_controlnet(positive, negative, net, image,
                                                                                      1.0, 0.0, 1.0)
        model = gated(nodes, model, masks, tokens)
        sigmas = node(nodes, "BasicScheduler")().get_sigmas(model, "normal", 4, 1.0)[0]
    ref = run_v3(nodes, "CXRRefinementSampler", tokens=tokens, organ_masks=masks, grid_factor=GRID, **REFINE)[0]
    ref = ref.sampler_function.refinement
    out: dict = {}

    def gradient(energy, x):
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(energy(xg).sum(), xg)
        return g

    def bench(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        dm = model_k.inner_model.inner_model.diffusion_model
        path = path_parameters(dm, energy_layers(dm, tuple(x.shape[-2:]), ref.grid_factor)[0])
        out["path_mb"] = sum(p.numel() * p.element_size() for p in path.values()) / 2**20

        def clones(mode):
            return control_parameters(model_k) if mode == "differentiate" else {}

        def one_pass(mode):
            params = {**path, **clones(mode)}
            return gradient(energy_function(ref, model_k, sigmas[0], extra_args, params, mode), x)

        if fresh_mode is not None:  # peak RSS growth of one pass, this process otherwise idle
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
                f.write("5")
            one_pass(fresh_mode)
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            out["peak_growth_mb"] = (peak - rss) / 1024
            return x
        grads = {m: one_pass(m) for m in MODES}  # also the warm-up
        a, b = (grads[m].flatten().double() for m in MODES)
        out["cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        out["identical"] = bool(torch.equal(grads["constant"], grads["differentiate"]))
        times: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(repeats):  # interleaved, so drifting load on the machine hits both ways alike
            for mode in MODES:
                t, p = time.perf_counter(), time.process_time()
                one_pass(mode)
                times[mode].append(time.perf_counter() - t)
                cpu[mode].append(time.process_time() - p)
        for mode in MODES:
            c = clones(mode)
            out[mode] = {"median_s": statistics.median(times[mode]), "median_cpu_s": statistics.median(cpu[mode]),
                         "clones_mb": sum(p.numel() * p.element_size() for p in c.values()) / 2**20,
                         "saved_for_backward_mb": _saved_bytes(lambda m=mode: one_pass(m)) / 2**20}
        return x

    comfy.model_management.load_models_gpu([model])
    with torch.inference_mode():
        node(nodes, "SamplerCustom")().sample(model, True, 7, 5.0, positive, negative,
                                             comfy.samplers.KSAMPLER(bench), sigmas, latent)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--px", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fresh", nargs=2, metavar=("PX", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fresh:
        print(json.dumps(measure(int(args.fresh[0]), 0, args.fresh[1])))
        return
    for px in args.px:
        r = measure(px, args.repeats)
        print(f"px={px} grid_factor={GRID} cosine={r['cosine']:.9f} identical={r['identical']} "
              f"path_mb={r['path_mb']:.0f}", flush=True)
        for mode in MODES:
            fresh = subprocess.run([sys.executable, __file__, "--fresh", str(px), mode], capture_output=True,
                                   text=True, check=True)
            peak = json.loads(fresh.stdout.strip().splitlines()[-1])["peak_growth_mb"]
            m = r[mode]
            print(f"  control={mode} median_s={m['median_s']:.3f} median_cpu_s={m['median_cpu_s']:.3f} "
                  f"clones_mb={m['clones_mb']:.0f} "
                  f"saved_for_backward_mb={m['saved_for_backward_mb']:.0f} peak_rss_growth_mb={peak:.0f}", flush=True)


if __name__ == "__main__":
    main()
