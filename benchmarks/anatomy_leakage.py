"""Anatomy leakage per cross-attention layer: what of an anatomy word outside queries still see through later tokens.

    python benchmarks/anatomy_leakage.py [--models sd15 sd2 sdxl] [--px 128] [--isolation tokens prompt]

Definition (``testing/leakage.py``): for the positive prompt's queries outside a word's organ, per layer,
``leakage = ‖out_gated − out_removed‖ / ‖out_stock − out_removed‖``, where ``out_removed`` attends over the prompt
encoded without the word(s) and ``out_stock`` over the prompt as typed (attention outputs before the output
projection, the queries of the gated model's own call). 0 = masking the word is as good as removing it.

Real ComfyUI in-process on the CPU; the tiny random-weight checkpoints (SD1.5: ``demo/tiny_checkpoint.py``; SD2.x and
SDXL-family: ``testing/tiny_models.py``, built on first use into a temporary cache); the CheXmask example radiograph
fitted to ``--px`` with its human organ masks; one KSampler step (euler, cfg 4, denoise 0.6). Prints one line per
layer and a summary per model, prompt and isolation. Random weights show the mechanism, not a trained model's figure.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from sampling import load_host, node, prepare

CASES = (
    ("chest x-ray, left lung effusion, heart normal", "left lung"),
    ("chest x-ray, left lung effusion, heart normal", "heart"),
    ("chest x-ray, left lung with large pleural effusion, normal heart", "left lung, heart"),
)


def load(nodes, name: str, ckpt: Path):
    import folder_paths
    import torch

    from cxr_counterfactual.testing.tiny_models import ensure_tiny_model_checkpoint

    if name != "sd15":
        cache = Path(tempfile.gettempdir()) / "cxr-bench-cache"
        ckpt = ensure_tiny_model_checkpoint(name, cache)
        folder_paths.add_model_folder_path("checkpoints", str(cache))
    with torch.inference_mode():
        return node(nodes, "CheckpointLoaderSimple")().load_checkpoint(ckpt.name)[:3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sd2", "sdxl"], choices=["sd15", "sd2", "sdxl"])
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--isolation", nargs="+", default=["tokens"], choices=["tokens", "prompt"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    nodes, ckpt = load_host()
    import comfy.utils
    import torch

    from cxr_counterfactual.testing.leakage import layer_leakage

    comfy.utils.PROGRESS_BAR_ENABLED = False
    torch.manual_seed(0)
    _, masks, _, _, _, _ = prepare(nodes, ckpt, args.px)
    for name in args.models:
        model, clip, vae = load(nodes, name, ckpt)
        with torch.inference_mode():
            from sampling import radiograph, run_v3

            fitted = run_v3(nodes, "CXRFitToModel", image=radiograph(), max_side=args.px, organ_masks=None,
                            geometry=None)[0]
            latent = node(nodes, "VAEEncode")().encode(vae, fitted)[0]
        for text, words in CASES:
            for isolation in args.isolation:
                extra = {} if isolation == "tokens" else {"anatomy_isolation": isolation}
                rows = layer_leakage(lambda n: node(nodes, n), model, clip, text, words, masks, latent, extra)
                for r in rows:
                    print(f"model={name} words='{words}' isolation={isolation} layer={r.key[0]}.{r.key[1]}.{r.key[2]} "
                          f"grid={r.grid[0]}x{r.grid[1]} outside={r.outside} leakage={r.leakage:.3g} "
                          f"relative={r.relative:.3g}")
                leaks = [r.leakage for r in rows]
                print(f"SUMMARY model={name} prompt='{text}' words='{words}' isolation={isolation} layers={len(rows)} "
                      f"max={max(leaks):.3g} mean={sum(leaks) / len(leaks):.3g} "
                      f"max_relative={max(r.relative for r in rows):.3g}", flush=True)


if __name__ == "__main__":
    main()
