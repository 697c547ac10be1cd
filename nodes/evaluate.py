"""Evaluation nodes: how well an edit kept the patient and placed the change, and saving those metrics."""

from __future__ import annotations

from dataclasses import replace

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from ..attention.mask_batch import AnyOrganMasks, check_mask_count, each_image, mask_count, sample_masks
from ..attention.run_state import find_run
from ..attention.tokens import TokenMap
from ..errors import CXRInputError
from ..hosts.comfy.patch import result_store
from ..imaging import classifier as clf
from ..imaging.export import exclusive_paths, write_new
from ..imaging.metrics import (
    MetricsReport,
    PairMetrics,
    attention_iou,
    dice_per_organ,
    evaluate_pair,
    grey,
    region_on,
)
from ..imaging.metrics_report import difference_heat_map, format_table, to_csv, to_json
from .common import check_inputs, output_location, user_errors
from .schema import (
    CATEGORY_INSPECT,
    CATEGORY_OUTPUT,
    ClassifierType,
    MetricsType,
    OrganMasksType,
    TokensType,
    described,
    fraction_input,
)


def _pair_batches(title: str, source: torch.Tensor, edited: torch.Tensor) -> int:
    """The number of pairs: equal batches, or one side of batch 1 used for every image of the other."""
    if tuple(source.shape[1:3]) != tuple(edited.shape[1:3]):
        raise CXRInputError(
            f"the edited image is {edited.shape[1]}×{edited.shape[2]} but the source is "
            f"{source.shape[1]}×{source.shape[2]}.", node=title, input_name="edited",
            fix="Compare images on one grid: both fitted (the fitted source and the decoded edit), or both at "
            "native size (Restore Native Size on the edit).")
    b1, b2 = source.shape[0], edited.shape[0]
    if b1 != b2 and 1 not in (b1, b2):
        raise CXRInputError(f"batch sizes {b1} (source) and {b2} (edited) do not pair up.", node=title,
                            input_name="edited", fix="Use one source image, or as many sources as edits.")
    return max(b1, b2)


class CXREvaluateEdit(io.ComfyNode):
    """Measures an edit against its source: preservation outside the edit region (SSIM, PSNR and mean |difference|
    over keep pixels, from kornia), how much of the change lies inside the edit region, per-organ change, organ Dice
    against masks of the edit, the IoU of the pathology words' attention with the edit region when a capture
    exists, and, with a classifier (CXR Load Classifier), its view: the target pathology's probability on source and
    edit, the largest change on the other 17, and 1024-d features for set-level distances. Shows a table and a
    difference heat map."""

    TITLE = "CXR Evaluate Edit"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXREvaluateEdit", display_name=cls.TITLE, category=CATEGORY_INSPECT, is_output_node=True,
            description=described(cls),
            inputs=[
                io.Image.Input("source", tooltip="The source radiograph (same grid as the edit: fitted or native)."),
                io.Image.Input("edited", tooltip="The edited radiograph (e.g. VAE Decode of the sampler's LATENT)."),
                io.Mask.Input("edit_region", tooltip="'edit_region' of Edit / Keep Regions (resampled to the images "
                              "when it has their aspect ratio); keep = the pixels where it is below 0.5."),
                OrganMasksType.Input("organ_masks", optional=True,
                                     tooltip="The source's organ masks: change per organ, and the Dice reference. "
                                     "For a batch: one set per image pair, or one set they share."),
                OrganMasksType.Input("edit_organ_masks", optional=True,
                                     tooltip="Organ masks of the edited image (e.g. the atlas or segmentation node run "
                                     "on it): Dice per organ against 'organ_masks'. For a batch: one set per "
                                     "edited image, or one set."),
                io.Model.Input("model", optional=True,
                               tooltip="The model with CXR Capture Attention, for the attention–target IoU."),
                io.Latent.Input("latent", optional=True, tooltip="The LATENT of the sampler that used 'model'."),
                TokensType.Input("tokens", optional=True, tooltip="From CXR Text Encode: the pathology words whose "
                                 "attention is measured."),
                io.Float.Input("attention_threshold", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="A token counts as attended when its pathology attention is at least this "
                               "fraction of the map's maximum."),
                fraction_input("heat_scale", 0.0,
                               "|difference| drawn at full colour; 0 = each pair's largest difference."),
                ClassifierType.Input("classifier", optional=True,
                                     tooltip="From CXR Load Classifier: scores source and edit (the target "
                                     "pathology's probability before/after, the change on the other 17, 1024-d "
                                     "features in the JSON)."),
                io.String.Input("target_pathology", default="", optional=True,
                                tooltip="The classifier's target, e.g. effusion, pneumothorax, cardiomegaly (one "
                                f"of: {', '.join(clf.PATHOLOGIES)}); empty = the connected tokens' pathology "
                                "words."),
            ],
            outputs=[
                io.Image.Output(display_name="heat_map", tooltip="edited − source over the dimmed source (red "
                                "brighter, blue darker), the edit region outlined in yellow."),
                MetricsType.Output(display_name="metrics", tooltip="The metrics, for CXR Save Metrics."),
                io.String.Output(display_name="json", tooltip="The metrics and their definitions as JSON text."),
            ],
        )

    @classmethod
    def execute(cls, source: torch.Tensor, edited: torch.Tensor, edit_region: torch.Tensor,
                attention_threshold: float = 0.5, heat_scale: float = 0.0, organ_masks: AnyOrganMasks | None = None,
                edit_organ_masks: AnyOrganMasks | None = None, model=None, latent: dict | None = None,
                tokens: TokenMap | None = None, classifier: clf.Classifier | None = None,
                target_pathology: str = "") -> io.NodeOutput:
        check_inputs(cls, attention_threshold=attention_threshold, heat_scale=heat_scale)
        n = _pair_batches(cls.TITLE, source, edited)
        target = cls._target(classifier, target_pathology, tokens)
        if edit_organ_masks is not None and organ_masks is None:
            raise CXRInputError("Dice needs the source's masks too.", node=cls.TITLE, input_name="organ_masks",
                                fix="Connect the source's organ masks, or disconnect 'edit_organ_masks'.")
        if organ_masks is not None:
            check_mask_count(organ_masks, n, node=cls.TITLE)
        if edit_organ_masks is not None:
            check_mask_count(edit_organ_masks, n, node=cls.TITLE, input_name="edit_organ_masks")
        h, w = int(source.shape[1]), int(source.shape[2])
        with user_errors(cls.TITLE, "edit_region"):
            regions = region_on(edit_region, h, w)
        if regions.shape[0] not in (1, n):
            raise CXRInputError(f"{regions.shape[0]} edit regions for {n} image pairs.", node=cls.TITLE,
                                input_name="edit_region", fix="Use one edit region, or one per image.")
        src, edt = grey(source), grey(edited)
        def dice_of(i: int) -> dict[str, float]:
            source_masks, edit_masks = sample_masks(organ_masks, i), sample_masks(edit_organ_masks, i)
            with user_errors(cls.TITLE, "organ_masks"):
                source_masks.resampled(h, w)  # a field-of-view mismatch is the source masks' fault, not the edit's
            with user_errors(cls.TITLE, "edit_organ_masks"):
                return dice_per_organ(source_masks, edit_masks, h, w)

        dices = None  # one Dice per pair of mask sets (a shared pair is measured once)
        if organ_masks is not None and edit_organ_masks is not None:
            dices = each_image(range(max(mask_count(organ_masks), mask_count(edit_organ_masks))), dice_of)
        pairs, maps = [], []
        for i in range(n):
            s, e = src[min(i, len(src) - 1)][None], edt[min(i, len(edt) - 1)][None]
            r = regions[min(i, len(regions) - 1)]
            masks = None if organ_masks is None else sample_masks(organ_masks, i)
            with user_errors(cls.TITLE, "organ_masks"):
                pair = evaluate_pair(s, e, r, masks)
            pairs.append(replace(pair, organ_dice=dices[min(i, len(dices) - 1)]) if dices is not None else pair)
            maps.append(difference_heat_map(s, e, r, heat_scale))
        ious = cls._attention(model, latent, tokens, edit_region, attention_threshold)
        view = None
        if classifier is not None and target is not None:
            pairs, view = cls._classify(classifier, target, source, edited, pairs)
        report = MetricsReport(tuple(pairs), ious, attention_threshold if ious else None, view)
        heat = torch.stack(maps)
        table = format_table(report)
        ui_out = {**ui.PreviewImage(heat, cls=cls).as_dict(), "text": (table,)}
        return io.NodeOutput(heat, report, to_json(report), ui=ui_out)

    @classmethod
    def validate_inputs(cls, target_pathology: str = "") -> bool | str:
        if target_pathology and target_pathology.strip():
            try:
                clf.resolve_target(target_pathology)
            except CXRInputError as err:
                return str(err.located(cls.TITLE))
        return True

    @classmethod
    def _target(cls, classifier: clf.Classifier | None, typed: str, tokens: TokenMap | None) -> str | None:
        """The classifier's target pathology: the typed one, else the tokens' pathology words (None without a
        classifier); checked before anything is computed."""
        if classifier is None:
            return None
        if not isinstance(classifier, clf.Classifier):
            raise CXRInputError("this is not a classifier.", node=cls.TITLE, input_name="classifier",
                                fix="Connect the output of CXR Load Classifier.")
        if typed and typed.strip():
            with user_errors(cls.TITLE, "target_pathology"):
                return clf.resolve_target(typed)
        if tokens is None or not tokens.pathology:
            raise CXRInputError("the classifier needs a target pathology.", node=cls.TITLE,
                                input_name="target_pathology",
                                fix=f"Type one ({', '.join(clf.PATHOLOGIES)}), or connect CXR Text Encode's tokens "
                                "with pathology words (e.g. effusion).")
        with user_errors(cls.TITLE, "tokens"):
            return clf.resolve_target(tokens.pathology, input_name="tokens")

    @classmethod
    def _classify(cls, classifier: clf.Classifier, target: str, source: torch.Tensor, edited: torch.Tensor,
                  pairs: list[PairMetrics]) -> tuple[list[PairMetrics], clf.ClassifierView]:
        """Each pair's classifier metrics, and the JSON block with each pair's features."""
        with user_errors(cls.TITLE, "classifier"):  # one batch: an unchanged image scores as its source
            both = clf.classify(classifier, torch.cat([source[..., :3], edited[..., :3]]), mm.get_torch_device())
        b = len(source)
        scored, features = [], []
        for i, pair in enumerate(pairs):
            s, e = min(i, b - 1), b + min(i, len(edited) - 1)
            probs, feats = both.probabilities, both.features
            scores = clf.pair_scores(probs[s].tolist(), probs[e].tolist(), target, classifier.pathologies)
            scored.append(replace(pair, classifier=scores))
            features.append({"source": feats[s].tolist(), "edit": feats[e].tolist()})
        view = clf.ClassifierView(classifier.weights, classifier.sha256, target, classifier.calibrated,
                                  classifier.pathologies, tuple(features))
        return scored, view

    @classmethod
    def _attention(cls, model, latent: dict | None, tokens: TokenMap | None, edit_region: torch.Tensor,
                   threshold: float) -> dict[str, float]:
        """Capture label → IoU of the pathology words' mean attention and the edit region ({} without a run)."""
        if model is None and latent is None:
            return {}
        if model is None or latent is None:
            raise CXRInputError("the attention IoU needs both the model and its sampler's LATENT.", node=cls.TITLE,
                                input_name="model" if model is None else "latent", fix="Connect both, or neither.")
        if tokens is None or not tokens.pathology:
            raise CXRInputError("no pathology word to measure.", node=cls.TITLE, input_name="tokens",
                                fix="Connect CXR Text Encode's tokens with pathology words (e.g. effusion).")
        record = find_run(result_store(model), latent["samples"], "capture", source="model",
                          node=cls.TITLE, input_name="latent",
                          problem="the model and LATENT are of a run that captured no attention",
                          fix="Put CXR Capture Attention on the model the sampler used and wire that sampler's "
                          "LATENT (or disconnect both).")
        lat = tuple(int(v) for v in latent["samples"].shape[-2:])
        region = edit_region.reshape(-1, *edit_region.shape[-2:])[0]
        ious: dict[str, float] = {}
        for label, capture in record.capture.items():
            word_maps, _ = capture.mean_maps()
            found = [word_maps[wd] for wd in tokens.pathology if wd in word_maps]
            if not found:
                raise CXRInputError(f"the capture '{label}' holds no map of {', '.join(tokens.pathology)}.",
                                    node=cls.TITLE, input_name="tokens",
                                    fix="Connect the same tokens to CXR Capture Attention and to this node.")
            with user_errors(cls.TITLE, "edit_region"):
                ious[label] = attention_iou(sum(found), region, (lat[0], lat[1]), threshold)
        return ious


class CXRSaveMetrics(io.ComfyNode):
    """Saves the metrics of CXR Evaluate Edit as JSON (with every metric's definition) and CSV (one row per image
    pair) in ComfyUI's output folder, numbered like Save Image; never overwrites a file."""

    TITLE = "CXR Save Metrics"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CXRSaveMetrics", display_name=cls.TITLE, category=CATEGORY_OUTPUT, is_output_node=True,
            description=described(cls),
            inputs=[
                MetricsType.Input("metrics", tooltip="From CXR Evaluate Edit."),
                io.String.Input("filename_prefix", default="cxr_counterfactual/metrics",
                                tooltip="Subfolder and file prefix in ComfyUI's output folder (as in Save Image)."),
            ],
            outputs=[io.String.Output(display_name="files",
                                      tooltip="The files written, relative to the output folder.")],
        )

    @classmethod
    def execute(cls, metrics: MetricsReport, filename_prefix: str) -> io.NodeOutput:
        if not isinstance(metrics, MetricsReport):
            raise CXRInputError("this is not a metrics report.", node=cls.TITLE, input_name="metrics",
                                fix="Connect the 'metrics' output of CXR Evaluate Edit.")
        folder, stem, counter, subfolder = output_location(cls.TITLE, filename_prefix, 0, 0)
        _, paths = exclusive_paths(folder, stem, counter, (".json", ".csv"))
        write_new(paths[".json"], to_json(metrics).encode("utf-8"))
        write_new(paths[".csv"], to_csv(metrics).encode("utf-8"))
        files = "\n".join(f"{subfolder}/{p.name}" if subfolder else p.name for p in paths.values())
        return io.NodeOutput(files, ui={"text": (files,)})


NODES: list[type[io.ComfyNode]] = [CXREvaluateEdit, CXRSaveMetrics]
