"""One GPU check of the pack, in-process (no server): prints one table and writes one JSON file.

    python benchmarks/gpu.py [--device cuda|cpu] [--quick] [--json gpu-check.json] [--budget-s 230]
                             [--sections soft_gating,hard_isolation,...]

Sections (run cheap first, in the order of ``SECTIONS``; each guarded: a failing one records its error and the
script goes on; past ``--budget-s`` the rest are skipped with a note):

- ``soft_gating``: soft gating (leak 0.3) at 4096 tokens (the CheXmask example's organ partition, batch 2, 8 heads,
  head dim 40, the model's dtype: float16 on CUDA) against the dense-mask reference in float32 (max error) and
  against stock SDPA (time ratio; hard gating's ratio too), and the fused log-sum-exp against the exact one.
- ``hard_isolation``: hard gating in float16 and bfloat16: a region's outputs do not change when every other
  region's queries, keys and values do (exactly 0).
- ``joint_attention``: a diffusion transformer's joint call at 4096 image tokens with SD3.5's and Flux's text
  lengths: stock vs hard / hard + boosted / soft (``benchmarks/joint_attention.py``); check: hard within the UNet's
  hard-gating ratio plus the text part's share.
- ``sampling_sd15``: stock vs gated vs gated + boosted vs refined sampling (SamplerCustom, euler, same sigmas and
  noise) of a full-size random-weight SD1.5 UNet (ComfyUI's SD15 layout, built in-process: no file) at 512 px in the
  dtype ComfyUI picks (float16 on CUDA): time ratio and peak memory (``torch.cuda.max_memory_allocated``).
- ``sampling_sdxl``: the same on the SDXL-family test model (``testing/tiny_models.py`` "sdxl") at 1024 px.
- ``novram``: a fresh process with ComfyUI's ``--novram`` (set before ``comfy.model_management`` is imported) samples
  gated + boosted and runs one refinement step; on CUDA it asserts the model was loaded in low-VRAM mode.
- ``fp8``: the UNet stored in float8_e4m3fn (UNETLoader's ``fp8_e4m3fn``) and with ``fp8_e4m3fn_fast``: gated +
  boosted sampling and one refinement step; records success or the refusal's message.
- ``core_tests``: the core tests parametrised over devices (``tests/conftest.py`` ``DEVICES``), run by pytest in a
  subprocess for this device only.

Targets (issue 21; ratios within one run): gated + boosted ≤ 1.05× stock at 512 px SD1.5 float16; soft gating ≤ 1.3×
stock attention at 4096 tokens; refinement ≤ 1.5× time and ≤ +25 % peak memory. ``--device cpu --quick`` is the CI
smoke test (tiny sizes, the SD1.5-shaped tiny checkpoint at 64 px, no SDXL): it checks the script, not the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

_LINK = Path(tempfile.mkdtemp(prefix="cxr-gpu-")) / "cxr_counterfactual"
_LINK.symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
sys.path.insert(0, str(_LINK.parent))

from cxr_counterfactual.benchmarks.gpu_harness import TARGETS, Context, Skip, import_comfy  # noqa: E402
from cxr_counterfactual.benchmarks.gpu_sections import SECTION_FUNCTIONS, novram_probe  # noqa: E402

#: In the order they run: the cheap ones first, the SDXL-family model's 1 GB build last (the budget skips what is left).
SECTIONS = ("soft_gating", "hard_isolation", "joint_attention", "core_tests", "sampling_sd15", "novram", "fp8",
            "sampling_sdxl")


def run_sections(ctx: Context, names: list[str],
                 fns: dict[str, Callable[[Context], dict]] = SECTION_FUNCTIONS) -> dict:
    """Each section in turn, guarded: its result, ``skipped`` with a reason (it does not apply, or the time budget
    is used up) or ``failed`` with the error; a ``checks`` entry that is false makes it ``check failed``."""
    results: dict = {}
    for name in names:
        if ctx.left() <= 0:
            results[name] = {"status": "skipped", "reason": f"time budget of {ctx.args.budget_s:g} s used up"}
            continue
        t = time.perf_counter()
        try:
            res = fns[name](ctx)
            checks = res.get("checks", {})
            res["status"] = "ok" if all(checks.values()) else "check failed"
        except Skip as why:
            res = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # a section's failure is recorded; the others still run
            res = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-4000:]}
        res["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = res
        print(f"# {name}: {res['status']} ({res['seconds']} s)", file=sys.stderr, flush=True)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    return results


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(results: dict) -> str:
    """One row per figure: section, figure, value, target (where the issue sets one)."""
    rows = [("section", "figure", "value", "target")]
    for name, res in results.items():
        targets = res.get("targets", {})
        if res["status"] in ("skipped", "failed"):
            rows.append((name, res["status"], res.get("reason") or res.get("error", "")[:100], ""))
            continue
        for key, value in res.items():
            if key in ("targets", "traceback", "output_tail", "status", "command"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    rows.append((name, f"{key}.{sub}", _fmt(v), ""))
            else:
                target = targets.get(key)
                rows.append((name, key, _fmt(value), "" if target is None else f"<= {target:g}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test on a CPU)")
    parser.add_argument("--json", default="gpu-check.json", help="where to write the results (default %(default)s)")
    parser.add_argument("--budget-s", type=float, default=230.0,
                        help="sections not started within this many seconds are skipped (default %(default)s)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in this order")
    parser.add_argument("--sdxl-px", type=int, default=0, help="run the SDXL section at this size (also with --quick)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cxr-bench-cache"),
                        help="folder of the built test checkpoints (reused when present)")
    parser.add_argument("--novram-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    if args.novram_probe:
        novram_probe(args)
        return 0
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    ctx = Context(args)
    ctx.nodes = import_comfy(args.device)
    results = run_sections(ctx, names)
    report = {
        "device": args.device, "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "threads": torch.get_num_threads(), "budget_s": args.budget_s,
        "elapsed_s": round(time.perf_counter() - ctx.start, 1), "targets": TARGETS, "sections": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=1, default=str, allow_nan=True), encoding="utf-8")
    print(f"# device={args.device} quick={args.quick} torch={torch.__version__} gpu={report['gpu']} "
          f"elapsed={report['elapsed_s']} s json={args.json}")
    print(table(results))
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
