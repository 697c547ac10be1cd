"""Write the shipped workflows: each graph once, in API format (``workflows/api/``) and UI format (``workflows/``).

    python tools/build_workflows.py [object_info.json]   # else starts a private headless ComfyUI for it

The graphs are defined here, in Python, so that the UI file and its API twin come from one definition; the
UI layout (columns by depth) and widget order come from the running server's node definitions. The tests
convert every UI file back with the frontend's rules and compare it with its twin.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_link = Path(tempfile.mkdtemp()) / "cxr_counterfactual"
_link.symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_link.parent))

from cxr_counterfactual.attention.stage_builders import GATE_APPLY_TO_UNCOND  # noqa: E402
from cxr_counterfactual.tools.workflow_format import api_to_ui  # noqa: E402

CHECKPOINT = "tiny-sd15.safetensors"  # `python -m cxr_counterfactual tiny-checkpoint`; swap in a CXR SD1.5 model
EDIT_PROMPT = "chest x-ray, large left pleural effusion, left lung, normal heart"
SOURCE_PROMPT = "chest x-ray, normal left lung, normal heart"
SEED = 7


class Graph:
    """An API graph built node by node; ``add`` returns the node id, ``out(id, slot)`` a link."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, title: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}
        return node_id


def out(node_id: str, slot: int = 0) -> list[Any]:
    return [node_id, slot]


def _model_and_prompts(g: Graph, fitted: str, edit_prompt: str = EDIT_PROMPT):
    ckpt = g.add("CheckpointLoaderSimple", "Checkpoint (SD1.5 CXR model)", ckpt_name=CHECKPOINT)
    text = g.add("CXRTextEncode", "Edit prompt + token map", clip=out(ckpt, 1), text=edit_prompt,
                 anatomy="left lung, heart", pathology="effusion")
    negative = g.add("CLIPTextEncode", "Negative prompt", clip=out(ckpt, 1), text="")
    latent = g.add("VAEEncode", "Encode radiograph", pixels=out(fitted, 0), vae=out(ckpt, 2))
    return ckpt, text, negative, latent


def _stages(g: Graph, model: list[Any], masks: list[Any], tokens: list[Any],
            boost_end: float = 0.4, capture: str | None = None) -> tuple[str, str]:
    gate = g.add("CXRAnatomyAttentionGate", "Stage 2: anatomy gate", model=model, organ_masks=masks, tokens=tokens,
                 strength=1.0, token_strength=1.0, organs="right_lung, left_lung, heart", background="free",
                 margin_px=0, blocks="all", start_percent=0.0, end_percent=1.0,
                 apply_to_uncond=GATE_APPLY_TO_UNCOND,  # the node's default, chosen by the README's rule
                 anatomy_isolation="tokens")
    boosted = out(gate)
    if capture:  # between gate and boost: ComfyUI then runs it, and its grid check, before the inversion that
        # also takes the gate's model; it records the boosted maps all the same (stages compose in any order).
        boosted = out(_capture(g, out(gate), masks, tokens, capture))
    boost = g.add("CXRPathologyBoost", "Stage 3: pathology boost", model=boosted, tokens=tokens,
                  organ_masks=masks, target_organs="left_lung", factor=3.0, words="", outside_damping=1.0,
                  blocks="all", start_percent=0.0, end_percent=boost_end)
    return gate, boost


def _capture(g: Graph, model: list[Any], masks: list[Any], tokens: list[Any], label: str) -> str:
    return g.add("CXRCaptureAttention", f"Capture attention: {label}", model=model, tokens=tokens, label=label,
                 grid_factor="2", target_organs="left_lung", start_percent=0.0, end_percent=1.0, organ_masks=masks)


def _refiner(g: Graph, model: list[Any], masks: list[Any], tokens: list[Any], iterations: int = 1,
             title: str = "Stage 4: latent refinement (Euler)", end_percent: float = 0.5) -> str:
    # The checkpoint's MODEL lets the node refuse a grid_factor the UNet cannot serve before anything samples.
    return g.add("CXRRefinementSampler", title, tokens=tokens, organ_masks=masks,
                 target_organs="left_lung", iterations=iterations, step_size=0.1, start_percent=0.0,
                 end_percent=end_percent,
                 thresholds="", grid_factor="4", smoothing=0.5, extent_weight=0.0, extent_threshold=0.5, model=model)


def _regions(g: Graph, masks: list[Any], latent: str, image: list[Any]) -> tuple[str, str]:
    regions = g.add("CXREditKeepRegions", "Edit region (left lung + margin, heart kept)", organ_masks=masks,
                    edit_organs="left_lung", margin_px=16, feather_px=8.0, protect="heart")
    keep = g.add("CXRApplyKeepRegion", "Keep the patient outside the edit", latent=out(latent),
                 edit_region=out(regions), image=image)
    return regions, keep


def full_edit() -> dict[str, Any]:
    """DICOM → masks → text → gate → boost → refine → keep + inversion → sampler → previews, metrics, export."""
    g = Graph()
    dicom = g.add("CXRLoadDICOM", "Radiograph (DICOM)", dicom_file="RG1_UNCR.dcm", window="auto")
    atlas = g.add("CXRAtlasOrgans", "Stage 1: organ masks (weight-free atlas)", image=out(dicom), min_quality=0.5)
    g.add("CXRPreviewOrganMasks", "Preview: organ masks", image=out(dicom), organ_masks=out(atlas), opacity=0.35)
    fit = g.add("CXRFitToModel", "Fit radiograph to the model", image=out(dicom), max_side=512,
                organ_masks=out(atlas), geometry=out(dicom, 1))
    masks = out(fit, 1)
    ckpt, text, negative, latent = _model_and_prompts(g, fit)
    tokens = out(text, 1)
    source = g.add("CLIPTextEncode", "Source prompt (the patient as they are)", clip=out(ckpt, 1), text=SOURCE_PROMPT)
    regions, keep = _regions(g, masks, latent, out(fit))
    # Regeneration starts where inversion stopped (start_percent 0.5): boost and refine its first half.
    gate, boost = _stages(g, out(ckpt), masks, tokens, boost_end=0.75, capture="edit")
    capture = g.nodes[boost]["inputs"]["model"][0]  # the capture between gate and boost
    invert = g.add("CXRInvertLatent", "Invert the radiograph (DDIM)", model=out(gate), positive=out(source),
                   negative=out(negative), latent=out(keep), cfg=1.0, steps=20, scheduler="karras",
                   start_percent=0.5, refine=4)
    guider = g.add("CXRInversionGuider", "Guider (checked against the inversion)", model=out(boost),
                   positive=out(text), negative=out(negative), cfg=1.0, inverted=out(invert))
    refiner = _refiner(g, out(ckpt), masks, tokens, end_percent=0.75)
    sampled = g.add("SamplerCustomAdvanced", "Sampler", noise=out(invert, 1), guider=out(guider),
                    sampler=out(refiner), sigmas=out(invert, 2), latent_image=out(keep))
    pasted = g.add("CXRPasteKeepRegion", "Paste the kept region (exact)", samples=out(sampled), source=out(keep))
    decoded = g.add("VAEDecode", "Decode the counterfactual", samples=out(pasted), vae=out(ckpt, 2))
    native = g.add("CXRCompositeNative", "Composite onto the radiograph (native size)", source=out(dicom),
                   edited=out(decoded), fit=out(fit, 2), edit_region=out(regions))
    g.add("CXRAttentionPreview", "Preview: attention maps", image=out(fit), model_1=out(capture),
          latent_1=out(sampled))
    g.add("CXRRefinementPreview", "Preview: refinement energies", sampler=out(refiner), latent=out(sampled))
    evaluate = g.add("CXREvaluateEdit", "Metrics + difference map (native size)", source=out(dicom),
                     edited=out(native), edit_region=out(native, 1), organ_masks=out(atlas), attention_threshold=0.5,
                     heat_scale=0.0, target_pathology="")
    g.add("CXRSaveMetrics", "Save metrics (JSON + CSV)", metrics=out(evaluate, 1),
          filename_prefix="cxr_counterfactual/metrics")
    g.add("CXRExportCounterfactual", "Export at native size (PNG + DICOM)", image=out(native), fit=out(fit, 2),
          filename_prefix="cxr_counterfactual/counterfactual", format="png+dicom", bit_depth="auto",
          keep_patient_data=False, include_workflow=True, edit_region=out(native, 1), segment_organs=False)
    return g.nodes


def ablation() -> dict[str, Any]:
    """Stock vs gate vs gate + boost vs all stages: same radiograph, masks, seed and keep region."""
    g = Graph()
    image = g.add("CXRLoadDICOM", "Radiograph (DICOM/PNG/JPEG)", dicom_file="chest_pa.png", window="auto")
    atlas = g.add("CXRAtlasOrgans", "Organ masks (weight-free atlas)", image=out(image), min_quality=0.5)
    fit = g.add("CXRFitToModel", "Fit radiograph to the model", image=out(image), max_side=512,
                organ_masks=out(atlas))
    masks = out(fit, 1)
    ckpt, text, negative, latent = _model_and_prompts(g, fit)
    tokens = out(text, 1)
    regions, keep = _regions(g, masks, latent, out(fit))
    gate, boost = _stages(g, out(ckpt), masks, tokens)
    euler = g.add("KSamplerSelect", "Euler", sampler_name="euler")
    refiner = _refiner(g, out(ckpt), masks, tokens)
    # 0 iterations is bit-identical to Euler and records the energies: the reference of the energy plot.
    plain = _refiner(g, out(ckpt), masks, tokens, iterations=0, title="Euler with energies recorded (0 iterations)")
    sigmas = g.add("BasicScheduler", "Schedule (img2img, denoise 0.8)", model=out(ckpt), scheduler="normal",
                   steps=20, denoise=0.8)
    runs = []
    for label, model, sampler in (("stock", out(ckpt), euler), ("gated", out(gate), euler),
                                  ("gated + boosted", out(boost), plain), ("all stages", out(boost), refiner)):
        captured = _capture(g, model, masks, tokens, label)
        sampled = g.add("SamplerCustom", f"Sampler: {label}", model=out(captured), add_noise=True, noise_seed=SEED,
                        cfg=7.0, positive=out(text), negative=out(negative), sampler=out(sampler), sigmas=out(sigmas),
                        latent_image=out(keep))
        pasted = g.add("CXRPasteKeepRegion", f"Paste kept region: {label}", samples=out(sampled), source=out(keep))
        runs.append((captured, sampled, g.add("VAEDecode", f"Decode: {label}", samples=out(pasted), vae=out(ckpt, 2))))
    row = out(runs[0][2])
    for _, _, decoded in runs[1:]:
        row = out(g.add("ImageStitch", "Side by side", image1=row, direction="right", match_image_size=True,
                        spacing_width=8, spacing_color="white", image2=out(decoded)))
    g.add("SaveImage", "Stock | gated | gated + boosted | all stages", images=row,
          filename_prefix="cxr_ablation/side_by_side")
    pairs = {f"{k}_{i + 1}": out(v) for i, (m, s, _) in enumerate(runs[:3]) for k, v in (("model", m), ("latent", s))}
    g.add("CXRAttentionPreview", "Attention: stock / gated / boosted", image=out(fit), **pairs)
    g.add("CXREvaluateEdit", "Metrics: all stages (fitted grid, with attention IoU)", source=out(fit),
          edited=out(runs[3][2]), edit_region=out(regions), organ_masks=masks, model=out(runs[3][0]),
          latent=out(runs[3][1]), tokens=tokens, attention_threshold=0.5, heat_scale=0.0, target_pathology="")
    g.add("CXRRefinementPreview", "Refinement energies: all stages vs gated + boosted", sampler=out(refiner),
          latent=out(runs[3][1]), reference_sampler=out(plain), reference_latent=out(runs[2][1]))
    return g.nodes


def chexmask_edit() -> dict[str, Any]:
    """Masks from a CheXmask CSV row (RLE decoded onto the radiograph), then gate + boost + keep region."""
    g = Graph()
    image = g.add("CXRLoadDICOM", "Radiograph (from the CheXmask source dataset)", dicom_file="00000001_000.png",
                  window="auto")
    masks_node = g.add("CXRLoadCheXmask", "Organ masks from a CheXmask row", csv_file="ChestX-Ray8.csv",
                       image_id="00000001_000.png", id_column="auto", min_dice=0.7, border_crop="auto",
                       image=out(image))
    g.add("CXRPreviewOrganMasks", "Preview: CheXmask organs", image=out(image), organ_masks=out(masks_node),
          opacity=0.35)
    fit = g.add("CXRFitToModel", "Fit radiograph to the model", image=out(image), max_side=512,
                organ_masks=out(masks_node))
    masks = out(fit, 1)
    ckpt, text, negative, latent = _model_and_prompts(g, fit)
    regions, keep = _regions(g, masks, latent, out(fit))
    _, boost = _stages(g, out(ckpt), masks, out(text, 1))
    sampled = g.add("KSampler", "Sampler (img2img in the edit region)", model=out(boost), seed=SEED, steps=20, cfg=7.0,
                    sampler_name="euler", scheduler="normal", positive=out(text), negative=out(negative),
                    latent_image=out(keep), denoise=0.8)
    pasted = g.add("CXRPasteKeepRegion", "Paste the kept region (exact)", samples=out(sampled), source=out(keep))
    decoded = g.add("VAEDecode", "Decode the counterfactual", samples=out(pasted), vae=out(ckpt, 2))
    native = g.add("CXRCompositeNative", "Composite onto the radiograph (native size)", source=out(image),
                   edited=out(decoded), fit=out(fit, 2), edit_region=out(regions))
    g.add("SaveImage", "Save: counterfactual", images=out(native), filename_prefix="cxr_chexmask/counterfactual")
    g.add("CXREvaluateEdit", "Metrics + difference map (native size)", source=out(image), edited=out(native),
          edit_region=out(native, 1), organ_masks=out(masks_node), attention_threshold=0.5, heat_scale=0.0,
          target_pathology="")
    return g.nodes


NOTES = {
    "cxr_counterfactual_edit": "**Counterfactual edit of a real radiograph.** Put a radiograph (DICOM, e.g. "
    "pydicom-data's `RG1_UNCR.dcm`, or PNG/JPEG) in `ComfyUI/input`, and an SD1.5 CXR checkpoint (e.g. RoentGen) in "
    "`models/checkpoints`. The tiny test checkpoint (`python -m cxr_counterfactual tiny-checkpoint`) shows the "
    "mechanics only. Write the source prompt (the patient as they are) and the edit prompt (the finding).",
    "cxr_ablation": "**Ablation.** The same radiograph, masks, seed and keep region through stock sampling, the "
    "anatomy gate, gate + pathology boost, and all stages (with latent refinement), side by side, with their "
    "attention maps and energies.",
    "cxr_dicom_masked_edit": "**The demo's graph.** A DICOM radiograph, atlas organ masks and a plain masked img2img "
    "edit of the left lung (no attention regulation): the baseline the other workflows improve on. "
    "`Save: counterfactual` is the edit composited onto the patient's own pixels at native size; `Save: raw "
    "decode` is the whole decoded latent (every pixel through the VAE). "
    "`python -m cxr_counterfactual demo` runs it headless.",
    "cxr_chexmask_edit": "**Masks from CheXmask.** Put a CheXmask CSV (any size; decompress `.csv.gz`) and the "
    "radiograph of one of its rows in `ComfyUI/input`, and type the row's image id.",
}
def dicom_masked_edit() -> dict[str, Any]:
    """The demo's graph (``python -m cxr_counterfactual demo``), kept as its hand-written API file."""
    return json.loads((ROOT / "workflows" / "api" / "cxr_dicom_masked_edit.json").read_text(encoding="utf-8"))


GRAPHS = {"cxr_counterfactual_edit": full_edit, "cxr_ablation": ablation, "cxr_chexmask_edit": chexmask_edit,
          "cxr_dicom_masked_edit": dicom_masked_edit}


def write_all(object_info: dict[str, Any], folder: Path = ROOT / "workflows") -> list[Path]:
    written = []
    for name, build in GRAPHS.items():
        api = build()
        ui = api_to_ui(api, object_info, notes={0: NOTES[name]})
        for path, data in ((folder / "api" / f"{name}.json", api), (folder / f"{name}.json", ui)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    return written


def main() -> None:
    if len(sys.argv) > 1:  # a saved /object_info (JSON) instead of a server of our own
        object_info = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    else:
        from cxr_counterfactual.runner.server import ComfyServer

        with ComfyServer() as server:
            object_info = server.object_info()
    for path in write_all(object_info):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
