"""API-format graphs for the bad-input matrix (tests/test_bad_inputs.py): the expectations a case can have and
the graphs the cases build (with tests/api_graph.py's builder).

Every graph is small: the real CheXmask radiograph fitted to 64 px (latent 8×7), the tiny checkpoint, one or
two sampler steps. The files they read (``bi_*``) are written by tests/bad_input_files.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from api_graph import Graph
from cxr_helpers import PROMPT

# 45 × "clear," is 90 tokens: the anatomy and pathology words land in the second 77-token chunk.
LONG_PROMPT = "chest x-ray, " + "clear, " * 45 + "left lung with large pleural effusion, normal heart"
NAN = float("nan")

# --------------------------------------------------------------------------------------------------------------------
# expectations
@dataclass(frozen=True)
class Error:
    """The pack refuses the input: the message names ``[node]``, ``input 'input'`` and a fix containing ``fix``.

    ``stage`` is where it is refused: ``validate`` (POST /prompt answers 400, nothing runs) or ``run`` (the
    node raises while the graph runs; ComfyUI reports an execution_error).
    """

    node: str
    input: str
    fix: str
    stage: str = "run"


@dataclass(frozen=True)
class Bound:
    """ComfyUI's own range check refuses a number beyond an input's declared min/max (HTTP 400 naming it)."""

    class_type: str
    input: str


@dataclass(frozen=True)
class Works:
    """The graph runs; the latent it saves has this shape and only finite values."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Case:
    id: str
    node: str  # class_type of the node under test
    build: Callable[[Graph], None]
    expect: Error | Bound | Works



# --------------------------------------------------------------------------------------------------------------------
# graphs shared by several cases
def pipeline(g: Graph, *, size: tuple[int, int] | None = None, text: str = PROMPT, negative: str = "",
             gate: dict | None = None, boost: dict | None = None, capture: dict | None = None,
             keep: dict | None = None, batch: int = 1, steps: int = 1, image: str = "bi_cxr.jpg") -> None:
    """Radiograph + masks (fitted to 64 px, or files resized to ``size`` = (w, h)) → text encode → the stages
    given (a dict of input overrides; None leaves a stage out) → KSampler → SaveLatent."""
    if size is None:
        img, masks, _ = g.fitted(image=g.image(image))
    else:
        img, masks = g.image(f"bi_cxr_{size[0]}x{size[1]}.png"), g.file_masks(size)
    positive, neg = g.encode(text), g.negative(negative)
    tokens = [positive[0], 1]
    latent = g.latent(img)
    if batch > 1:
        latent = [g.add("RepeatLatentBatch", samples=latent, amount=batch), 0]
    model = g.model
    if gate is not None:
        model = g.gate(model, masks, tokens, **gate)
    if boost is not None:
        model = g.boost(model, tokens, masks, **boost)
    if capture is not None:
        model = g.capture(model, tokens, masks, **capture)
    if keep is not None:
        region = g.edit_keep(masks, **keep)[0]
        latent = [g.add("CXRApplyKeepRegion", latent=latent, edit_region=region, image=img), 0]
    g.save_latent(g.sample(model, positive, neg, latent, steps=steps))


def keep_region(g: Graph, region: str = "organs", mask_batch: int = 1, latent_batch: int = 1,
                value: float = 0.5) -> None:
    """Apply Keep Region with an edit region from the fitted (or full-size) organs, or a solid mask."""
    image, masks, _ = g.fitted()
    if region == "solid":
        edit = g.solid(value, 56, 64)
    else:
        edit = g.edit_keep(g.file_masks() if region == "full_size" else masks)[0]
    if mask_batch > 1:
        edit = g.batch_mask(edit, mask_batch)
    latent = g.latent(image)
    if latent_batch > 1:
        latent = [g.add("RepeatLatentBatch", samples=latent, amount=latent_batch), 0]
    kept = [g.add("CXRApplyKeepRegion", latent=latent, edit_region=edit, image=image), 0]
    g.save_latent(g.sample(g.model, g.encode(), g.negative(), kept))


def boost_target(g: Graph, value: float = 1.0, batch: int = 1, words: str = "", **overrides) -> None:
    """Boost with a solid target MASK (``batch`` of them) instead of organ masks."""
    image, _, _ = g.fitted()
    positive = g.encode()
    target = g.solid(value, 56, 64, batch)
    model = g.boost(g.model, [positive[0], 1], None, target_mask=target, words=words, **overrides)
    g.save_latent(g.sample(model, positive, g.negative(), g.latent(image)))


def refine(g: Graph, size: tuple[int, int] | None = None, **overrides) -> None:
    """SamplerCustom with CXR Refinement Sampler (two steps) on the fitted radiograph or one resized to ``size``."""
    if size is None:
        image, masks, _ = g.fitted()
    else:
        image, masks = g.image(f"bi_cxr_{size[0]}x{size[1]}.png"), g.file_masks(size)
    positive = g.encode()
    if "sampler" in overrides:  # the sampler to refine, by name (KSamplerSelect)
        overrides["sampler"] = [g.add("KSamplerSelect", sampler_name=overrides["sampler"]), 0]
    sampler = g.refiner([positive[0], 1], masks, **overrides)
    g.save_latent(g.refine_sample(positive, g.negative(), g.latent(image), sampler))


def mask_op(g: Graph, class_type: str, **inputs) -> None:
    """One mask node on the fitted organ masks; saves its MASK output (its organs for Select / Morph)."""
    _, masks, _ = g.fitted()
    node = g.add(class_type, organ_masks=masks, **inputs)
    if class_type in ("CXRSelectOrgans", "CXRMorphOrgans"):
        g.save_organs([node, 0], "left_lung")
    else:  # Organ to MASK, Edit / Keep Regions: the MASK is output 0; Combine Organs: output 1
        g.save_mask([node, 1 if class_type == "CXRCombineOrgans" else 0])


def invert(g: Graph, empty: bool = False, **overrides) -> None:
    """Invert Radiograph (two steps) of the fitted radiograph's latent, or of an empty one."""
    image, _, _ = g.fitted()
    latent = [g.add("EmptyLatentImage", width=56, height=64, batch_size=1), 0] if empty else g.latent(image)
    positive = g.encode()
    inputs = dict(model=g.model, positive=positive, negative=g.negative(), latent=latent, steps=2, refine=0)
    g.save_latent([g.node("CXRInvertLatent", **{**inputs, **overrides}), 0])



# ---- graph builders (each takes the Graph) ------------------------------------------------------------------------
def from_mask(g: Graph, value: float = 1.0, width: int = 56, height: int = 64, batch: int = 1) -> None:
    g.save_organs(g.from_mask(left_lung=g.solid(value, width, height, batch)), "left_lung")


def file_masks(g: Graph, **files: str) -> None:
    g.save_organs(g.file_masks(**files), ", ".join(files) or "left_lung")


def label_map(g: Graph, name: str = "bi_labels.png", mapping: str = "right_lung=1, left_lung=2, heart=3") -> None:
    g.save_organs([g.add("CXRLoadOrganLabelMap", label_map=name, mapping=mapping), 0], size=(56, 64))


def fit_masks(g: Graph, masks: str = "full", image: str = "bi_cxr_112x128.png") -> None:
    if masks == "batch_of_two":  # two mask sets (one per image of a batch) for one radiograph
        bundle = g.from_mask(left_lung=g.solid(1.0, 56, 64, batch=2))
    else:
        bundle = g.file_masks() if masks == "full" else g.from_mask(left_lung=g.solid(1.0, 300, 100))
    _, fitted, _ = g.fitted(bundle, g.image(image))
    g.save_organs(fitted, "left_lung")


def batch_other_organs(g: Graph) -> None:
    """CXR Batch Organ Masks given the file masks (three organs) and a left lung alone."""
    odd = g.from_mask(left_lung=g.solid(1.0, 56, 64))
    g.save_organs([g.add("CXRBatchOrganMasks", organ_masks_1=g.file_masks(), organ_masks_2=odd), 0], "left_lung")


def preview_other_aspect(g: Graph) -> None:
    masks = g.from_mask(left_lung=g.solid(1.0, 300, 100))
    g.save_image([g.add("CXRPreviewOrganMasks", image=g.image(), organ_masks=masks, opacity=0.35), 0])


def evaluate_batch(g: Graph, regions: int = 3) -> None:
    image, masks, _ = g.fitted()
    edit = g.batch_mask(g.edit_keep(masks)[0], regions)
    node = g.add("CXREvaluateEdit", source=image, edited=image, edit_region=edit, attention_threshold=0.5,
                 heat_scale=0.0)
    g.save_image([node, 0])


def evaluate_classifier(g: Graph, weights: str | None, target: str) -> None:
    """CXR Evaluate Edit with a typed target, scored by CXR Load Classifier on ``weights`` (None: no classifier)."""
    image, masks, _ = g.fitted()
    extra = {"classifier": [g.add("CXRLoadClassifier", weights=weights), 0]} if weights else {}
    node = g.add("CXREvaluateEdit", source=image, edited=image, edit_region=g.edit_keep(masks)[0],
                 attention_threshold=0.5, heat_scale=0.0, target_pathology=target, **extra)
    g.save_image([node, 0])


def atlas(g: Graph, min_quality: float) -> None:
    node = g.add("CXRAtlasOrgans", image=g.image("bi_cxr_112x128.png"), min_quality=min_quality)
    g.save_organs([node, 0])


def segment(g: Graph) -> None:
    node = g.add("CXRSegmentOrgans", image=g.image(), weights="no_such_weights.pth", threshold=0.5)
    g.save_organs([node, 0])


def dicom(g: Graph, name: str, window: str = "auto") -> None:
    node = g.add("CXRLoadDICOM", dicom_file=name, window=window)
    g.save_image([g.add("CXRFitToModel", image=[node, 0], max_side=64, geometry=[node, 1]), 0])


def loader_atlas(g: Graph, name: str) -> None:
    """A radiograph file through the loader into the atlas (whose fit-quality check must refuse a non-chest)."""
    node = g.add("CXRLoadDICOM", dicom_file=name, window="auto")
    g.save_organs([g.add("CXRAtlasOrgans", image=[node, 0], min_quality=0.5), 0], size=(56, 64))


def chexmask(g: Graph, name: str, min_dice: float = 0.7) -> None:
    node = g.add("CXRLoadCheXmask", csv_file=name, image_id=g.row_id, id_column="auto", min_dice=min_dice,
                 border_crop="auto", image=g.image())
    g.save_organs([node, 0], size=(56, 64))


def capture_reversed(g: Graph) -> None:
    pipeline(g, capture={"start_percent": 0.9, "end_percent": 0.1})


def attention_preview_without_capture(g: Graph) -> None:
    image, _, _ = g.fitted()
    latent = g.sample(g.model, g.encode(), g.negative(), g.latent(image))
    g.save_image([g.add("CXRAttentionPreview", image=image, model_1=g.model, latent_1=latent), 0])


def refinement_preview_plain_sampler(g: Graph) -> None:
    image, _, _ = g.fitted()
    sampler = [g.add("KSamplerSelect", sampler_name="euler"), 0]
    latent = g.refine_sample(g.encode(), g.negative(), g.latent(image), sampler)
    g.save_image([g.add("CXRRefinementPreview", sampler=sampler, latent=latent), 0])


def paste_without_keep(g: Graph) -> None:
    image, _, _ = g.fitted()
    latent = g.latent(image)
    out = g.sample(g.model, g.encode(), g.negative(), latent)
    g.save_latent([g.add("CXRPasteKeepRegion", samples=out, source=latent), 0])


def guider_not_inverted(g: Graph) -> None:
    image, _, _ = g.fitted()
    positive, negative, latent = g.encode(), g.negative(), g.latent(image)
    guider = [g.add("CXRInversionGuider", model=g.model, positive=positive, negative=negative, cfg=1.0,
                    inverted=latent), 0]
    sigmas = [g.add("BasicScheduler", model=g.model, scheduler="normal", steps=1, denoise=1.0), 0]
    noise = [g.add("RandomNoise", noise_seed=1), 0]
    sampler = [g.add("KSamplerSelect", sampler_name="euler"), 0]
    g.save_latent([g.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                         latent_image=latent), 0])


def geometry(g: Graph, class_type: str, **extra) -> None:
    """Restore / composite / export fed the radiograph at native size where the fitted edit belongs."""
    source = g.image()
    _, masks, fit = g.fitted(image=source)
    wrong = g.image("bi_cxr_112x128.png")
    if class_type == "CXRRestoreNativeSize":
        node = g.add(class_type, image=wrong, fit=fit)
    elif class_type == "CXRCompositeNative":
        node = g.add(class_type, source=source, edited=wrong, fit=fit, edit_region=g.edit_keep(masks)[0])
    else:
        inputs = dict(image=wrong, fit=fit, filename_prefix="bad_inputs/export", format="png", bit_depth="auto",
                      keep_patient_data=False, include_workflow=False)
        node = g.add(class_type, **{**inputs, **extra})
    g.save_image([node, 0])


def composite(g: Graph, region: str) -> None:
    """Composite with a NaN edit region, or batches that do not pair (3 regions, 2 edits)."""
    source = g.image()
    fitted, masks, fit = g.fitted(image=source)
    edited, edit = fitted, g.solid(NAN, 56, 64)
    if region == "batches":
        edited = [g.add("RepeatImageBatch", image=fitted, amount=2), 0]
        edit = g.batch_mask(g.edit_keep(masks)[0], 3)
    g.save_image([g.add("CXRCompositeNative", source=source, edited=edited, fit=fit, edit_region=edit), 0])


def evaluate_nan_region(g: Graph) -> None:
    image, _, _ = g.fitted()
    node = g.add("CXREvaluateEdit", source=image, edited=image, edit_region=g.solid(NAN, 56, 64),
                 attention_threshold=0.5, heat_scale=0.0)
    g.save_image([node, 0])


def anatomy_word_without_mask(g: Graph) -> None:
    """The prompt ties 'heart' to the heart, but only the lungs' masks reach the gate."""
    image, masks, _ = g.fitted()
    lungs = [g.add("CXRSelectOrgans", organ_masks=masks, organs="right_lung, left_lung"), 0]
    positive = g.encode()
    model = g.gate(g.model, lungs, [positive[0], 1], organs="right_lung, left_lung")
    g.save_latent(g.sample(model, positive, g.negative(), g.latent(image)))


def preview_opacity(g: Graph, opacity: float) -> None:
    image, masks, _ = g.fitted()
    g.save_image([g.add("CXRPreviewOrganMasks", image=image, organ_masks=masks, opacity=opacity), 0])


def save_metrics_outside(g: Graph) -> None:
    image, masks, _ = g.fitted()
    report = g.add("CXREvaluateEdit", source=image, edited=image, edit_region=g.edit_keep(masks)[0],
                   attention_threshold=0.5, heat_scale=0.0)
    g.add("CXRSaveMetrics", metrics=[report, 1], filename_prefix="../../outside/metrics")
