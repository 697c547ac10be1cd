"""Stock vs hard-gated vs soft-gated self-attention, with the real organ partition of a radiograph.

    python benchmarks/attention.py [--repeats 5] [--device cpu|cuda] [--quick]

Cases: N = 1024, 4096, 16384 tokens (grids 32², 64², 128²), batch 2, 8 heads, head dim 40 and 80, regions
from ``cxr/chexmask-example`` (background ≈ 48 %, lungs ≈ 21 % + 19 %, heart ≈ 12 %). "Stock" is torch SDPA
without a mask, the strongest baseline; ComfyUI's default attention backend is printed too when ComfyUI
is found. Times are medians of ``--repeats`` runs, interleaved case by case in one process; memory is
measured per case in a fresh subprocess (peak RSS growth over the call on CPU, Linux, ``max_memory_allocated`` on CUDA).
Prints one line per case: ``case=... n=... d=... ratio_vs_stock=... floor=... extra_mem_mb=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the folder holding the pack, importable as cxr_counterfactual
if not (HERE.parent.parent / "cxr_counterfactual").exists():
    import tempfile

    _link = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
    _link.symlink_to(HERE.parent, target_is_directory=True)
    sys.path.insert(0, str(_link.parent))

from cxr_counterfactual.attention.gating import gated_self_attention  # noqa: E402
from cxr_counterfactual.attention.organs import OrganMasks  # noqa: E402
from cxr_counterfactual.attention.regions import partition  # noqa: E402
from cxr_counterfactual.imaging.mask_files import read_mask_image  # noqa: E402
from cxr_counterfactual.runner.comfyui_path import find_comfyui  # noqa: E402
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402

GRIDS = {1024: (32, 32), 4096: (64, 64), 16384: (128, 128)}
ORGANS = ("right_lung", "left_lung", "heart")


def example_masks() -> OrganMasks:
    """The CheXmask example's organ masks stretched to a square field of view (fractions unchanged), for the
    benchmarks' square grids."""
    folder = test_data_dir() / "cxr" / "chexmask-example"
    masks = OrganMasks.from_dict({
        "right_lung": read_mask_image(folder / "RL_mask.png"),
        "left_lung": read_mask_image(folder / "LL_mask.png"),
        "heart": read_mask_image(folder / "H_mask.png"),
    })
    return OrganMasks(masks.names, F.interpolate(masks.data[None], size=(512, 512), mode="area")[0])


def example_partition(n: int):
    return partition(example_masks(), ORGANS, *GRIDS[n])


def make_case(case: str, n: int, d: int, device: str):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, n, d, generator=g).to(device) for _ in range(3))
    part = example_partition(n).to(torch.device(device))
    if case == "stock":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if case == "hard":
        return lambda: gated_self_attention(q, k, v, part, 0.0, "confined")
    if case == "soft":
        return lambda: gated_self_attention(q, k, v, part, 0.3, "confined")
    if case == "comfy_default":
        import comfy.ldm.modules.attention as attention

        flat = [rearrange(t, "b heads n d -> b n (heads d)") for t in (q, k, v)]  # ComfyUI's [B, N, heads·d]
        return lambda: attention.optimized_attention(*flat, 8)
    raise ValueError(case)


def _import_comfy():
    """ComfyUI's attention module, imported on the CPU (for the 'comfy_default' reference case)."""
    path = find_comfyui()
    if path is None:
        raise SystemExit("ComfyUI not found (set COMFYUI_PATH)")
    sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.modules.attention as attention

    return attention


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(case: str, n: int, d: int, device: str) -> float:
    """Extra peak memory of one call, in MiB, measured in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", case, str(n), str(d), "--device", device],
        capture_output=True, text=True, check=True, env={**os.environ},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_probe(case: str, n: int, d: int, device: str) -> None:
    if case == "comfy_default":
        _import_comfy()

    fn = make_case(case, n, d, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        # Reset the process's peak RSS (Linux: clear_refs 5) so the peak is this call's, not the imports'.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        fn()
        extra = (_status_kb("VmHWM") - before) / 1024
    print(json.dumps({"extra_mb": round(extra, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="N = 1024 and 4096 only")
    parser.add_argument("--comfy-max-n", type=int, default=4096,
                        help="run ComfyUI's default backend (a slow reference, ~35 s a call at 16384 on 1 CPU core) "
                        "only up to this N")
    parser.add_argument("--memory-probe", nargs=3, metavar=("CASE", "N", "D"))
    args = parser.parse_args()
    if args.memory_probe:
        case, n, d = args.memory_probe
        memory_probe(case, int(n), int(d), args.device)
        return
    cases = ["stock", "hard", "soft"]
    if find_comfyui() is not None and args.device == "cpu":
        attention = _import_comfy()
        cases.append("comfy_default")
        print(f"# ComfyUI default attention backend: {attention.optimized_attention.__name__}")
    print(f"# device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384]
    for n in sizes:
        part = example_partition(n)
        floor = sum(c * c for c in part.counts) / n**2
        for d in (40, 80):
            fns = {c: make_case(c, n, d, args.device) for c in cases if c != "comfy_default" or n <= args.comfy_max_n}
            times: dict[str, list[float]] = {c: [] for c in fns}
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for c, fn in fns.items():
                    _sync(args.device)
                    t = time.perf_counter()
                    fn()
                    _sync(args.device)
                    times[c].append(time.perf_counter() - t)
            stock = statistics.median(times["stock"])
            for c in fns:
                ratio = statistics.median(times[c]) / stock
                mem = measure_memory(c, n, d, args.device)
                print(f"case={c} n={n} d={d} device={args.device} ratio_vs_stock={ratio:.3f} floor={floor:.3f} "
                      f"median_ms={1000 * statistics.median(times[c]):.1f} extra_mem_mb={mem:.1f}", flush=True)


if __name__ == "__main__":
    main()
