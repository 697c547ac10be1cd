"""Build ``assets/atlas_mean_shape.json``: a point-distribution model of lungs and heart from CheXmask rows.

Usage::

    python tools/build_atlas.py [CSV_DIR] [--out assets/atlas_mean_shape.json] [--min-dice 0.7]

``CSV_DIR`` defaults to ``$CXR_TEST_DATA/cxr/chexmask-rows``, else ``../shared/data/cxr/chexmask-rows`` beside
the project: the full set of 305 CheXmask rows (296 with Dice RCA (Mean) >= 0.7), which the repo does not ship.
The repo's ``tests/data/cxr/chexmask-rows`` keeps a few whole rows only, too few for an atlas; but this script
reads only the id, Dice, ``Landmarks``, ``Height`` and ``Width`` columns, and
``tests/data/cxr/chexmask-landmarks`` holds exactly those for all 305 rows: pass it as ``CSV_DIR`` to rebuild the
same asset from a plain clone (tests/test_atlas.py checks that it does).
Each row's 120 landmarks (right lung 0–43, left lung 44–93, heart 94–119; right/left are the patient's
sides) are put in the row's own image frame, the frame is padded to a square the way CheXmask did, and the
coordinates are divided by the square's side, so ``[0, 1]²`` is the (padded) radiograph. Then:

1. generalised Procrustes analysis (similarity: scale, rotation, translation) gives a mean shape in a
   canonical frame (centroid 0, RMS radius 1);
2. each row's similarity from the canonical frame back to its image frame is its *pose*: the mean and
   spread of the poses are the prior the fit starts from;
3. PCA of the aligned shapes gives the main modes of shape variation.

Only numpy and the standard library: the script is independent of the pack (``tools/`` is not a package).
No image is read; the rows carry no pixels.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np

LOG = logging.getLogger("build_atlas")
ROOT = Path(__file__).resolve().parents[1]  # the project root (the package folder)
N_POINTS = 120
ORGANS = {"right_lung": [0, 44], "left_lung": [44, 94], "heart": [94, 120]}
# The preprocessed grid CheXmask used when a row gives no Height/Width.
DEFAULT_SIDE = 1024.0
VARIANCE_KEPT = 0.95
MAX_MODES = 12
ID_COLUMNS = ("dicom_id", "Path", "Image Index", "ImageID", "image_id")


def parse_landmarks(text: str) -> np.ndarray:
    """Landmarks as ``[N, 2]`` from a flat ``"x,y,x,y"`` string, JSON (``[[x, y], ...]`` or flat), or a
    numpy repr (``"[[1. 2.]\\n [3. 4.]]"``, ``array([...])``).

    Args:
        text: the ``Landmarks`` cell.

    Raises:
        ValueError: no numbers, or an odd count.
    """
    text = text.strip()
    try:
        values = np.asarray(json.loads(text), dtype=np.float64).ravel()
    except (ValueError, TypeError):
        # Flat lists and numpy reprs both reduce to "every number in order".
        values = np.asarray(re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text), dtype=np.float64)
    if values.size == 0 or values.size % 2:
        raise ValueError(f"landmarks need an even, non-zero count of numbers, got {values.size}")
    return values.reshape(-1, 2)


def frame_normalise(points: np.ndarray, height: float, width: float) -> np.ndarray:
    """Pixel landmarks → the padded square frame ``[0, 1]²`` (centred padding, as CheXmask preprocessed)."""
    side = max(height, width)
    return (points - [width / 2, height / 2]) / side + 0.5


def _size(value: str) -> float | None:
    try:
        return float(value) if value.strip() else None
    except ValueError:
        return None


def read_rows(csv_dir: Path, min_dice: float) -> tuple[np.ndarray, dict[str, int], list[str]]:
    """All usable rows as ``[M, 120, 2]`` frame coordinates, the count per file and the row ids."""
    csv.field_size_limit(sys.maxsize)  # the RLE mask columns are long
    shapes: list[np.ndarray] = []
    counts: dict[str, int] = {}
    ids: list[str] = []
    for path in sorted(csv_dir.glob("*.csv")):
        kept = 0
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if float(row["Dice RCA (Mean)"]) < min_dice:
                    continue  # CheXmask's own advice: such rows are usually wrong
                points = parse_landmarks(row["Landmarks"])
                if points.shape != (N_POINTS, 2):
                    LOG.warning("%s: a row has %d landmarks, skipped", path.name, len(points))
                    continue
                h, w = _size(row.get("Height", "")), _size(row.get("Width", ""))
                shapes.append(frame_normalise(points, h or DEFAULT_SIDE, w or DEFAULT_SIDE))
                ids.append(next((row[c] for c in ID_COLUMNS if c in row), ""))
                kept += 1
        counts[path.stem] = kept
    if not shapes:
        raise SystemExit(f"no usable CheXmask rows in {csv_dir}")
    return np.stack(shapes), counts, ids


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares similarity ``dst ≈ s·R(θ)·src + t`` (Umeyama, no reflection): ``(s, θ, t)``."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    # For 2-D points the optimal rotation and scale come from two sums (complex-number form).
    dot = float((a * b).sum())
    cross = float((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum())
    theta = np.arctan2(cross, dot)
    s = np.hypot(dot, cross) / float((a * a).sum())
    t = mu_d - s * _rot(theta) @ mu_s
    return s, theta, t


def _rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _canonical(shape: np.ndarray) -> np.ndarray:
    centred = shape - shape.mean(0)
    return centred / np.sqrt((centred**2).sum(1).mean())


def procrustes(shapes: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Generalised Procrustes: the canonical mean ``[120, 2]`` and every shape aligned to it."""
    mean = _canonical(shapes[0])
    aligned = shapes
    for _ in range(iterations):
        aligned = np.stack([_apply(similarity(s, mean), s) for s in shapes])
        new_mean = _canonical(aligned.mean(0))
        # Keep the mean upright: rotate it back onto the previous one (GPA leaves rotation free).
        new_mean = _apply(similarity(new_mean, mean)[:2] + (np.zeros(2),), new_mean, scale=False)
        if np.abs(new_mean - mean).max() < 1e-9:
            break
        mean = new_mean
    return mean, aligned


def _apply(pose: tuple[float, float, np.ndarray], pts: np.ndarray, scale: bool = True) -> np.ndarray:
    s, theta, t = pose
    return (s if scale else 1.0) * pts @ _rot(theta).T + t


def build(csv_dir: Path, min_dice: float) -> dict:
    """The atlas as a JSON-ready dict (see the module docstring)."""
    shapes, counts, ids = read_rows(csv_dir, min_dice)
    mean, aligned = procrustes(shapes)
    poses = np.array([[np.log(s), th, *t] for s, th, t in (similarity(mean, x) for x in shapes)])
    flat = (aligned - mean).reshape(len(shapes), -1)
    _, sing, vt = np.linalg.svd(flat, full_matrices=False)
    var = sing**2 / (len(shapes) - 1)
    k = min(MAX_MODES, int(np.searchsorted(np.cumsum(var) / var.sum(), VARIANCE_KEPT)) + 1)
    # Sign convention: the largest component of each mode is positive (reproducible output).
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])
    modes = vt[:k] * signs[:, None]
    LOG.info("%d rows, %d modes keep %.1f%% of the shape variance", len(shapes), k, 100 * var[:k].sum() / var.sum())
    r6 = lambda a: np.round(np.asarray(a, dtype=np.float64), 6).tolist()  # noqa: E731
    return {
        "description": "Point-distribution model of the lungs and heart (120 CheXmask landmarks; right/left are "
        "the patient's sides, so right_lung is on the image's left in a PA view). Built by tools/build_atlas.py "
        "from CheXmask rows (ngaggion/CheXmask-Database, GPL-3.0; cite the CheXmask PhysioNet record). "
        "Statistics only: no image or mask of any patient is stored.",
        "frame": "canonical: centroid 0, RMS radius 1; pose maps it to the radiograph padded (centred) to a "
        "square, coordinates divided by the square's side ([0, 1]^2, x right, y down)",
        "organs": ORGANS,
        "source_rows": counts,
        "n_rows": len(shapes),
        "min_dice_rca_mean": min_dice,
        "mean": r6(mean),
        "modes": r6(modes.reshape(k, N_POINTS, 2)),
        "mode_std": r6(np.sqrt(var[:k])),
        "pose_names": ["log_scale", "rotation", "tx", "ty"],
        "pose_mean": r6(poses.mean(0)),
        "pose_std": r6(poses.std(0)),
        "row_ids_sha": _digest(ids),
    }


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    default_dir = Path(os.environ.get("CXR_TEST_DATA", ROOT.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_dir", nargs="?", type=Path, default=default_dir / "cxr" / "chexmask-rows")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "atlas_mean_shape.json")
    parser.add_argument("--min-dice", type=float, default=0.7, help="drop rows with Dice RCA (Mean) below this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    atlas = build(args.csv_dir, args.min_dice)
    args.out.write_text(json.dumps(atlas, separators=(",", ":")) + "\n")
    LOG.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
