"""Make the README's pictures and the workflow thumbnails by running the shipped workflows.

    python tools/make_docs_images.py [--checkpoint my_cxr_sd15.safetensors] [--max-side 256]

Starts a private headless ComfyUI, runs the three API workflows of ``workflows/api/`` on real radiographs
(pydicom-data's ``RG1_UNCR.dcm``; the CheXmask example radiograph; the NIH radiograph with a CheXmask row)
and composes what the nodes themselves produced: ``docs/images/*.png`` and ``workflows/<name>.jpg``.
Without ``--checkpoint`` it uses the tiny random-weight test checkpoint, and the pictures say so: they show
the mechanics (masks, regions, what changes where, attention), not realistic anatomy.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_link = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
_link.symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_link.parent))

from PIL import Image, ImageDraw  # noqa: E402

from cxr_counterfactual.imaging.overlay import sized_font  # noqa: E402
from cxr_counterfactual.runner.comfyui_path import require_comfyui  # noqa: E402
from cxr_counterfactual.testing.data import test_data_dir  # noqa: E402

DOCS = ROOT / "docs" / "images"
WORKFLOWS = ROOT / "workflows"
PANEL_HEIGHT = 360


def strip(panels: list[tuple[str, Image.Image]], caption: str, height: int = PANEL_HEIGHT) -> Image.Image:
    """Labelled panels side by side at one height, with a caption line underneath."""
    scaled = [(label, im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height),
                                               Image.Resampling.LANCZOS)) for label, im in panels]
    gap, top, bottom = 8, 30, 30
    width = sum(im.width for _, im in scaled) + gap * (len(scaled) + 1)
    sheet = Image.new("RGB", (width, height + top + bottom), "white")
    draw, x = ImageDraw.Draw(sheet), gap
    for label, im in scaled:
        sheet.paste(im, (x, top))
        draw.text((x, 6), label, fill="black", font=sized_font(18))
        x += im.width + gap
    draw.text((gap, top + height + 6), caption, fill=(90, 90, 90), font=sized_font(14))
    return sheet


def thumbnail(image: Image.Image, path: Path, width: int = 512) -> None:
    im = image.convert("RGB")
    im.thumbnail((width, width * 2), Image.Resampling.LANCZOS)
    im.save(path, "JPEG", quality=88)


def small(graph: dict, checkpoint: str, max_side: int, tiny: bool) -> dict:
    for node in graph.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = checkpoint
        if tiny and node["class_type"] == "CXRRefinementSampler":
            inputs["grid_factor"] = "2"  # the tiny UNet has cross-attention at latent ÷ 1 and ÷ 2 only
        if node["class_type"] == "CXRFitToModel":
            inputs["max_side"] = max_side
    return graph


def node_of(graph: dict, class_type: str, nth: int = 0) -> str:
    return [k for k, v in graph.items() if v["class_type"] == class_type][nth]


def image_of(result, graph: dict, class_type: str, nth: int = 0, index: int = 0) -> Image.Image:
    return Image.open(result.files(node_of(graph, class_type, nth))[index])


def tiny_checkpoint() -> Path:
    """The tiny test checkpoint, built once (in a subprocess that imports ComfyUI) in the demo's cache."""
    from cxr_counterfactual.demo.tiny_checkpoint import CHECKPOINT_NAME

    cache = Path(os.environ.get("CXR_DEMO_CACHE", Path.home() / ".cache" / "cxr-counterfactual"))
    path = cache / CHECKPOINT_NAME
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "COMFYUI_PATH": str(require_comfyui()), "PYTHONPATH": str(_link.parent)}
        subprocess.run([sys.executable, "-m", "cxr_counterfactual.demo.tiny_checkpoint", str(path)], check=True,
                       env=env, cwd=tempfile.gettempdir())
    return path


def main() -> None:
    import pydicom.data

    from cxr_counterfactual.runner.server import ComfyServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an SD1.5 CXR checkpoint (default: the tiny test one)")
    parser.add_argument("--max-side", type=int, default=256)
    args = parser.parse_args()
    ckpt = args.checkpoint or tiny_checkpoint()
    model_note = ("tiny random-weight test checkpoint: the mechanics, not realistic anatomy" if args.checkpoint is None
                  else f"checkpoint {ckpt.name}")
    data = test_data_dir()
    DOCS.mkdir(parents=True, exist_ok=True)
    with ComfyServer(checkpoints=[ckpt]) as server:
        server.upload_input(Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm")))
        server.upload_input(data / "cxr" / "chexmask-example" / "utils_example1.jpg", "chest_pa.png")
        rows = data / "cxr" / "chexmask-rows" / "ChestX-Ray8.csv"
        server.upload_input(rows)
        server.upload_input(data / "cxr" / "nih" / "00000001_000.png")

        graph = small(json.loads((WORKFLOWS / "api" / "cxr_counterfactual_edit.json").read_text()), ckpt.name,
                      args.max_side, args.checkpoint is None)
        result = server.run(graph, timeout=3600)
        organs = image_of(result, graph, "CXRPreviewOrganMasks")
        regions = image_of(result, graph, "CXRApplyKeepRegion")
        export = Image.open(next(p for p in result.files(node_of(graph, "CXRExportCounterfactual"))
                                 if p.suffix == ".png"))
        heat = image_of(result, graph, "CXREvaluateEdit")
        attention = image_of(result, graph, "CXRAttentionPreview")
        energies = image_of(result, graph, "CXRRefinementPreview")
        sheet = strip([("source + organ masks (atlas)", organs), ("edit (amber) / kept (cyan)", regions),
                       ("counterfactual, native size", export.convert("I").point(lambda v: v * (1 / 257)).convert("L")),
                       ("edited - source", heat)],
                      f"RG1_UNCR.dcm (pydicom-data), full edit workflow; {model_note}.")
        sheet.save(DOCS / "full_edit.png")
        thumbnail(sheet, WORKFLOWS / "cxr_counterfactual_edit.jpg")
        strip([("attention per word", attention), ("refinement energy per step", energies)],
              f"Captured during the same run; {model_note}.").save(DOCS / "full_edit_attention.png")

        graph = small(json.loads((WORKFLOWS / "api" / "cxr_ablation.json").read_text()), ckpt.name, args.max_side,
                      args.checkpoint is None)
        result = server.run(graph, timeout=3600)
        row = image_of(result, graph, "SaveImage")
        strip([("stock | gated | gated + boosted | all stages (same seed, same keep region)", row)],
              f"CheXmask example radiograph, ablation workflow; {model_note}.").save(DOCS / "ablation.png")
        strip([("attention: stock / gated / boosted", image_of(result, graph, "CXRAttentionPreview"))],
              f"Rows = runs, columns = words; {model_note}.").save(DOCS / "ablation_attention.png")
        thumbnail(row, WORKFLOWS / "cxr_ablation.jpg")

        graph = small(json.loads((WORKFLOWS / "api" / "cxr_chexmask_edit.json").read_text()), ckpt.name,
                      args.max_side, args.checkpoint is None)
        with rows.open(newline="") as f:  # a row on the NIH radiograph's square grid (another patient's masks)
            row_id = next(r["Image Index"] for r in csv.DictReader(f) if float(r["Dice RCA (Mean)"]) >= 0.7
                          and float(r["Height"] or 1024) == float(r["Width"] or 1024))
        graph[node_of(graph, "CXRLoadCheXmask")]["inputs"]["image_id"] = row_id
        result = server.run(graph, timeout=3600)
        sheet = strip([("CheXmask row's organs", image_of(result, graph, "CXRPreviewOrganMasks")),
                       ("counterfactual", image_of(result, graph, "SaveImage")),
                       ("edited - source", image_of(result, graph, "CXREvaluateEdit"))],
                      f"NIH 00000001_000.png with the masks of CheXmask row {row_id} (another patient: "
                      f"the mechanics only); {model_note}.")
        sheet.save(DOCS / "chexmask_edit.png")
        thumbnail(sheet, WORKFLOWS / "cxr_chexmask_edit.jpg")
        graph = small(json.loads((WORKFLOWS / "api" / "cxr_dicom_masked_edit.json").read_text()), ckpt.name,
                      args.max_side, args.checkpoint is None)
        result = server.run(graph, timeout=3600)
        saved = {graph[k]["_meta"]["title"]: Image.open(result.files(k)[0]) for k in graph
                 if graph[k]["class_type"] == "SaveImage"}
        thumbnail(strip([("organ masks", saved["Save: organ overlay"]),
                         ("masked img2img edit", saved["Save: counterfactual"])], f"The demo's graph; {model_note}."),
                  WORKFLOWS / "cxr_dicom_masked_edit.jpg")
    for path in sorted([*DOCS.glob("*.png"), *WORKFLOWS.glob("*.jpg")]):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
