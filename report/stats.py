"""Means with bootstrap 95 % intervals that resample radiographs (clusters), not rows.

**The bootstrap rule**: the estimate is the mean over rows. Its interval is the 2.5th–97.5th percentile of
:data:`RESAMPLES` bootstrap means, each the mean over all rows of clusters drawn with replacement (as many draws as
there are clusters), where a cluster is the rows of one radiograph (the ``radiograph`` column; a sweep's
``source_row`` where a row has no radiograph value; see ``folder.CLUSTER_COLUMNS``). Rows of one radiograph (a
sweep, several seeds) are not independent: resampling them as rows would give too narrow an interval. The
generator is seeded (:data:`SEED`), so a report is reproducible.
With one cluster there is no interval (None). Vectorised: one ``[RESAMPLES, clusters]`` draw per estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 20261204
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``rows`` rows of ``clusters`` radiographs, with its interval (None with one radiograph)."""

    mean: float
    low: float | None
    high: float | None
    rows: int
    clusters: int

    def text(self, digits: int = 3) -> str:
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[str], *, resamples: int = RESAMPLES,
                      seed: int = SEED) -> Estimate | None:
    """The mean of ``values`` with a percentile interval from resampling whole ``clusters`` (see the module doc).
    None when there are no values."""
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    if not values:
        return None
    x = np.asarray(values, dtype=np.float64)
    names, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=x, minlength=len(names))
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)
    mean = float(x.mean())
    if len(names) < 2:
        return Estimate(mean, None, None, len(x), len(names))
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(mean, float(low), float(high), len(x), len(names))
