"""The bad-input matrix: one row per case, over every node of the pack (see tests/test_bad_inputs.py).

A case is a graph and what must happen: the pack's clear error (node, input, fix), ComfyUI's own range check
for a number beyond an input's declared bound, or a finite, correctly shaped result.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from bad_input_graphs import (
    LONG_PROMPT,
    NAN,
    Bound,
    Case,
    Error,
    Graph,
    Works,
    boost_target,
    invert,
    keep_region,
    mask_op,
    pipeline,
    refine,
)

FIT_LATENT = (1, 4, 8, 7)  # the radiograph fitted to 64 px: 64×56 px
GATE, BOOST, CAPTURE = "CXR Anatomy Attention Gate", "CXR Pathology Boost", "CXR Capture Attention"
FILES, FROM_MASK = "Load Organ Masks (files)", "Organ Masks from MASK"
KEEP, REFINE, DICOM = "Apply Keep Region", "CXR Refinement Sampler (Euler)", "Load Chest X-ray (DICOM/PNG/JPEG)"
CHEXMASK, TEXT = "Load Organ Masks (CheXmask)", "CXR Text Encode (with token map)"
EDIT_KEEP, MORPH = "Edit / Keep Regions", "Dilate / Erode / Feather Organs"


# ---- graph builders (each takes the Graph) ------------------------------------------------------------------------
def from_mask(g: Graph, value: float = 1.0, width: int = 56, height: int = 64, batch: int = 1) -> None:
    g.save_organs(g.from_mask(left_lung=g.solid(value, width, height, batch)), "left_lung")


def file_masks(g: Graph, **files: str) -> None:
    g.save_organs(g.file_masks(**files), ", ".join(files) or "left_lung")


def label_map(g: Graph, name: str = "bi_labels.png", mapping: str = "right_lung=1, left_lung=2, heart=3") -> None:
    g.save_organs([g.add("CXRLoadOrganLabelMap", label_map=name, mapping=mapping), 0], size=(56, 64))


def fit_masks(g: Graph, masks: str = "full", image: str = "bi_cxr_112x128.png") -> None:
    bundle = g.file_masks() if masks == "full" else g.from_mask(left_lung=g.solid(1.0, 300, 100))
    _, fitted, _ = g.fitted(bundle, g.image(image))
    g.save_organs(fitted, "left_lung")


def preview_other_aspect(g: Graph) -> None:
    masks = g.from_mask(left_lung=g.solid(1.0, 300, 100))
    g.save_image([g.add("CXRPreviewOrganMasks", image=g.image(), organ_masks=masks, opacity=0.35), 0])


def evaluate_batch(g: Graph, regions: int = 3) -> None:
    image, masks, _ = g.fitted()
    edit = g.batch_mask(g.edit_keep(masks)[0], regions)
    node = g.add("CXREvaluateEdit", source=image, edited=image, edit_region=edit, attention_threshold=0.5,
                 heat_scale=0.0)
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


# ---- the table ----------------------------------------------------------------------------------------------------
SQUARE, TINY, WIDE, TALL = (64, 64), (8, 8), (168, 56), (56, 168)
ALL_STAGES = {"gate": {}, "boost": {}, "capture": {}}
TO_ZERO = "values must be 0 to 1"  # the fix for a NaN MASK made by another node
morph = partial(mask_op, class_type="CXRMorphOrgans", organs="", operation="erode")
regions = partial(mask_op, class_type="CXREditKeepRegions", edit_organs="left_lung", margin_px=0, protect="heart")


def run_pipeline(**options) -> Callable[[Graph], None]:
    return partial(pipeline, **options)


CASES: list[Case] = [
    # empty / all-zero / NaN masks, batches of masks, masks larger than the image or of another aspect
    Case("mask_all_zero", "CXROrganMasksFromMask", partial(from_mask, value=0.0),
         Error(FROM_MASK, "left_lung", "inside is white")),
    Case("mask_nan", "CXROrganMasksFromMask", partial(from_mask, value=NAN), Error(FROM_MASK, "left_lung", TO_ZERO)),
    Case("mask_batch_of_two", "CXROrganMasksFromMask", partial(from_mask, batch=2),
         Error(FROM_MASK, "left_lung", "batch-select")),
    Case("mask_file_all_black", "CXRLoadOrganMasks", partial(file_masks, heart="bi_black.png"),
         Error(FILES, "heart", "inside is white")),
    Case("mask_files_differ_in_size", "CXRLoadOrganMasks", partial(file_masks, left_lung="bi_LL_64x64.png"),
         Error(FILES, "left_lung", "radiograph's size")),
    Case("mask_png_truncated", "CXRLoadOrganMasks", partial(file_masks, left_lung="bi_truncated.png"),
         Error(FILES, "left_lung", "PNG/JPEG")),
    Case("mask_png_bytes_flipped", "CXRLoadOrganMasks", partial(file_masks, left_lung="bi_flipped.png"),
         Error(FILES, "left_lung", "PNG/JPEG")),
    Case("mask_png_is_text", "CXRLoadOrganMasks", partial(file_masks, heart="bi_text.png"),
         Error(FILES, "heart", "PNG/JPEG")),
    Case("mask_file_missing", "CXRLoadOrganMasks", partial(file_masks, heart="bi_nowhere.png"),
         Error(FILES, "heart", "input folder", "validate")),
    Case("label_map_works", "CXRLoadOrganLabelMap", label_map, Works(FIT_LATENT)),
    Case("label_map_truncated", "CXRLoadOrganLabelMap", partial(label_map, name="bi_labels_truncated.png"),
         Error("Load Organ Masks (label map)", "label_map", "lossless")),
    Case("label_value_absent", "CXRLoadOrganLabelMap", partial(label_map, mapping="left_lung=2, heart=9"),
         Error("Load Organ Masks (label map)", "mapping", "Check the mapping")),
    Case("masks_larger_than_image", "CXRFitToModel", fit_masks, Works(FIT_LATENT)),
    Case("masks_of_another_aspect", "CXRFitToModel", partial(fit_masks, masks="wide"),
         Error("Fit Radiograph to Model", "organ_masks", "same crop and orientation")),
    Case("preview_masks_of_another_aspect", "CXRPreviewOrganMasks", preview_other_aspect,
         Error("Preview Organ Masks", "organ_masks", "same crop and orientation")),
    Case("gate_masks_larger_than_latent", "CXRAnatomyAttentionGate", run_pipeline(size=(112, 128), gate={}),
         Works((1, 4, 16, 14))),
    Case("keep_region_larger_than_latent", "CXRApplyKeepRegion", partial(keep_region, region="full_size"),
         Works(FIT_LATENT)),
    Case("keep_region_all_zero", "CXRApplyKeepRegion", partial(keep_region, region="solid", value=0.0),
         Error(KEEP, "edit_region", "Pick edit organs")),
    Case("keep_region_all_one", "CXRApplyKeepRegion", partial(keep_region, region="solid", value=1.0),
         Error(KEEP, "edit_region", "smaller margin")),
    Case("keep_region_nan", "CXRApplyKeepRegion", partial(keep_region, region="solid", value=NAN),
         Error(KEEP, "edit_region", TO_ZERO)),
    Case("keep_masks_3_latents_2", "CXRApplyKeepRegion", partial(keep_region, mask_batch=3, latent_batch=2),
         Error(KEEP, "edit_region", "one per latent")),
    Case("keep_masks_2_latents_2", "CXRApplyKeepRegion", partial(keep_region, mask_batch=2, latent_batch=2),
         Works((2, 4, 8, 7))),
    Case("boost_target_all_zero", "CXRPathologyBoost", partial(boost_target, value=0.0),
         Error(BOOST, "target_mask", "marks the target")),
    Case("boost_target_nan", "CXRPathologyBoost", partial(boost_target, value=NAN),
         Error(BOOST, "target_mask", TO_ZERO)),
    Case("boost_target_batch_of_two", "CXRPathologyBoost", partial(boost_target, value=0.5, batch=2),
         Error(BOOST, "target_mask", "Connect one mask")),
    Case("evaluate_3_regions_1_pair", "CXREvaluateEdit", evaluate_batch,
         Error("CXR Evaluate Edit", "edit_region", "one per image")),
    Case("evaluate_region_nan", "CXREvaluateEdit", evaluate_nan_region,
         Error("CXR Evaluate Edit", "edit_region", TO_ZERO)),
    Case("composite_region_nan", "CXRCompositeNative", partial(composite, region="nan"),
         Error("Composite Edit onto Radiograph (native size)", "edit_region", "Edit / Keep Regions")),
    Case("composite_3_regions_2_edits", "CXRCompositeNative", partial(composite, region="batches"),
         Error("Composite Edit onto Radiograph (native size)", "edited", "same batch size")),
    # latent sizes and aspect ratios, latent batches
    Case("latent_1x1_gate_boost", "CXRAnatomyAttentionGate", run_pipeline(size=TINY, gate={}, boost={}),
         Works((1, 4, 1, 1))),
    Case("latent_1x1_capture", "CXRCaptureAttention", run_pipeline(size=TINY, capture={}),
         Error(CAPTURE, "target_organs", "smaller grid_factor")),
    Case("latent_8x8_all_stages", "CXRPathologyBoost", run_pipeline(size=SQUARE, **ALL_STAGES), Works((1, 4, 8, 8))),
    Case("latent_7x21_aspect_1_3", "CXRAnatomyAttentionGate", run_pipeline(size=WIDE, **ALL_STAGES),
         Works((1, 4, 7, 21))),
    Case("latent_21x7_aspect_3_1", "CXRCaptureAttention", run_pipeline(size=TALL, **ALL_STAGES),
         Works((1, 4, 21, 7))),
    Case("latent_3x9_aspect_1_3", "CXRAnatomyAttentionGate", run_pipeline(size=(72, 24), gate={}, boost={}),
         Works((1, 4, 3, 9))),
    Case("latent_batch_of_two", "CXRAnatomyAttentionGate", run_pipeline(batch=2, keep={}, **ALL_STAGES),
         Works((2, 4, 8, 7))),
    Case("refine_latent_1x1", "CXRRefinementSampler", partial(refine, size=TINY),
         Error(REFINE, "target_organs", "larger image")),
    Case("refine_aspect_1_3", "CXRRefinementSampler", partial(refine, size=WIDE), Works((1, 4, 7, 21))),
    # words and prompts
    Case("anatomy_word_not_in_prompt", "CXRTextEncode",
         run_pipeline(text="chest x-ray, pleural effusion, normal heart", gate={}),
         Error(TEXT, "text", "Add 'left lung' to the prompt")),
    Case("pathology_word_not_in_prompt", "CXRTextEncode",
         run_pipeline(text="chest x-ray, left lung, normal heart", boost={}),
         Error(TEXT, "text", "Add 'effusion' to the prompt")),
    Case("boost_word_not_in_token_map", "CXRPathologyBoost", partial(boost_target, words="pneumothorax=2"),
         Error(BOOST, "words", "List the word")),
    Case("boost_word_factor_not_a_number", "CXRPathologyBoost", partial(boost_target, words="effusion=lots"),
         Error(BOOST, "words", "effusion=3")),
    Case("boost_word_factor_nan", "CXRPathologyBoost", partial(boost_target, words="effusion=nan"),
         Error(BOOST, "words", "at most 50")),
    Case("boost_word_factor_inf", "CXRPathologyBoost", partial(boost_target, words="effusion=inf"),
         Error(BOOST, "words", "at most 50")),
    Case("prompt_over_75_tokens", "CXRTextEncode", run_pipeline(text=LONG_PROMPT, **ALL_STAGES), Works(FIT_LATENT)),
    Case("negative_longer_than_positive", "CXRPathologyBoost",
         run_pipeline(negative="blurry, noisy, " * 30, **ALL_STAGES), Works(FIT_LATENT)),
    Case("negative_over_4x_positive", "CXRAnatomyAttentionGate",
         run_pipeline(negative="blurry, noisy, " * 100, **ALL_STAGES), Works(FIT_LATENT)),
    # numbers at and beyond their bounds (NaN passes ComfyUI's range check: the pack must refuse it)
    Case("gate_organ_absent", "CXRAnatomyAttentionGate", run_pipeline(gate={"organs": "left_lung, clavicle"}),
         Error(GATE, "organs", "organs present")),
    Case("gate_anatomy_word_without_mask", "CXRAnatomyAttentionGate", anatomy_word_without_mask,
         Error(GATE, "tokens", "Tie the word to a present organ")),
    Case("gate_strengths_at_zero", "CXRAnatomyAttentionGate", run_pipeline(gate={"strength": 0, "token_strength": 0}),
         Works(FIT_LATENT)),
    Case("gate_strength_above_max", "CXRAnatomyAttentionGate", run_pipeline(gate={"strength": 1.01}),
         Bound("CXRAnatomyAttentionGate", "strength")),
    Case("gate_token_strength_below_min", "CXRAnatomyAttentionGate", run_pipeline(gate={"token_strength": -0.01}),
         Bound("CXRAnatomyAttentionGate", "token_strength")),
    Case("gate_strength_nan", "CXRAnatomyAttentionGate", run_pipeline(gate={"strength": NAN}),
         Error(GATE, "strength", "Use 0 (off) to 1")),
    Case("gate_window_nan", "CXRAnatomyAttentionGate", run_pipeline(gate={"end_percent": NAN}),
         Error(GATE, "end_percent", "between 0 and 1")),
    Case("boost_at_bounds", "CXRPathologyBoost", run_pipeline(boost={"factor": 50.0, "outside_damping": 0.0}),
         Works(FIT_LATENT)),
    Case("boost_factor_above_max", "CXRPathologyBoost", run_pipeline(boost={"factor": 50.5}),
         Bound("CXRPathologyBoost", "factor")),
    Case("boost_factor_nan", "CXRPathologyBoost", run_pipeline(boost={"factor": NAN}),
         Error(BOOST, "factor", "between 0.05 and 50")),
    Case("boost_damping_nan", "CXRPathologyBoost", run_pipeline(boost={"outside_damping": NAN}),
         Error(BOOST, "outside_damping", "between 0 and 1")),
    Case("capture_window_reversed", "CXRCaptureAttention", run_pipeline(capture={"start_percent": 0.9,
                                                                                 "end_percent": 0.1}),
         Error(CAPTURE, "start_percent", "start_percent ≤ end_percent")),
    Case("refine_step_size_at_max", "CXRRefinementSampler", partial(refine, step_size=5.0), Works(FIT_LATENT)),
    Case("refine_step_size_nan", "CXRRefinementSampler", partial(refine, step_size=NAN),
         Error(REFINE, "step_size", "between 0 and 5")),
    Case("refine_thresholds_garbage", "CXRRefinementSampler", partial(refine, thresholds="0.2:most"),
         Error(REFINE, "thresholds", "0:0.95")),
    Case("morph_size_nan", "CXRMorphOrgans", partial(morph, size_px=NAN), Error(MORPH, "size_px", "between 0 and 512")),
    Case("morph_erode_at_max", "CXRMorphOrgans", partial(morph, size_px=512.0), Works((1, 4, 8, 7))),
    Case("edit_margin_at_max", "CXREditKeepRegions", partial(regions, margin_px=512, feather_px=0.0, protect=""),
         Error(EDIT_KEEP, "margin_px", "smaller margin")),
    Case("edit_feather_at_max", "CXREditKeepRegions", partial(regions, feather_px=256.0), Works((1, 4, 8, 7))),
    Case("edit_feather_nan", "CXREditKeepRegions", partial(regions, feather_px=NAN),
         Error(EDIT_KEEP, "feather_px", "between 0 and 256")),
    Case("preview_opacity_nan", "CXRPreviewOrganMasks", partial(preview_opacity, opacity=NAN),
         Error("Preview Organ Masks", "opacity", "between 0 and 1")),
    Case("invert_start_at_one", "CXRInvertLatent", partial(invert, start_percent=1.0),
         Error("Invert Radiograph (DDIM)", "start_percent", "below 1")),
    Case("invert_empty_latent", "CXRInvertLatent", partial(invert, empty=True),
         Error("Invert Radiograph (DDIM)", "latent", "VAE Encode")),
    Case("invert_cfg_nan", "CXRInvertLatent", partial(invert, cfg=NAN),
         Error("Invert Radiograph (DDIM)", "cfg", "between 0 and 30")),
    Case("atlas_min_quality_at_one", "CXRAtlasOrgans", partial(atlas, min_quality=1.0),
         Error("Organ Masks from Atlas (approximate)", "image", "frontal (PA/AP)")),
    # corrupt files
    Case("dicom_works", "CXRLoadDICOM", partial(dicom, name="bi_rg1.dcm"), Works((1, 4, 8, 8))),
    Case("dicom_truncated", "CXRLoadDICOM", partial(dicom, name="bi_truncated.dcm"),
         Error(DICOM, "dicom_file", "Export the image again")),
    Case("dicom_header_bytes_flipped", "CXRLoadDICOM", partial(dicom, name="bi_header_flipped.dcm"),
         Error(DICOM, "dicom_file", "Pick the DICOM file of the radiograph")),
    Case("dicom_random_bytes", "CXRLoadDICOM", partial(dicom, name="bi_garbage.dcm"),
         Error(DICOM, "dicom_file", "DICOM Part 10 file")),
    Case("dicom_empty_file", "CXRLoadDICOM", partial(dicom, name="bi_empty.dcm"),
         Error(DICOM, "dicom_file", "DICOM Part 10 file")),
    Case("dicom_unknown_window", "CXRLoadDICOM", partial(dicom, name="bi_rg1.dcm", window="bone"),
         Error(DICOM, "window", "auto", "validate")),
    Case("loader_png16_works", "CXRLoadDICOM", partial(dicom, name="bi_cxr16.png"), Works(FIT_LATENT)),
    Case("loader_jpeg_through_atlas_works", "CXRLoadDICOM", partial(loader_atlas, name="bi_cxr.jpg"),
         Works(FIT_LATENT)),
    Case("loader_png_window", "CXRLoadDICOM", partial(dicom, name="bi_cxr16.png", window="window"),
         Error(DICOM, "window", "'auto'")),
    Case("loader_non_chest_png_at_the_atlas", "CXRAtlasOrgans", partial(loader_atlas, name="bi_extremity.png"),
         Error("Organ Masks from Atlas (approximate)", "image", "frontal (PA/AP)")),
    Case("loader_multi_frame_dicom_first_frame", "CXRLoadDICOM", partial(dicom, name="bi_frames.dcm"),
         Works((1, 4, 8, 8))),
    Case("loader_colour_dicom", "CXRLoadDICOM", partial(dicom, name="bi_rgb.dcm"),
         Error(DICOM, "dicom_file", "original grey radiograph")),
    Case("loader_one_pixel_png", "CXRLoadDICOM", partial(dicom, name="bi_one_pixel.png"),
         Error(DICOM, "dicom_file", "not a thumbnail")),
    Case("loader_truncated_jpeg", "CXRLoadDICOM", partial(dicom, name="bi_truncated.jpg"),
         Error(DICOM, "dicom_file", "download the radiograph again")),
    Case("loader_transparent_png", "CXRLoadDICOM", partial(dicom, name="bi_transparent.png"),
         Error(DICOM, "dicom_file", "without transparency")),
    Case("loader_decompression_bomb_png", "CXRLoadDICOM", partial(dicom, name="bi_bomb.png"),
         Error(DICOM, "dicom_file", "scale the image down")),
    Case("csv_works", "CXRLoadCheXmask", partial(chexmask, name="bi_rows.csv"), Works(FIT_LATENT)),
    Case("csv_random_bytes", "CXRLoadCheXmask", partial(chexmask, name="bi_garbage.csv"),
         Error(CHEXMASK, "csv_file", "Pick a CheXmask CSV")),
    Case("csv_header_only", "CXRLoadCheXmask", partial(chexmask, name="bi_header_only.csv"),
         Error(CHEXMASK, "image_id", "Copy the id exactly")),
    Case("csv_truncated_row", "CXRLoadCheXmask", partial(chexmask, name="bi_truncated.csv"),
         Error(CHEXMASK, "csv_file", "download it again")),
    Case("csv_bad_rle", "CXRLoadCheXmask", partial(chexmask, name="bi_bad_rle.csv"),
         Error(CHEXMASK, "csv_file", "fall back to the landmarks")),
    Case("csv_nan_dice", "CXRLoadCheXmask", partial(chexmask, name="bi_nan_dice.csv"),
         Error(CHEXMASK, "min_dice", "min_dice to 0")),
    Case("csv_min_dice_at_one", "CXRLoadCheXmask", partial(chexmask, name="bi_rows.csv", min_dice=1.0),
         Error(CHEXMASK, "min_dice", "Lower min_dice")),
    Case("segment_weights_missing", "CXRSegmentOrgans", segment,
         Error("Segment Organs (PSPNet)", "weights", "downloads nothing", "validate")),
    # wiring mistakes and names
    Case("select_no_organ", "CXRSelectOrgans", partial(mask_op, class_type="CXRSelectOrgans", organs=" , "),
         Error("Select Organs", "organs", "Name at least one organ")),
    Case("combine_invalid_name", "CXRCombineOrgans", partial(mask_op, class_type="CXRCombineOrgans",
                                                             organs="left_lung", subtract="heart", name="3rd rib"),
         Error("Combine Organs", "name", "starting with a letter")),
    Case("organ_to_mask_absent_organ", "CXROrganToMask", partial(mask_op, class_type="CXROrganToMask",
                                                                 organs="clavicle"),
         Error("Organ to MASK", "organs", "organs present")),
    Case("attention_preview_without_capture", "CXRAttentionPreview", attention_preview_without_capture,
         Error("CXR Attention Preview", "latent_1", "CXR Capture Attention")),
    Case("refinement_preview_plain_sampler", "CXRRefinementPreview", refinement_preview_plain_sampler,
         Error("CXR Refinement Preview", "latent", "CXR Refinement Sampler")),
    Case("paste_without_keep_region", "CXRPasteKeepRegion", paste_without_keep,
         Error("Paste Keep Region (exact)", "source", "Apply Keep Region")),
    Case("guider_on_plain_latent", "CXRInversionGuider", guider_not_inverted,
         Error("Inversion Guider (checked CFG)", "inverted", "Invert Radiograph")),
    Case("restore_image_of_other_size", "CXRRestoreNativeSize", partial(geometry, class_type="CXRRestoreNativeSize"),
         Error("Restore Native Size", "image", "the fit produced")),
    Case("composite_edit_of_other_size", "CXRCompositeNative", partial(geometry, class_type="CXRCompositeNative"),
         Error("Composite Edit onto Radiograph (native size)", "edited", "VAE Decode")),
    Case("export_image_of_other_size", "CXRExportCounterfactual",
         partial(geometry, class_type="CXRExportCounterfactual"),
         Error("Export Counterfactual (native size)", "image", "decoded edit")),
    Case("save_metrics_outside_output", "CXRSaveMetrics", save_metrics_outside,
         Error("CXR Save Metrics", "filename_prefix", "relative prefix")),
]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
