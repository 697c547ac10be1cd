"""How well a counterfactual edit kept the patient and placed the change: metrics of one image pair.

Every metric is computed on grey images (the mean of the RGB channels, values in [0, 1]) and, where a
region is involved, on the **binary** regions ``edit = edit_region ≥ 0.5`` and ``keep = not edit``: a
feathered border pixel belongs to the side holding most of its weight. The formulas (also written into the
saved JSON, see :data:`DEFINITIONS`):

- ``keep_ssim``: the SSIM map of kornia (``kornia.metrics.ssim``, 11×11 Gaussian window σ 1.5, data range 1,
  reflect padding, ``eps=0`` so identical images score exactly 1) averaged over keep pixels. The window
  reaches 5 px, so keep pixels that close to the edit region also see edited pixels.
- ``keep_psnr_db``: ``kornia.metrics.psnr`` (data range 1) of the keep pixels alone, i.e. 10·log10(1 / MSE
  over keep pixels), capped at :data:`PSNR_CAP_DB` (identical pixels would give +inf, which JSON cannot hold).
- ``keep_mad`` / ``edit_mad``: mean |edited − source| over keep / edit pixels.
- ``change_in_edit_share``: Σ|Δ| over edit pixels ÷ Σ|Δ| over all pixels (1 = every change is where it was
  asked for); None when nothing changed.
- ``organ_mad``: mean |Δ| inside each organ (mask ≥ 0.5).
- ``organ_dice``: per organ, Dice of the source's mask and the edit's mask (both ≥ 0.5), from kornia's IoU
  (``kornia.metrics.mean_iou``) as Dice = 2·IoU / (1 + IoU), exact for two binary masks.
- attention IoU (:func:`attention_iou`): IoU of the binarised pathology attention map and the edit region on
  the captured token grid.

A metric whose region is empty is None (shown as "n/a").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import kornia
import torch
import torch.nn.functional as F
from einops import reduce

from ..attention.organs import OrganMasks, aspect_matches
from ..attention.regions import fit_to_layer
from ..errors import CXRInputError
from .classifier import ClassifierView

PSNR_CAP_DB = 100.0  # MSE 1e-10: identical up to float rounding
SSIM_WINDOW = 11
REGION_THRESHOLD = 0.5
REGION_NAMES = ("edit", "keep")  # the regions Edit / Keep Regions adds to a bundle: not organs

DEFINITIONS: dict[str, str] = {
    "grey": "metrics use the mean of the RGB channels, values in [0, 1]",
    "regions": "edit = edit_region >= 0.5 (resampled to the image grid), keep = the other pixels",
    "keep_ssim": "kornia.metrics.ssim map (11x11 Gaussian window, sigma 1.5, data range 1, eps 0) averaged over "
    "keep pixels",
    "keep_psnr_db": f"kornia.metrics.psnr over keep pixels: 10*log10(1/MSE_keep), capped at {PSNR_CAP_DB:g} dB",
    "keep_mad": "mean |edited - source| over keep pixels",
    "edit_mad": "mean |edited - source| over edit pixels",
    "change_in_edit_share": "sum |edited - source| over edit pixels / sum over all pixels (null: no change)",
    "edit_fraction": "share of the image's pixels in the edit region",
    "organ_mad_<organ>": "mean |edited - source| inside the organ's source mask (>= 0.5)",
    "organ_dice_<organ>": "Dice of the organ's source mask and edit mask (>= 0.5), 2*IoU/(1+IoU) from "
    "kornia.metrics.mean_iou",
    "attention_iou_<label>": "IoU (kornia.metrics.mean_iou) of the pathology words' captured cross-attention "
    "(mean over layers and steps, >= threshold x its maximum) and the edit region covering >= half a token cell",
    "classifier": "TorchXRayVision DenseNet-121 (18 pathologies) on source and edit: grey x in [0, 1] -> "
    "(2x - 1) * 1024, long side centre-cropped to a square, bilinear anti-aliased resize to 224 x 224; probability "
    "= sigmoid(logit), operating-point normalised (0.5 = the pathology's operating point) when the weights carry "
    "op_threshs (the JSON's classifier.calibrated)",
    "classifier_target_source": "classifier probability of the target pathology (classifier.target) on the source",
    "classifier_target_edit": "classifier probability of the target pathology on the edit",
    "classifier_target_delta": "classifier_target_edit - classifier_target_source",
    "classifier_off_target_max_abs_delta": "largest |edit - source| classifier probability change over the 17 "
    "pathologies other than the target",
    "classifier_<pathology>_source": "classifier probability of the pathology on the source (name lower case, other "
    "characters _)",
    "classifier_<pathology>_edit": "classifier probability of the pathology on the edit",
    "classifier.features": "per pair, the DenseNet's 1024-d pooled features (ReLU, global average pool) of source "
    "and edit: the input of FID-style set distances",
}


@dataclass(frozen=True)
class PairMetrics:
    """Metrics of one (source, edited) pair; see the module doc for each definition."""

    keep_ssim: float | None
    keep_psnr_db: float | None
    keep_mad: float | None
    edit_mad: float | None
    change_in_edit_share: float | None
    edit_fraction: float
    organ_mad: dict[str, float] = field(default_factory=dict)
    organ_dice: dict[str, float] = field(default_factory=dict)
    classifier: dict[str, float] = field(default_factory=dict)

    def as_row(self) -> dict[str, float | None]:
        """One flat row (CSV / JSON): the scalar metrics, then ``organ_mad_<organ>``, ``organ_dice_<organ>``,
        the ``classifier_*`` probabilities."""
        row: dict[str, float | None] = {
            "keep_ssim": self.keep_ssim, "keep_psnr_db": self.keep_psnr_db, "keep_mad": self.keep_mad,
            "edit_mad": self.edit_mad, "change_in_edit_share": self.change_in_edit_share,
            "edit_fraction": self.edit_fraction,
        }
        row.update({f"organ_mad_{k}": v for k, v in self.organ_mad.items()})
        row.update({f"organ_dice_{k}": v for k, v in self.organ_dice.items()})
        row.update(self.classifier)
        return row


@dataclass(frozen=True)
class MetricsReport:
    """What the evaluation node passes on (the ``CXR_METRICS`` link type): one row per image pair.

    Attributes:
        pairs: metrics of each pair, in batch order.
        attention_iou: capture label → IoU of the pathology attention and the edit region (same for every pair).
        attention_threshold: fraction of the attention map's maximum used to binarise it.
        classifier: the classifier, target and per-pair features when a classifier scored the pairs.
    """

    pairs: tuple[PairMetrics, ...]
    attention_iou: dict[str, float] = field(default_factory=dict)
    attention_threshold: float | None = None
    classifier: ClassifierView | None = None

    def rows(self) -> list[dict[str, float | None]]:
        """Flat rows: ``image`` index, the pair's metrics and ``attention_iou_<label>``."""
        extra = {f"attention_iou_{k}": v for k, v in self.attention_iou.items()}
        return [{"image": i, **p.as_row(), **extra} for i, p in enumerate(self.pairs)]


def grey(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` → ``[B, 1, H, W]`` float32: the mean of the colour channels."""
    return reduce(image[..., :3].float(), "b h w c -> b 1 h w", "mean").cpu()


def region_on(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A MASK (``[H, W]`` or ``[B, H, W]``, same aspect ratio) as ``[B, height, width]`` bool: ≥ 0.5.

    Raises:
        CXRInputError: the mask shows another field of view (aspect ratio differs).
    """
    m = mask.reshape(-1, *mask.shape[-2:]).float().cpu()
    if not bool(torch.isfinite(m).all()):
        raise CXRInputError("the mask contains NaN or infinite values.",
                            fix="Fix the node that made the MASK (values must be 0 to 1).")
    mh, mw = int(m.shape[-2]), int(m.shape[-1])
    if (mh, mw) != (height, width):
        if not aspect_matches(mh, mw, height, width):
            raise CXRInputError(
                f"the mask is {mh}×{mw} (H×W) but the images are {height}×{width}: another field of view.",
                fix="Use the edit region made for these images (Restore Native Size brings a fitted mask back "
                "to native size; the fitted grid needs the fitted images).",
            )
        m = F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return m >= REGION_THRESHOLD


def _mean_over(x: torch.Tensor, region: torch.Tensor) -> float | None:
    return float(x[region].mean()) if bool(region.any()) else None


def keep_ssim(source: torch.Tensor, edited: torch.Tensor, keep: torch.Tensor) -> float | None:
    """Mean of kornia's SSIM map over ``keep`` (``[H, W]`` bool) for ``[1, 1, H, W]`` images in [0, 1]."""
    if source.shape[-2] <= SSIM_WINDOW // 2 or source.shape[-1] <= SSIM_WINDOW // 2:
        raise CXRInputError(
            f"the images are {tuple(source.shape[-2:])}: too small for SSIM's {SSIM_WINDOW}×{SSIM_WINDOW} window.",
            fix="Evaluate images of at least 6×6 pixels.",
        )
    ssim_map = kornia.metrics.ssim(source, edited, SSIM_WINDOW, max_val=1.0, eps=0.0, padding="same")
    return _mean_over(ssim_map[0, 0], keep)


def keep_psnr(source: torch.Tensor, edited: torch.Tensor, keep: torch.Tensor) -> float | None:
    """kornia's PSNR (data range 1) of the pixels in ``keep``, capped at :data:`PSNR_CAP_DB`."""
    if not bool(keep.any()):
        return None
    value = float(kornia.metrics.psnr(edited[0, 0][keep], source[0, 0][keep], 1.0))
    return PSNR_CAP_DB if math.isinf(value) or value > PSNR_CAP_DB else value


def change_in_region_share(delta: torch.Tensor, region: torch.Tensor) -> float | None:
    """Σ|Δ| inside ``region`` ÷ Σ|Δ| everywhere; None when nothing changed."""
    change = delta.abs().double()  # float64 sums: a share of 1 must come out as exactly 1
    total = float(change.sum())
    return float(change[region].sum()) / total if total > 0 else None


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two bool masks of one shape (``kornia.metrics.mean_iou``, class 1); both empty → 1 (they agree)."""
    value = float(kornia.metrics.mean_iou(a.long().reshape(1, -1), b.long().reshape(1, -1), 2, eps=0.0)[0, 1])
    return 1.0 if math.isnan(value) else value


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two bool masks of one shape, from their IoU: 2·IoU / (1 + IoU) (both empty → 1)."""
    j = iou(a, b)
    return 2.0 * j / (1.0 + j)


def organ_names(masks: OrganMasks) -> list[str]:
    return [n for n in masks.names if n not in REGION_NAMES]


def dice_per_organ(reference: OrganMasks, other: OrganMasks, height: int, width: int) -> dict[str, float]:
    """Dice of each organ present in both bundles, on the ``height×width`` grid (masks ≥ 0.5).

    Raises:
        CXRInputError: no organ in common, or a bundle with another field of view.
    """
    common = [n for n in organ_names(reference) if n in other.names]
    if not common:
        raise CXRInputError(
            f"no organ in common (source: {', '.join(organ_names(reference))}; edit: {', '.join(other.names)}).",
            fix="Make the edit's masks with the same mask node (same organ names) as the source's.",
        )
    ref = reference.select(common).resampled(height, width, mode="bilinear").data >= REGION_THRESHOLD
    oth = other.select(common).resampled(height, width, mode="bilinear").data >= REGION_THRESHOLD
    return {name: dice(ref[i], oth[i]) for i, name in enumerate(common)}


def evaluate_pair(source: torch.Tensor, edited: torch.Tensor, edit: torch.Tensor,
                  organ_masks: OrganMasks | None = None, edit_organ_masks: OrganMasks | None = None) -> PairMetrics:
    """Metrics of one pair.

    Args:
        source, edited: ``[1, 1, H, W]`` grey images in [0, 1] (see :func:`grey`).
        edit: ``[H, W]`` bool edit region (see :func:`region_on`).
        organ_masks: the source's organs (any grid of the same aspect): per-organ change, Dice reference.
        edit_organ_masks: the edit's organs, for Dice (needs ``organ_masks``).
    """
    h, w = int(source.shape[-2]), int(source.shape[-1])
    keep = ~edit
    delta = (edited - source)[0, 0]
    organ_mad: dict[str, float] = {}
    organ_dice: dict[str, float] = {}
    if organ_masks is not None:
        names = organ_names(organ_masks)
        if names:
            inside = organ_masks.select(names).resampled(h, w, mode="bilinear").data >= REGION_THRESHOLD
            organ_mad = {n: v for n, v in ((n, _mean_over(delta.abs(), inside[i])) for i, n in enumerate(names))
                         if v is not None}
        if edit_organ_masks is not None:
            organ_dice = dice_per_organ(organ_masks, edit_organ_masks, h, w)
    return PairMetrics(
        keep_ssim=keep_ssim(source, edited, keep),
        keep_psnr_db=keep_psnr(source, edited, keep),
        keep_mad=_mean_over(delta.abs(), keep),
        edit_mad=_mean_over(delta.abs(), edit),
        change_in_edit_share=change_in_region_share(delta, edit),
        edit_fraction=float(edit.float().mean()),
        organ_mad=organ_mad,
        organ_dice=organ_dice,
    )


def attention_iou(attention: torch.Tensor, edit_region: torch.Tensor, latent: tuple[int, int],
                  threshold: float = 0.5) -> float:
    """IoU of a captured attention map and the edit region on the map's token grid.

    Args:
        attention: ``[h, w]`` map (e.g. the pathology words' attention, mean over layers and steps).
        edit_region: ``[H, W]`` soft mask with the latent's aspect ratio (the fitted grid).
        latent: the latent's ``(H, W)``: coarse grids of odd latents overhang the image, so the region is
            padded, not stretched, exactly as the gate maps organs (:func:`fit_to_layer`).
        threshold: a token is "attended" when its value is ≥ threshold × the map's maximum.

    Raises:
        CXRInputError: the region shows another field of view than the latent.
    """
    h, w = int(attention.shape[-2]), int(attention.shape[-1])
    if not aspect_matches(int(edit_region.shape[-2]), int(edit_region.shape[-1]), *latent):
        raise CXRInputError(
            f"the edit region is {edit_region.shape[-2]}×{edit_region.shape[-1]} (H×W) but the latent is "
            f"{latent[0]}×{latent[1]}: the attention maps cover the fitted grid, the region another field of view.",
            fix="Use the edit region made from the fitted organ masks (Fit Radiograph to Model's).",
        )
    region = OrganMasks(("edit",), edit_region.float().cpu().clamp(0, 1)[None])
    target = fit_to_layer(region, h, w, latent).to_grid(h, w)[0] >= REGION_THRESHOLD
    att = attention.float().cpu()
    attended = att >= threshold * float(att.max()) if float(att.max()) > 0 else torch.zeros_like(target)
    return iou(attended, target)
