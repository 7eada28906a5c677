"""PNG plots of the ensemble: reliability diagrams and per-part accuracy bars.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot), so no global backend or
figure state is touched: plotting works headless and in tests, and nothing leaks between calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from aqa.eval.metrics import expected_calibration_error, reliability_bins

BEFORE_COLOR = "#9aa5b1"
AFTER_COLOR = "#1f77b4"
GAP_COLOR = "#d62728"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def reliability_diagram(confidence_before: np.ndarray, confidence_after: np.ndarray, correct: np.ndarray,
                        title: str, path: str | Path, bins: int = 10) -> Path:
    """Accuracy against confidence per bin, before and after calibration, with the sample count below.

    ``confidence_*`` are ``[N]`` (the probability of the predicted option), ``correct`` is ``[N]`` bool.
    Calibration (a temperature) leaves the prediction and so ``correct`` unchanged.
    """
    fig = Figure(figsize=(5.2, 6.0), dpi=120, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1.0 / bins
    ece = {}
    for label, conf, color, alpha in (("before", confidence_before, BEFORE_COLOR, 0.55),
                                      ("after", confidence_after, AFTER_COLOR, 0.9)):
        stats = reliability_bins(conf, correct, bins)
        centers = stats["edges"][:-1] + width / 2
        ece[label] = expected_calibration_error(conf, correct, bins)
        filled = stats["count"] > 0
        if label == "after":
            top.bar(centers[filled], stats["accuracy"][filled], width=width * 0.9, color=color, alpha=alpha,
                    edgecolor="white", label=f"after calibration (ECE {ece[label]:.3f})")
            # The red segment is the gap between what the model claims and what it gets right.
            top.vlines(centers[filled], stats["accuracy"][filled], stats["confidence"][filled], colors=GAP_COLOR,
                       linewidth=2, label="gap to mean confidence")
        else:
            top.plot(centers[filled], stats["accuracy"][filled], "o--", color="#555555", alpha=0.8, zorder=3,
                     label=f"before calibration (ECE {ece[label]:.3f})")
        # Side by side, so the before counts are not hidden behind the after counts.
        shift = width * (0.22 if label == "after" else -0.22)
        bottom.bar(centers + shift, stats["count"], width=width * 0.44, color=color, alpha=alpha, label=label)
    top.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle=":", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin", title=title)
    top.legend(loc="upper left", fontsize=8, frameon=False)
    top.grid(alpha=0.3)
    bottom.set(xlabel="confidence (probability of the predicted option)", ylabel="questions")
    bottom.legend(fontsize=8, frameon=False)
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_bars(per_part: dict[str, dict[str, float]], path: str | Path, chance: float | None = None,
                  title: str = "Dev accuracy per part", muted: tuple[str, ...] = ()) -> Path:
    """Grouped bars: one group per part (plus the arithmetic mean), one bar per system.

    ``per_part`` maps a system name to ``{part: accuracy in [0, 1]}``; the last system is drawn as the
    highlighted one (the fused model), systems named in ``muted`` (baselines) in gray.
    """
    systems = list(per_part)
    parts = sorted({p for accs in per_part.values() for p in accs})
    groups = [*parts, "arith. mean"]
    values = np.array([[per_part[s].get(p, np.nan) for p in parts] + [np.nanmean([per_part[s].get(p, np.nan)
                       for p in parts])] for s in systems])  # [S, P + 1]
    fig = Figure(figsize=(min(14.0, max(6.0, 2.5 + 0.35 * len(groups) * len(systems))), 4.2), dpi=120,
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(systems)
    x = np.arange(len(groups))
    palette = iter(f"C{i}" for i in range(10 * len(systems)))
    colors = ["#b0b0b0" if s in muted else next(palette) for s in systems[:-1]] + ["#222222"]
    for i, (name, row) in enumerate(zip(systems, values)):
        bars = ax.bar(x - 0.4 + width * (i + 0.5), 100 * row, width=width * 0.95, color=colors[i], label=name,
                      hatch="//" if i == len(systems) - 1 else None, edgecolor="white")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({100 * chance:.0f}%)")
    ax.set_xticks(x, groups)
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title=title)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def fit_curve(losses: list[float], path: str | Path, baseline: float | None = None) -> Path:
    """The dev NLL over Adam steps, with the uniform average's NLL as a reference line."""
    fig = Figure(figsize=(5.0, 3.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(len(losses)), losses, color=AFTER_COLOR, label="fused dev NLL")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="uniform average")
    ax.set(xlabel="Adam step", ylabel="NLL (nats)", title="Ensemble fit")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)
