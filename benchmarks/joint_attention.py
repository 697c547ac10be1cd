"""Stock vs gated vs gated + boosted joint (text + image) attention of a diffusion transformer (issue 24).

    python benchmarks/joint_attention.py [--repeats 5] [--device cpu|cuda] [--json out.json] [--quick]

One joint call as SD3.5's MMDiT and Flux make it (text first, then the image's patch tokens), heads and head dim of
SD3.5 Medium (24 × 64), batch 1, float32. Image tokens 1024 (32×32 patch grid, a 64×64 latent) and 4096 (64×64,
128×128 latent); text 154 (SD3.5: 77 CLIP + 77 T5) and 512 (Flux dev: T5 only). Regions: the CheXmask example's
lungs and heart (``benchmarks/attention.py``'s masks) partitioned at the patch grid (:func:`.patch_grid.patch_fit`).

Cases, one process, interleaved, medians of ``--repeats`` after a warm-up:

- ``stock``: one SDPA over the whole sequence (what the model runs);
- ``hard``: :func:`.joint.joint_attention` with leak 0, text unbiased (one call per region over text + own keys);
- ``hard_boosted``: leak 0 plus the text bias (anatomy words hidden outside their organ, a pathology word
  boosted ×3 inside the right lung and damped ×0.5 outside): the log-sum-exp route;
- ``soft``: leak 0.5, text unbiased;
- ``image_stock`` / ``image_hard``: the UNet's case, image tokens alone: SDPA, and ``gated_self_attention`` leak 0;
- ``text_rows`` / ``image_to_text``: the pieces of the stock call the image gate does not shrink: text queries
  over every key, and image queries over the text keys.

Per size: ``unet_hard_ratio = image_hard / image_stock`` and ``text_share = (text_rows + image_to_text) / stock``
(measured; ``text_share_flops`` is the same share counted in score entries, ``(T·(T+N) + N·T) / (T+N)²``). The
claim checked: ``hard / stock ≤ unet_hard_ratio + text_share`` (``claim_holds``): the image → image part costs at
most what the UNet's hard gate costs, and the text part costs what it costs in stock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the folder holding the pack, importable as cxr_counterfactual
if not (HERE.parent.parent / "cxr_counterfactual").exists():  # a checkout under another name: link it
    import tempfile

    _link = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
    _link.symlink_to(HERE.parent, target_is_directory=True)
    sys.path.insert(0, str(_link.parent))

from cxr_counterfactual.attention.boosting import pathology_boost_bias  # noqa: E402
from cxr_counterfactual.attention.gating import anatomy_token_bias, gated_self_attention  # noqa: E402
from cxr_counterfactual.attention.joint import JointGate, JointLayout, joint_attention  # noqa: E402
from cxr_counterfactual.attention.patch_grid import patch_fit  # noqa: E402
from cxr_counterfactual.attention.regions import coverage, partition  # noqa: E402
from cxr_counterfactual.benchmarks.attention import ORGANS, example_masks  # noqa: E402

PATCH = 2  # SD3/SD3.5's MMDiT and Flux
#: Text encoders' chunks per family: (name, token count), in the context's order.
TEXTS = {"sd35": (("clip", 77), ("t5", 77)), "flux": (("t5", 512),)}
QUICK_TEXTS = {"sd35": (("clip", 8), ("t5", 8)), "flux": (("t5", 12),)}
#: Word → its token offsets inside every chunk that holds it (a made-up prompt "left lung heart effusion ...":
#: CLIP puts a start token at 0, T5 none); offsets fit the quick chunks too.
WORDS = {"left lung": {"clip": (1, 2), "t5": (0, 1)}, "heart": {"clip": (3,), "t5": (2,)},
         "effusion": {"clip": (4,), "t5": (3,)}}
ANATOMY = {"left lung": ("left_lung",), "heart": ("heart",)}
BOOST = ("effusion", "right_lung", 3.0, 0.5)  # word, target organ, factor inside, damping outside
CASES = ("stock", "hard", "hard_boosted", "soft", "image_stock", "image_hard", "text_rows", "image_to_text")
FIELDS = ("family", "text_len", "image_len", "grid", "batch", "heads", "head_dim", "device", "regions", "median_ms",
          "ratio_vs_stock", "unet_hard_ratio", "text_share", "text_share_flops", "claim_bound", "claim_holds",
          "floor")


def positions(family: str, texts: dict) -> dict[str, tuple[int, ...]]:
    """Each word's context positions for a family's chunk layout."""
    out: dict[str, tuple[int, ...]] = {w: () for w in WORDS}
    start = 0
    for encoder, length in texts[family]:
        for word, where in WORDS.items():
            out[word] += tuple(start + p for p in where[encoder])
        start += length
    return out


def text_bias(family: str, texts: dict, grid: tuple[int, int], fit) -> torch.Tensor:
    """``[N_img, T]``: anatomy-token hiding (leak 0) + the pathology boost, as the gate and boost stages build them."""
    masks, t = example_masks(), sum(n for _, n in texts[family])
    pos = positions(family, texts)
    inside = torch.stack([coverage(masks, organs, *grid, fit=fit) for organs in ANATOMY.values()])
    anatomy = anatomy_token_bias(inside, [pos[w] for w in ANATOMY], t, t, 0.0)
    word, organ, factor, damping = BOOST
    target = coverage(masks, (organ,), *grid, fit=fit)
    return anatomy + pathology_boost_bias(target, {word: pos[word]}, {word: factor}, t, t, damping)


def make_cases(family: str, texts: dict, side: int, batch: int, heads: int, d: int,
               device: str) -> tuple[dict[str, Callable[[], torch.Tensor]], dict]:
    grid = (side, side)
    fit = patch_fit((side * PATCH, side * PATCH), PATCH)
    part = partition(example_masks(), ORGANS, *grid, fit=fit)
    layout = JointLayout(sum(n for _, n in texts[family]), side * side)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, layout.total, d, generator=g).to(device) for _ in range(3))
    bias = text_bias(family, texts, grid, fit).to(device)
    dev_part = part.to(torch.device(device))
    hard, soft = JointGate(dev_part, 0.0), JointGate(dev_part, 0.5)
    t, i = layout.text, layout.image
    qi, ki, vi = (x[:, :, i].contiguous() for x in (q, k, v))
    qt, kt, vt = (x[:, :, t].contiguous() for x in (q, k, v))
    fns = {
        "stock": lambda: F.scaled_dot_product_attention(q, k, v),
        "hard": lambda: joint_attention(q, k, v, layout, hard),
        "hard_boosted": lambda: joint_attention(q, k, v, layout, hard, bias),
        "soft": lambda: joint_attention(q, k, v, layout, soft),
        "image_stock": lambda: F.scaled_dot_product_attention(qi, ki, vi),
        "image_hard": lambda: gated_self_attention(qi, ki, vi, dev_part, 0.0, "confined"),
        "text_rows": lambda: F.scaled_dot_product_attention(qt, k, v),
        "image_to_text": lambda: F.scaled_dot_product_attention(qi, kt, vt),
    }
    n, tl = layout.image_len, layout.text_len
    info = {"family": family, "text_len": tl, "image_len": n, "grid": f"{side}x{side}", "batch": batch,
            "heads": heads, "head_dim": d, "device": device,
            "regions": dict(zip(part.names, part.counts, strict=True)),
            "floor": sum(c * c for c in part.counts) / n**2,  # Σnᵣ²/N²: the image-only hard gate's work share
            "text_share_flops": (tl * (tl + n) + n * tl) / (tl + n) ** 2}
    return fns, info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_cases(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per case: a warm-up each, then ``repeats`` rounds, cases interleaved within a round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {c: [] for c in fns}
    for _ in range(repeats):
        for c, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[c].append(time.perf_counter() - start)
    return {c: statistics.median(ts) for c, ts in times.items()}


def measure(family: str, texts: dict, side: int, args) -> dict:
    fns, info = make_cases(family, texts, side, args.batch, args.heads, args.head_dim, args.device)
    med = time_cases(fns, args.repeats, args.device)
    unet = med["image_hard"] / med["image_stock"]
    share = (med["text_rows"] + med["image_to_text"]) / med["stock"]
    hard_ratio = med["hard"] / med["stock"]
    return {**info, "median_ms": {c: round(1000 * s, 3) for c, s in med.items()},
            "ratio_vs_stock": {c: round(med[c] / med["stock"], 3) for c in ("hard", "hard_boosted", "soft")},
            "unet_hard_ratio": round(unet, 3), "text_share": round(share, 3), "claim_bound": round(unet + share, 3),
            "claim_holds": hard_ratio <= unet + share}


def table(rows: list[dict]) -> str:
    head = ("| family | T | N_img | hard | hard + boost | soft (0.5) | UNet hard (image only) | text share "
            "(flops) | bound | holds |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        x = r["ratio_vs_stock"]
        lines.append(f"| {r['family']} | {r['text_len']} | {r['image_len']} | {x['hard']:.2f} | "
                     f"{x['hard_boosted']:.2f} | {x['soft']:.2f} | {r['unet_hard_ratio']:.2f} | "
                     f"{r['text_share']:.2f} ({r['text_share_flops']:.2f}) | {r['claim_bound']:.2f} | "
                     f"{'yes' if r['claim_holds'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24, help="SD3.5 Medium: 24 heads of 64")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadier ratios on a shared machine; 0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for CI (8×8 and 16×16 grids, short texts, 2 heads of 16, 1 repeat): "
                        "checks the script, not the timings")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts, sides = (QUICK_TEXTS, (8, 16)) if args.quick else (TEXTS, (32, 64))
    if args.quick:
        args.heads, args.head_dim, args.repeats = 2, 16, 1
    print(f"# device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"batch={args.batch} heads={args.heads} head_dim={args.head_dim} repeats={args.repeats}", flush=True)
    rows = []
    for side in sides:
        for family in texts:
            row = measure(family, texts, side, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"quick": args.quick, "fields": list(FIELDS), "cases": list(CASES),
                                         "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
