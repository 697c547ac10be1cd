"""Dose–response plots (matplotlib, the optional ``report`` extra), returned as PNG bytes for inlining.

matplotlib is imported only here and only when a plot is drawn, through its object API (``Figure`` with the Agg
canvas: no pyplot state, no display). Without it :func:`matplotlib_missing` says how to install it and the report
shows the same numbers as tables.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Mapping, Sequence

from .stats import Estimate

INSTALL = "pip install 'cxr-counterfactual[report]' (or pip install 'matplotlib>=3.7')"
Series = Mapping[str, Sequence[tuple[float, Estimate]]]  # line label -> (x, estimate) points, x ascending


def matplotlib_missing() -> str | None:
    """None when matplotlib can be imported, else the sentence to show instead of the plots."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return f"matplotlib is not installed, so the plots are left out (the numbers are in the tables): {INSTALL}"
    return None


def dose_response_png(setting: str, panels: Mapping[str, Series], dpi: int = 90) -> bytes:
    """One figure for one swept ``setting``: a panel per metric (y), a line per group, 95 % interval bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6 * len(panels), 3.0), dpi=dpi)  # fixed margins: a layout engine draws twice
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, series) in zip(axes, panels.items(), strict=True):
        for label, points in series.items():
            xs = [x for x, _ in points]
            ys = [e.mean for _, e in points]
            low = [e.mean - e.low if e.low is not None else 0.0 for _, e in points]
            high = [e.high - e.mean if e.high is not None else 0.0 for _, e in points]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label or None)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(setting, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if any(series) and len(series) > 1:
            ax.legend(fontsize=6)
    figure.subplots_adjust(left=0.17 / len(panels), right=0.98, bottom=0.18, top=0.9, wspace=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
