"""Metrics and the prediction-file contract shared by inference and the ensemble.

A prediction row: ``{"id", "part", "choices", "option_logits", "pred", "answer", "model"}`` with
``option_logits`` in canonical (manifest) order and ``pred`` the chosen option's text.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PREDICTION_KEYS = ("id", "part", "choices", "option_logits", "pred", "answer", "model")


class PartAccuracy:
    """Per-part hits and counts, fed one question at a time (a split of any size in constant memory);
    :meth:`result` is what :func:`accuracy_by_part` returns."""

    def __init__(self) -> None:
        self.hits: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, part: str, value: float) -> None:
        """One answered question of ``part``, right (1), wrong (0) or in between (a fraction of orders)."""
        self.hits[part] += value
        self.counts[part] += 1

    def result(self) -> dict[str, Any]:
        parts = {p: self.hits[p] / self.counts[p] for p in sorted(self.counts)}
        total = sum(self.counts.values())
        return {
            "per_part": parts,
            "arithmetic_mean": float(np.mean(list(parts.values()))) if parts else None,
            "weighted_mean": sum(self.hits.values()) / total if total else None,
            "counts": dict(sorted(self.counts.items())),
            "n": total,
        }


def accuracy_by_part(rows: Iterable[dict[str, Any]], correct_key: str | None = None) -> dict[str, Any]:
    """Per-part accuracy, their arithmetic mean, the question-weighted mean and counts.

    A row is correct when ``pred == answer`` (or ``row[correct_key]`` when given, a float in [0, 1]).
    Rows without an answer (eval split) are skipped; with none left the result has no accuracies.
    """
    acc = PartAccuracy()
    for row in rows:
        if row.get("answer") is None:
            continue
        acc.add(row["part"], float(row[correct_key]) if correct_key else float(row["pred"] == row["answer"]))
    return acc.result()


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy over ``n`` questions (95 % for z = 1.96): unlike the normal
    approximation it stays inside [0, 1] and is honest near 0 and 1 and for small n."""
    if n <= 0:
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    center = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict[str, float]:
    """Mean of ``b - a`` over the same questions (one score in [0, 1] each: right or not, or the fraction of option
    orders right) with its 95 % normal interval from the paired differences' spread. Pairing removes what the two
    systems share (which questions are hard), so the interval is narrower than the two accuracies' intervals
    suggest."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same questions, got {len(a)} and {len(b)}.")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    half = z * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    mean = float(d.mean())
    return {"difference": mean, "interval": [mean - half, mean + half], "n": len(d)}


def chance_level(rows: Iterable[dict[str, Any]]) -> float:
    """Expected accuracy of uniform guessing: the mean of 1 / number of choices."""
    total, n = 0.0, 0
    for r in rows:
        total += 1.0 / len(r["choices"])
        n += 1
    return total / n if n else 0.0


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/n * |acc_b - conf_b|."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per confidence bin (the same equal-width bins as the ECE): count, mean confidence and accuracy.

    ``confidence`` and ``correct`` are ``[N]``; every returned array is ``[bins]`` with NaN in empty bins.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=confidence, minlength=bins) / count
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a predictions JSONL, checking every row has the contract's keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist; run inference/run.py first.")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
            missing = [k for k in PREDICTION_KEYS if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: prediction lacks {missing} (see the predictions contract).")
            if len(row["option_logits"]) != len(row["choices"]):
                raise ValueError(f"{path}:{lineno}: {len(row['option_logits'])} logits for {len(row['choices'])} choices.")
            rows.append(row)
    return rows


def submission_answer(row: dict[str, Any]) -> str:
    """The answer as the official data writes it: the source's option string (``raw_choices``, e.g.
    ``B. Humpback whale``) for the predicted option, else its text; empty when nothing was predicted."""
    if row["pred"] is None:
        return ""
    raw = row.get("raw_choices")
    return raw[row["choices"].index(row["pred"])] if raw else row["pred"]


def write_submission(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """DCASE submission CSV: header ``question,answer``, the verbatim option text per question id (empty for a
    generated answer that named no option: one row per question, scored wrong)."""
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        for row in rows:
            writer.writerow([row["id"], submission_answer(row)])


def write_json(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
