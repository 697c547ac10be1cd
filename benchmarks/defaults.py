"""The negative-pass defaults measured against the README's rule ("Defaults for the negative prompt's pass").

    python benchmarks/defaults.py [--models sd15,sd2,sdxl] [--seeds 3] [--steps 8] [--px 128] [--denoise 0.75]

Img2img of the real CheXmask example radiograph through ComfyUI in-process (KSampler, euler, normal), at cfg 1,
4 and 7, each case against the stock run with the same seed and cfg:

- ``gate-off`` / ``gate-on``: CXR Anatomy Attention Gate at its defaults, ``apply_to_uncond`` off / on;
- ``boost-pos`` / ``boost-pos+neg``: CXR Pathology Boost at its defaults (target left lung), biasing the positive
  prompt's rows only (what the node does) / the negative prompt's rows too, with the same bias on the same token
  columns (the node has no option for it: the benchmark swaps the cross-attention row rule in for the run).

Every case runs under CXR Capture Attention (target left lung). Metrics (``imaging.metrics.evaluate_pair``,
source = the stock decode, edit region = the left lung): ``out_mad`` mean |Δ| outside the left lung (the rule's
primary), ``out_ssim`` SSIM outside, ``in_mad`` mean |Δ| inside, ``share`` the pathology words' in-target attention
share (mean over captured steps). Prints one line per model, case and cfg (mean over seeds), then the rule's
verdict per setting. The models are random-weight test models: the figures show the mechanism, not image quality.
On a busy machine set ``OMP_NUM_THREADS=1`` (torch's threads otherwise contend: several times slower).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sampling as base  # noqa: E402  (sets up the import path of the pack and ComfyUI's loader)

CFGS = (1.0, 4.0, 7.0)
CASES = ("gate-off", "gate-on", "boost-pos", "boost-pos+neg")
SETTINGS = {"gate apply_to_uncond": ("gate-off", "gate-on"), "boost negative rows": ("boost-pos", "boost-pos+neg")}
CURRENT = {"gate apply_to_uncond": "gate-off", "boost negative rows": "boost-pos"}


@contextlib.contextmanager
def boost_negative_rows():
    """Cross-attention regulation on the negative prompt's rows too: the same ``[N, T]`` bias on the same columns
    (the positive rows keep the node's path, so captures still record the positive prompt only)."""
    from cxr_counterfactual.attention.gating import token_masked_cross_attention
    from cxr_counterfactual.attention.kernels import to_flat, to_heads
    from cxr_counterfactual.attention.layer_call import active_stages, cross_bias
    from cxr_counterfactual.hosts.comfy import replace as patch
    from cxr_counterfactual.hosts.comfy.cond_areas import chunk_fields

    original = patch.CXRReplace._on_rows

    def on_rows(self, q, k, v, extra, include_uncond, work):
        out = original(self, q, k, v, extra, include_uncond, work)
        rows = patch._rows(extra, q.shape[0], False)
        if self.kind != "attn2" or rows is None:
            return out
        sigma = float(extra["sigmas"].max())
        h, w = patch._grid(extra)
        field = chunk_fields(extra)[0]  # one radiograph, no area: every chunk has the same field
        bias = cross_bias(active_stages(self.stages, self.key, sigma), h, w, field, k.shape[1], q.device)
        others = sorted(set(range(q.shape[0])) - set(rows.tolist()))
        if bias is None or not others:
            return out
        o = torch_long(others, q.device)
        heads = extra["n_heads"]
        neg = token_masked_cross_attention(to_heads(q[o], heads), to_heads(k[o], heads), to_heads(v[o], heads), bias)
        out[o] = to_flat(neg).to(out.dtype)
        return out

    patch.CXRReplace._on_rows = on_rows
    try:
        yield
    finally:
        patch.CXRReplace._on_rows = original


def torch_long(values, device):
    import torch

    return torch.tensor(values, dtype=torch.long, device=device)


def checkpoints(names: list[str], sd15) -> dict[str, Path]:
    from cxr_counterfactual.testing.tiny_models import ensure_tiny_model_checkpoint

    cache = Path(tempfile.gettempdir()) / "cxr-bench-cache"
    return {n: sd15 if n == "sd15" else ensure_tiny_model_checkpoint(n, cache) for n in names}


def variant(nodes, model, case: str, masks, tokens):
    """The case's regulated model under a capture (target left lung)."""
    if case.startswith("gate"):
        model = base.run_v3(nodes, "CXRAnatomyAttentionGate", model=model, organ_masks=masks, tokens=tokens,
                            strength=1.0, token_strength=1.0, organs="right_lung, left_lung, heart",
                            background="free", margin_px=0, blocks="all", start_percent=0.0, end_percent=1.0,
                            apply_to_uncond=case == "gate-on")[0]
    elif case.startswith("boost"):
        model = base.boosted(nodes, model, masks, tokens)
    return base.captured(nodes, model, masks, tokens)


def measure(nodes, ckpt: Path, args) -> dict[tuple[str, float], dict[str, float]]:
    """(case, cfg) → metrics averaged over seeds (``stock`` included, its share only)."""
    import folder_paths
    import torch

    from cxr_counterfactual.hosts.comfy.patch import run_state
    from cxr_counterfactual.imaging.metrics import evaluate_pair, grey, region_on

    folder_paths.add_model_folder_path("checkpoints", str(ckpt.parent))
    model, masks, latent, positive, negative, tokens = base.prepare(nodes, ckpt, args.px)
    vae = base.node(nodes, "CheckpointLoaderSimple")().load_checkpoint(ckpt.name)[2]
    models = {c: variant(nodes, model, c, masks, tokens) for c in ("stock", *CASES)}

    def decoded(m, seed, cfg, case):
        ctx = boost_negative_rows() if case == "boost-pos+neg" else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = base.node(nodes, "KSampler")().sample(m, seed, args.steps, cfg, "euler", "normal", positive,
                                                        negative, latent, denoise=args.denoise)[0]
            image = base.node(nodes, "VAEDecode")().decode(vae, out)[0]
        _, shares = run_state(m).store.latest().capture["bench"].mean_maps()
        return grey(image), statistics.fmean(shares)

    rows: dict[tuple[str, float], dict[str, list[float]]] = {}
    for cfg in CFGS:
        for seed in range(args.seeds):
            stock, stock_share = decoded(models["stock"], seed, cfg, "stock")
            edit = region_on(masks.get("left_lung"), *stock.shape[-2:])[0]
            rows.setdefault(("stock", cfg), {}).setdefault("share", []).append(stock_share)
            for case in CASES:
                image, share = decoded(models[case], seed, cfg, case)
                p = evaluate_pair(stock, image, edit)
                row = rows.setdefault((case, cfg), {})
                for key, value in (("out_mad", p.keep_mad), ("out_ssim", p.keep_ssim), ("in_mad", p.edit_mad),
                                   ("share", share)):
                    row.setdefault(key, []).append(float(value))
    return {k: {m: statistics.fmean(v) for m, v in row.items()} for k, row in rows.items()}


def verdict(results: dict[str, dict], setting: str) -> str:
    """The README's rule applied to one setting over all models at cfg 4 and 7."""
    a, b = SETTINGS[setting]

    def mean(case, metric):
        return statistics.fmean(r[(case, cfg)][metric] for r in results.values() for cfg in (4.0, 7.0))

    out = {c: mean(c, "out_mad") for c in (a, b)}
    share = {c: mean(c, "share") for c in (a, b)}
    first, second = sorted((a, b), key=lambda c: out[c])
    tie = out[second] - out[first] <= 0.1 * out[second]
    if not tie:
        if share[first] >= share[second] - 0.02:
            choice, why = first, "smaller change outside, in-target share within 0.02"
        else:
            choice, why = second, f"{first} changes less outside but lowers the in-target share by more than 0.02"
    elif abs(share[a] - share[b]) > 0.02:
        choice, why = max((a, b), key=lambda c: share[c]), "tie outside; larger in-target share"
    else:
        choice, why = CURRENT[setting], "tie outside and in share: the current default stays"
    figures = ", ".join(f"{c}: out_mad {out[c]:.4f} share {share[c]:.3f}" for c in (a, b))
    return f"rule setting='{setting}' choice={choice} ({why}; {figures})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15", help="comma-separated: sd15, sd2, sdxl (sd2/sdxl build ~1.6 GB)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--denoise", type=float, default=0.75)
    args = parser.parse_args()
    nodes, sd15 = base.load_host()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # one line per result, no progress bars
    results = {}
    for name, ckpt in checkpoints([n.strip() for n in args.models.split(",") if n.strip()], sd15).items():
        results[name] = measure(nodes, ckpt, args)
        for (case, cfg), m in results[name].items():
            figures = " ".join(f"{k}={v:.4f}" for k, v in m.items())
            print(f"model={name} case={case} cfg={cfg:g} {figures}", flush=True)
    for setting in SETTINGS:
        print(verdict(results, setting), flush=True)


if __name__ == "__main__":
    main()
