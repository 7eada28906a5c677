"""Reliability diagram of SED segment probabilities before and after calibration (PNG).

Drawn with ``matplotlib.figure.Figure`` (no pyplot state). For a detector, a bin's "accuracy" is the share
of its segments in which the class is present, so a calibrated detector lies on the diagonal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from aqa.eval.metrics import reliability_bins


def sed_reliability_diagram(p_before: np.ndarray, p_after: np.ndarray, present: np.ndarray, path: str | Path,
                            title: str, bins: int = 10) -> Path:
    """``p_before``, ``p_after``, ``present``: ``[N]`` probabilities and 0/1 truth over every (segment, class)."""
    fig = Figure(figsize=(5.2, 6.0), dpi=120, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1.0 / bins
    for label, p, color, marker in (("before calibration", p_before, "#9aa5b1", "o--"),
                                    ("after calibration", p_after, "#1f77b4", "s-")):
        stats = reliability_bins(p, present, bins)
        centers = stats["edges"][:-1] + width / 2
        filled = stats["count"] > 0
        top.plot(stats["confidence"][filled], stats["accuracy"][filled], marker, color=color, label=label)
        bottom.bar(centers + (width * 0.2 if "after" in label else -width * 0.2), stats["count"], width=width * 0.4,
                   color=color, label=label)
    top.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle=":", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="share of segments with the event", title=title)
    top.legend(loc="upper left", fontsize=8, frameon=False)
    top.grid(alpha=0.3)
    bottom.set(xlabel="predicted probability", ylabel="segments", yscale="log")
    bottom.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
