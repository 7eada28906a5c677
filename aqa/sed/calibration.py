"""Per-class calibration of SED posteriors on log-likelihood ratios, and Cllr.

For class ``c`` with training prior ``pi_c`` (the share of positive training segments):

    llr_raw = logit(p_model) - logit(pi_c)          # the model's posterior with its prior taken out
    llr_cal = a_c * llr_raw + b_c                    # affine calibration, one logistic regression per class
    p_cal   = sigmoid(llr_cal + logit(pi_c))         # the prior put back

``(a_c, b_c)`` minimise Cllr on the calibration split, i.e. a logistic regression in which positives and
negatives weigh half each whatever their counts (so the LLR does not absorb the split's own prior), with
a small ridge pulling towards the identity ``(1, 0)`` that keeps separable classes finite:

    Cllr = 1/2 [ mean_{y=1} log2(1 + exp(-llr)) + mean_{y=0} log2(1 + exp(llr)) ]

Cllr is 1 for a system that always says LR = 1 and 0 for a perfect one. A class with fewer than
``min_positives`` positive (or ``min_negatives`` negative) segments is refused and left as it was
(``a = 1, b = 0``), with the reason recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqa.errors import UserError
from aqa.sed.labels import LabelMap

LN2 = math.log(2.0)


class CalibrationError(UserError, ValueError):
    """A calibration file that does not fit the SED, or inputs that cannot be calibrated."""


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # overflow-free


def cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    """Cllr in bits of natural-log LLRs ``[N]`` against 0/1 ``labels`` ``[N]``; both classes must occur."""
    llr = np.asarray(llr, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise CalibrationError("Cllr needs both positive and negative segments.")
    pos = np.logaddexp(0.0, -llr[labels]).mean() / LN2
    neg = np.logaddexp(0.0, llr[~labels]).mean() / LN2
    return float(0.5 * (pos + neg))


def fit_affine(llr_raw: np.ndarray, labels: np.ndarray, l2: float, max_iter: int = 100,
               tol: float = 1e-10) -> tuple[float, float]:
    """``(a, b)`` minimising ``Cllr(a * llr_raw + b)`` (in nats) ``+ l2 * ((a - 1)^2 + b^2)`` by damped Newton.

    ``llr_raw`` ``[N]``, ``labels`` ``[N]`` 0/1 with both present. The objective is convex, so Newton with a
    backtracking line search converges from the identity.
    """
    x = np.asarray(llr_raw, dtype=np.float64)
    y = np.asarray(labels).astype(np.float64)
    n1, n0 = y.sum(), (1 - y).sum()
    w = np.where(y > 0, 0.5 / n1, 0.5 / n0)  # half the weight to each class

    def objective(a: float, b: float) -> float:
        z = a * x + b
        loss = np.where(y > 0, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))
        return float((w * loss).sum() + l2 * ((a - 1.0) ** 2 + b ** 2))

    a, b = 1.0, 0.0
    current = objective(a, b)
    for _ in range(max_iter):
        s = sigmoid(a * x + b)
        r = w * (s - y)  # d loss / d z
        grad = np.array([(r * x).sum() + 2 * l2 * (a - 1.0), r.sum() + 2 * l2 * b])
        h = w * s * (1 - s)
        hess = np.array([[(h * x * x).sum(), (h * x).sum()], [(h * x).sum(), h.sum()]]) + 2 * l2 * np.eye(2)
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        t, cand = 1.0, math.inf
        while t > 1e-8:
            cand = objective(a - t * step[0], b - t * step[1])
            if cand <= current:
                break
            t *= 0.5
        if cand > current:  # no step lowers the objective: at the optimum to machine precision
            break
        a, b = a - t * step[0], b - t * step[1]
        improved, current = current - cand, cand
        if improved < tol:
            break
    return float(a), float(b)


@dataclass
class ClassCalibration:
    index: int
    mid: str
    name: str
    prior: float  # training share of positive segments (clipped)
    a: float = 1.0
    b: float = 0.0
    calibrated: bool = False
    reason: str | None = None  # why it was left uncalibrated
    positives: int = 0  # calibration-split segments
    negatives: int = 0
    cllr_before: float | None = None
    cllr_after: float | None = None


@dataclass
class Calibration:
    """Per-class parameters plus the segment grid they were fitted on."""

    classes: list[ClassCalibration]
    hop_rows: int
    window_rows: int
    meta: dict[str, Any]

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Segment logits ``[N, C]`` -> calibrated probabilities ``[N, C]``."""
        prior_logit = logit(np.array([c.prior for c in self.classes]))
        a = np.array([c.a for c in self.classes])
        b = np.array([c.b for c in self.classes])
        llr_raw = np.asarray(logits, dtype=np.float64) - prior_logit
        return sigmoid(a * llr_raw + b + prior_logit)

    def mean_cllr(self) -> tuple[float | None, float | None]:
        """Mean Cllr before and after over the calibrated classes."""
        done = [c for c in self.classes if c.calibrated and c.cllr_before is not None and c.cllr_after is not None]
        if not done:
            return None, None
        return (float(np.mean([c.cllr_before for c in done])), float(np.mean([c.cllr_after for c in done])))

    def check_labels(self, labels: LabelMap, where: str) -> None:
        if [c.mid for c in self.classes] != labels.mids:
            raise CalibrationError(
                f"{where} was fitted for another SED: its {len(self.classes)} classes differ from the model's "
                f"{len(labels)} (or their order). Run python -m aqa.sed.calibrate again for this model."
            )

    def to_json(self) -> dict[str, Any]:
        before, after = self.mean_cllr()
        return {"hop_rows": self.hop_rows, "window_rows": self.window_rows, "mean_cllr_before": before,
                "mean_cllr_after": after, **self.meta, "classes": [asdict(c) for c in self.classes]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist; write it with python -m aqa.sed.calibrate.")
        data = json.loads(path.read_text(encoding="utf-8"))
        try:
            classes = [ClassCalibration(**c) for c in data["classes"]]
            meta = {k: v for k, v in data.items() if k not in ("classes", "hop_rows", "window_rows",
                                                                "mean_cllr_before", "mean_cllr_after")}
            return cls(classes, int(data["hop_rows"]), int(data["window_rows"]), meta)
        except (KeyError, TypeError) as err:
            raise CalibrationError(f"{path} is not a calibration file of aqa.sed.calibrate: {err}") from err


def fit_calibration(logits: np.ndarray, targets: np.ndarray, priors: np.ndarray, labels: LabelMap, *,
                    min_positives: int, min_negatives: int, l2: float, hop_rows: int, window_rows: int,
                    meta: dict[str, Any] | None = None) -> Calibration:
    """Fit every class on calibration segments: ``logits`` and 0/1 ``targets`` ``[N, C]``, ``priors`` ``[C]``."""
    if logits.shape != targets.shape or logits.shape[1] != len(labels) or len(priors) != len(labels):
        raise CalibrationError(f"shapes disagree: logits {logits.shape}, targets {targets.shape}, "
                               f"{len(priors)} priors, {len(labels)} labels.")
    out = []
    for c in labels:
        pos = int(targets[:, c.index].sum())
        neg = int(len(targets) - pos)
        cal = ClassCalibration(c.index, c.mid, c.name, float(priors[c.index]), positives=pos, negatives=neg)
        if pos < min_positives or neg < min_negatives:
            cal.reason = (f"{pos} positive / {neg} negative calibration segments, fewer than "
                          f"min_positives={min_positives} / min_negatives={min_negatives}")
        else:
            llr_raw = logits[:, c.index].astype(np.float64) - logit(cal.prior)
            y = targets[:, c.index]
            cal.a, cal.b = fit_affine(llr_raw, y, l2)
            cal.calibrated = True
            cal.cllr_before = cllr(llr_raw, y)
            cal.cllr_after = cllr(cal.a * llr_raw + cal.b, y)
        out.append(cal)
    return Calibration(out, hop_rows, window_rows, dict(meta or {}))
