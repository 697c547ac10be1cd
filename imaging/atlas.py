"""Weight-free, approximate lung and heart masks: a CheXmask shape atlas registered to the radiograph.

The atlas (``assets/atlas_mean_shape.json``, built by ``tools/build_atlas.py`` from CheXmask landmark rows)
is a point-distribution model: a mean outline of the right lung, left lung and heart (120 points), PCA
modes of shape variation, and the spread of poses in the training radiographs.

The fit moves the outline (pose: scale, rotation, translation, slight anisotropy; mode coefficients) so
that, on the rank-equalised radiograph, each lung's border is dark inside and bright outside (ribs,
mediastinum, diaphragm), the lungs are dark, and the heart's border is bright inside; Gaussian priors keep
pose and shape plausible. Every term is a line integral along the outline (region means via Green's
theorem on a cumulative image), so an evaluation samples a few thousand points instead of rendering masks.
A coarse pose grid picks the starts; Adam refines them coarse-to-fine. About 1–2 s on a CPU.

The masks are approximate by construction (a statistical outline, no appearance model). A radiograph the
atlas cannot fit (not a frontal chest image, an inverted one, uniform or noise) gets a low fit quality and
is rejected rather than returned.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from ..attention.organs import OrganMasks
from ..errors import CXRInputError
from .atlas_image import equalise, pyramid_level, sample_points, square_frame
from .mask_files import polygons_to_masks

LOG = logging.getLogger(__name__)
ATLAS_PATH = Path(__file__).resolve().parent.parent / "assets" / "atlas_mean_shape.json"
LUNGS = ("right_lung", "left_lung")
# Below this quality the fit is rejected. Measured: chest radiographs 0.79–0.99 (the CheXmask example,
# also cropped into its lungs, NIH 00000001_000, pydicom's RG1); an extremity radiograph, an inverted
# chest, photographs and silhouettes 0.03–0.38; uniform, noise and gradient images 0.
DEFAULT_MIN_QUALITY = 0.5
# Contrasts (equalised grey-level ranks, 0–1) of a fully convincing fit: the chest radiographs above
# measure lung border contrast 0.25–0.37 and heart-minus-lung brightness 0.44–0.58.
EDGE_REF = 0.3
BRIGHTNESS_REF = 0.45
# A border sample agrees when it is darker inside than outside by this much (ranks).
AGREE_MIN = 0.05


@dataclass(frozen=True)
class ShapeAtlas:
    """The point-distribution model, as stored in the JSON asset.

    Attributes:
        mean: ``[P, 2]`` mean outline in the canonical frame (centroid 0, RMS radius 1).
        modes: ``[K, P, 2]`` orthonormal shape modes; ``mode_std`` their standard deviations ``[K]``.
        pose_mean, pose_std: ``[4]`` (log scale, rotation, tx, ty) of the training shapes in the square
            frame ``[0, 1]²`` of their radiographs.
        organs: organ name → ``(first, end)`` point index range (right/left: the patient's sides).
    """

    mean: np.ndarray
    modes: np.ndarray
    mode_std: np.ndarray
    pose_mean: np.ndarray
    pose_std: np.ndarray
    organs: dict[str, tuple[int, int]]


@functools.lru_cache(maxsize=4)
def load_atlas(path: Path = ATLAS_PATH) -> ShapeAtlas:
    """Read the atlas JSON (cached). Arrays stay numpy: tensors are made per fit, outside inference mode."""
    spec = json.loads(Path(path).read_text())
    arr = lambda key: np.asarray(spec[key], dtype=np.float32)  # noqa: E731
    organs = {name: (int(i), int(j)) for name, (i, j) in spec["organs"].items()}
    return ShapeAtlas(arr("mean"), arr("modes"), arr("mode_std"), arr("pose_mean"), arr("pose_std"), organs)


@dataclass(frozen=True)
class FitConfig:
    """Registration settings (frame units: the radiograph padded to a square is ``[0, 1]²``).

    Attributes:
        working_size: side of the square working image in pixels.
        stages: ``(blur sigma, iterations, learning rate)`` per coarse-to-fine stage.
        edge_offsets: distances inside/outside the outline at which the border contrast is sampled.
        n_starts: best coarse-grid poses refined in parallel; the lowest final energy wins.
        dark_weight, heart_weight, shape_weight, pose_weight, aniso_weight: energy weights.
    """

    working_size: int = 256
    stages: tuple[tuple[float, int, float], ...] = ((4 / 256, 80, 0.01), (2 / 256, 60, 0.005), (1 / 256, 40, 0.003))
    edge_offsets: tuple[float, ...] = (2 / 256, 4 / 256, 6 / 256)
    n_starts: int = 4
    dark_weight: float = 0.5
    heart_weight: float = 0.3
    shape_weight: float = 0.02
    pose_weight: float = 0.02
    aniso_weight: float = 0.01
    # Coarse grid: offsets from the mean pose in log scale, x and y.
    grid_scale: tuple[float, ...] = (-0.2, -0.1, 0.0, 0.1, 0.2, 0.3)
    grid_x: tuple[float, ...] = (-0.06, -0.03, 0.0, 0.03, 0.06)
    grid_y: tuple[float, ...] = (-0.08, -0.04, 0.0, 0.04, 0.08)


@dataclass(frozen=True)
class AtlasFit:
    """The registered outline and how well it fits.

    Attributes:
        outlines: organ → ``[n, 2]`` outline points (x, y) in the radiograph's pixels.
        height, width: the radiograph's size.
        quality: 0–1 (see :func:`fit_quality`); 1 = as convincing as a normal chest radiograph.
        edge_contrast: lung → mean (outside − inside) rank contrast across its border.
        border_agreement: lung → fraction of its border that is darker inside than outside.
        brightness_gap: mean rank inside the heart minus mean rank inside the lungs.
        seconds: time the fit took.
    """

    outlines: dict[str, np.ndarray]
    height: int
    width: int
    quality: float
    edge_contrast: dict[str, float]
    border_agreement: dict[str, float]
    brightness_gap: float
    seconds: float

    def masks(self) -> OrganMasks:
        """The outlines rasterised at the radiograph's size (hard 0/1 masks)."""
        polys = {name: pts.tolist() for name, pts in self.outlines.items()}
        return polygons_to_masks(polys, self.height, self.width)

    def report(self, min_quality: float = DEFAULT_MIN_QUALITY) -> str:
        """One line for users: quality, threshold, the measures behind it, and that the masks are approximate."""
        verdict = "accepted" if self.quality >= min_quality else "REJECTED"
        per_lung = lambda d: ", ".join(f"{k.replace('_lung', '')} {v:.2f}" for k, v in d.items())  # noqa: E731
        return (
            f"Atlas fit quality {self.quality:.2f} ({verdict}, threshold {min_quality:.2f}). Lung borders darker "
            f"inside: {per_lung(self.border_agreement)} of their length (typical ≥ 0.9); border contrast "
            f"{per_lung(self.edge_contrast)} (typical ≥ {EDGE_REF:.2f}); heart minus lung brightness "
            f"{self.brightness_gap:.2f} (typical ≥ {BRIGHTNESS_REF:.2f}); {self.seconds:.1f} s. Approximate masks "
            "from a CheXmask mean shape, not a segmentation: check the overlay."
        )


# --------------------------------------------------------------------------------------------------
# the model and its energy
class _Model:
    """Atlas tensors for one fit (created outside inference mode so autograd can save them)."""

    def __init__(self, atlas: ShapeAtlas):
        self.mean = torch.from_numpy(atlas.mean)
        self.basis = torch.from_numpy(atlas.modes) * torch.from_numpy(atlas.mode_std)[:, None, None]
        self.pose_mean = torch.from_numpy(atlas.pose_mean)
        self.pose_std = torch.from_numpy(atlas.pose_std)
        self.organs = atlas.organs

    def points(self, pose: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Frame points ``[B, P, 2]`` for poses ``[B, 5]`` (log s, θ, tx, ty, log anisotropy), coeffs ``[B, K]``."""
        shape = self.mean + torch.einsum("bk,kpd->bpd", coeffs, self.basis)
        cos, sin = torch.cos(pose[:, 1]), torch.sin(pose[:, 1])
        sx, sy = torch.exp(pose[:, 0] + pose[:, 4]), torch.exp(pose[:, 0] - pose[:, 4])
        linear = torch.stack([torch.stack([cos * sx, -sin * sy], -1), torch.stack([sin * sx, cos * sy], -1)], -2)
        return torch.einsum("bij,bpj->bpi", linear, shape) + pose[:, None, 2:4]


def _outline_geometry(poly: torch.Tensor, subdivide: int = 4) -> tuple[torch.Tensor, ...]:
    """Closed outlines ``[B, n, 2]`` → segment midpoints, vectors, lengths, outward normals, signed area·2."""
    t = (torch.arange(subdivide, dtype=poly.dtype) / subdivide)[None, None, :, None]
    nxt = torch.roll(poly, -1, dims=1)
    q = rearrange(poly[:, :, None] + t * (nxt - poly)[:, :, None], "b n m xy -> b (n m) xy")  # denser outline
    seg = torch.roll(q, -1, dims=1) - q
    mid = q + seg / 2
    length = seg.norm(dim=-1).clamp_min(1e-9)
    area2 = (mid[..., 0] * seg[..., 1]).sum(-1)  # ∮ x dy: the signed area
    # The outline's winding decides which normal points outward.
    orient = torch.where(area2.detach() >= 0, 1.0, -1.0)[:, None, None]
    normal = torch.stack([seg[..., 1], -seg[..., 0]], dim=-1) / length[..., None] * orient
    return mid, seg, length, normal, area2


def _contour_terms(
    level: torch.Tensor, polys: list[torch.Tensor], offsets: tuple[float, ...]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Border contrast (outside − inside), region mean and border agreement (the fraction of the border
    that is darker inside by at least ``AGREE_MIN``), each ``[B]``, of each outline ``[B, n, 2]``.

    All sample points of all outlines go through one ``grid_sample`` call: the per-call overhead, not the
    arithmetic, is what costs on a CPU.
    """
    geoms = [_outline_geometry(p) for p in polys]
    signs = torch.tensor([1.0, -1.0]).repeat_interleave(len(offsets))
    steps = torch.tensor(offsets).repeat(2) * signs  # outside offsets, then inside ones
    pts = [torch.cat([mid[None], mid[None] + steps[:, None, None, None] * normal[None]])
           for mid, *_, normal, _ in geoms]
    values = sample_points(level, torch.cat([p.reshape(-1, 2) for p in pts]))
    out = []
    for (mid, seg, length, _, area2), chunk in zip(geoms, values.split([p[..., 0].numel() for p in pts], dim=1),
                                                   strict=True):
        img = chunk[0].reshape(len(steps) + 1, *mid.shape[:2])
        integral = chunk[1].reshape(len(steps) + 1, *mid.shape[:2])[0]
        contrast = (img[1 : 1 + len(offsets)] - img[1 + len(offsets) :]).mean(0)
        edge = (contrast * length).sum(-1) / length.sum(-1)
        agree = ((contrast > AGREE_MIN).float() * length).sum(-1) / length.sum(-1)
        safe_area2 = torch.where(area2.abs() < 1e-9, torch.full_like(area2, 1e-9), area2)
        out.append((edge, (integral * seg[..., 1]).sum(-1) / safe_area2, agree))  # region: ∮ F dy / ∮ x dy
    return out


def _energy(
    model: _Model, level: torch.Tensor, pose: torch.Tensor, coeffs: torch.Tensor, cfg: FitConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Energy per candidate ``[B]`` (lower is better) and the image terms behind it."""
    pts = model.points(pose, coeffs)
    terms: dict[str, torch.Tensor] = {}
    energy = torch.zeros(pose.shape[0])
    polys = [pts[:, i:j] for i, j in model.organs.values()]
    for name, (edge, region, agree) in zip(model.organs, _contour_terms(level, polys, cfg.edge_offsets), strict=True):
        terms[f"{name}_edge"], terms[f"{name}_mean"], terms[f"{name}_agree"] = edge, region, agree
        if name in LUNGS:
            energy = energy - edge + cfg.dark_weight * region
        else:  # the heart is bright inside: its border contrast is negative
            energy = energy + cfg.heart_weight * edge
    z = (pose[:, :4] - model.pose_mean) / model.pose_std
    energy = energy + cfg.shape_weight * coeffs.pow(2).mean(-1) + cfg.pose_weight * z.pow(2).mean(-1)
    energy = energy + cfg.aniso_weight * (pose[:, 4] / 0.05) ** 2
    return energy, terms


def _coarse_starts(model: _Model, level: torch.Tensor, k: int, cfg: FitConfig) -> torch.Tensor:
    """The ``n_starts`` best poses of a grid around the mean pose, mean shape (no gradient)."""
    offsets = torch.cartesian_prod(torch.tensor(cfg.grid_scale), torch.tensor(cfg.grid_x), torch.tensor(cfg.grid_y))
    poses = torch.cat([model.pose_mean, torch.zeros(1)]).repeat(len(offsets), 1)
    poses[:, 0] += offsets[:, 0]
    poses[:, 2:4] += offsets[:, 1:]
    with torch.no_grad():
        energy, _ = _energy(model, level, poses, torch.zeros(len(poses), k), cfg)
    return poses[energy.argsort()[: cfg.n_starts]].clone()


def _refine(
    model: _Model, base: torch.Tensor, pose: torch.Tensor, k: int, cfg: FitConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam over pose and shape coefficients, coarse to fine; returns the best candidate's pose and coeffs."""
    pose = pose.clone().requires_grad_(True)
    coeffs = torch.zeros(len(pose), k, requires_grad=True)
    for sigma, iterations, lr in cfg.stages:
        level = pyramid_level(base, sigma)
        # Coefficients are in standard deviations: they move ten times the pose's frame units.
        opt = torch.optim.Adam([{"params": [pose], "lr": lr}, {"params": [coeffs], "lr": 10 * lr}])
        for _ in range(iterations):
            opt.zero_grad()
            energy, _ = _energy(model, level, pose, coeffs, cfg)
            energy.sum().backward()
            opt.step()
            with torch.no_grad():
                coeffs.clamp_(-3.0, 3.0)  # stay within the shapes the atlas has seen
    with torch.no_grad():
        energy, _ = _energy(model, level, pose, coeffs, cfg)
        best = int(energy.argmin())
    return pose[best].detach(), coeffs[best].detach()


def _measure(
    model: _Model, image: torch.Tensor, valid: torch.Tensor, pose: torch.Tensor, coeffs: torch.Tensor, cfg: FitConfig
) -> dict[str, float]:
    """Image terms of the fitted outline, on ranks taken within its bounding box (plus a margin).

    Ranks of the whole image would let wide black borders or burnt-in labels compress the contrasts and
    understate a good fit.
    """
    pts = model.points(pose[None], coeffs[None])[0]
    lo, hi = pts.amin(0), pts.amax(0)
    lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    centres = (torch.arange(image.shape[-1]) + 0.5) / image.shape[-1]
    box_x = (centres >= lo[0]) & (centres <= hi[0])
    box_y = (centres >= lo[1]) & (centres <= hi[1])
    roi = valid * (box_y[:, None] & box_x[None, :])
    if float(roi.sum()) < 16:  # the outline left the image: nothing to measure
        return {f"{n}_{t}": 0.0 for n in model.organs for t in ("edge", "mean", "agree")}
    _, raw = _energy(model, pyramid_level(equalise(image, roi), cfg.stages[-1][0]), pose[None], coeffs[None], cfg)
    return {n: float(v[0]) for n, v in raw.items()}


def fit_quality(edges: dict[str, float], agreement: dict[str, float], gap: float) -> float:
    """0–1: border agreement × border contrast × brightness gap, the last two relative to a typical chest
    radiograph and capped at 1. The product is used because each factor alone lets some non-chest image
    through (a silhouette has strong borders, an extremity radiograph dark-inside borders)."""
    contrast = min(edges.values()) / EDGE_REF
    brightness = gap / BRIGHTNESS_REF
    return float(min(agreement.values()) * np.clip(contrast, 0.0, 1.0) * np.clip(brightness, 0.0, 1.0))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the fit is thousands of tiny ops, where thread hand-offs cost more than
    they save (measured on a busy 2-core CPU: 1.5 s with one thread, 8–9 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_atlas(image: torch.Tensor, atlas: ShapeAtlas | None = None, config: FitConfig | None = None) -> AtlasFit:
    """Register the shape atlas to one radiograph.

    Args:
        image: ``[H, W]`` grey radiograph (any range; bright = dense, as displayed), at least 64 px a side.
        atlas: the point-distribution model (default: the pack's asset).
        config: registration settings.

    Returns:
        The outlines in the radiograph's pixels and the fit quality (not checked here: see
        :func:`atlas_organ_masks`).

    Raises:
        CXRInputError: not a single 2-D image, too small, or NaN/infinite values.
    """
    cfg = config or FitConfig()
    atlas = atlas or load_atlas()
    if image.ndim != 2 or min(image.shape) < 64:
        raise CXRInputError(
            f"the atlas needs one grey radiograph of at least 64×64 pixels, got shape {tuple(image.shape)}.",
            fix="Connect a single radiograph (batch 1).",
        )
    if not torch.isfinite(image).all():
        raise CXRInputError("the image contains NaN or infinite values.", fix="Check the loader upstream.")
    start = time.perf_counter()
    # ComfyUI runs nodes under inference mode; the fit needs autograd on ordinary tensors.
    with torch.inference_mode(False), torch.enable_grad(), _one_thread():
        img = image.detach().float().cpu().clone()
        h, w = img.shape
        model = _Model(atlas)
        k = atlas.modes.shape[0]
        small, valid = square_frame(img, cfg.working_size)
        base = equalise(small, valid)
        starts = _coarse_starts(model, pyramid_level(base, cfg.stages[0][0]), k, cfg)
        pose, coeffs = _refine(model, base, starts, k, cfg)
        with torch.no_grad():
            terms = _measure(model, small, valid, pose, coeffs, cfg)
            pts = model.points(pose[None], coeffs[None])[0]
            native = (pts - 0.5) * max(h, w) + torch.tensor([w / 2, h / 2])
    outlines = {name: native[i:j].numpy().astype(np.float64) for name, (i, j) in atlas.organs.items()}
    edges = {name: terms[f"{name}_edge"] for name in LUNGS}
    agreement = {name: terms[f"{name}_agree"] for name in LUNGS}
    gap = terms["heart_mean"] - sum(terms[f"{n}_mean"] for n in LUNGS) / len(LUNGS)
    quality = fit_quality(edges, agreement, gap)
    fit = AtlasFit(outlines, h, w, quality, edges, agreement, gap, time.perf_counter() - start)
    LOG.info("%s", fit.report())
    return fit


def atlas_organ_masks(
    image: torch.Tensor, min_quality: float = DEFAULT_MIN_QUALITY, config: FitConfig | None = None
) -> tuple[OrganMasks, AtlasFit]:
    """Approximate right lung, left lung and heart masks of a radiograph, or an error when the fit is poor.

    Args:
        image: ``[H, W]`` grey radiograph.
        min_quality: reject fits below this quality (0–1).
        config: registration settings.

    Raises:
        CXRInputError: the fit quality is below ``min_quality`` (the message carries the fit report).
    """
    fit = fit_atlas(image, config=config)
    if fit.quality < min_quality:
        raise CXRInputError(
            f"the lung/heart atlas does not fit this image. {fit.report(min_quality)}",
            input_name="image",
            fix="Use a frontal (PA/AP) chest radiograph shown with bright bones and dark lungs (invert a "
            "MONOCHROME1 image first), or load masks from files / a segmentation model instead.",
        )
    return fit.masks(), fit
