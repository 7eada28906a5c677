"""Fit the per-class SED calibration on a calibration split; print Cllr before/after; draw the diagram.

    python -m aqa.sed.calibrate --config configs/cascade/calibrate.yaml [key=value ...]

Priors come from the strong labels of the training split (share of positive segments per class). The
calibration split's clips are scored once (cached per clip) and each class gets a logistic regression on
its LLRs (see :mod:`aqa.sed.calibration`). Writes ``calibration.json`` and a reliability-diagram PNG.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

from aqa.config import load_config
from aqa.errors import UserError
from aqa.sed.calibration import Calibration, CalibrationError, cllr, fit_calibration, logit
from aqa.sed.fbank import num_frames
from aqa.sed.posteriors import PosteriorConfig, SedDetector, row_seconds, score_clips
from aqa.sed.reliability import sed_reliability_diagram
from aqa.sed.strong import class_priors, load_strong_clips, num_samples_16k, segment_targets


@dataclass
class CalibrateConfig:
    sed: str  # SED directory (config.json, model.safetensors, labels.json)
    train_manifest: str  # manifest + strong TSV of the SED's training split: class priors
    train_tsv: str
    calib_manifest: str  # manifest + strong TSV of the calibration split: the regressions
    calib_tsv: str
    out: str  # calibration.json
    plot: str  # reliability diagram PNG
    cache_dir: str  # per-clip cache of segment logits
    posteriors: PosteriorConfig
    min_overlap: float  # share of a segment (or of a shorter event) an event must cover to mark it
    prior_floor: float  # priors are clipped to [floor, 1 - floor] so logit(prior) stays finite
    min_positives: int  # classes with fewer positive calibration segments stay uncalibrated
    min_negatives: int
    l2: float  # ridge towards the identity map (a=1, b=0)
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default, one per core)
    heldout_manifest: str | None = None  # optional split scored with the fitted calibration (not fitted on)
    heldout_tsv: str | None = None


def resolve_device(name: str, cpu_threads: int | None = None) -> torch.device:
    """``auto``: a GPU when one is visible. On CPU, ``cpu_threads`` sets torch's intra-op threads: a tiny model's
    operations are so small that synchronising threads costs more than it saves (10x on a busy 2-core box)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    return device


def segments_of(detector: SedDetector, manifest: str, tsv: str, cache_dir: str, min_overlap: float):
    """Stacked segment logits and 0/1 targets ``[N, C]`` of a split's labelled clips, and the load report."""
    clips, report = load_strong_clips(manifest, tsv, detector.labels)
    posts = score_clips(detector, [c.audio for c in clips], cache_dir)
    n_classes = len(detector.labels)
    logits, targets = [], []
    for clip in clips:
        post = posts[clip.audio]
        logits.append(post.logits)
        targets.append(segment_targets(clip.events, len(post.logits), n_classes, post.hop_s, min_overlap))
    return np.concatenate(logits), np.concatenate(targets), report


def run(cfg: CalibrateConfig) -> Calibration:
    detector = SedDetector(cfg.sed, cfg.posteriors, resolve_device(cfg.device, cfg.cpu_threads))
    labels, patch, hop_rows = detector.labels, detector.patch, cfg.posteriors.hop_rows
    hop_s = hop_rows * row_seconds(patch)

    train_clips, train_report = load_strong_clips(cfg.train_manifest, cfg.train_tsv, labels)
    print("training labels: " + "; ".join(train_report.lines()))

    def segments(clip) -> int:
        rows = num_frames(num_samples_16k(clip.audio)) // patch
        return -(-rows // hop_rows)

    priors, train_pos, train_segments = class_priors(train_clips, len(labels), hop_s, cfg.min_overlap, segments,
                                                     cfg.prior_floor)
    logits, targets, report = segments_of(detector, cfg.calib_manifest, cfg.calib_tsv, cfg.cache_dir, cfg.min_overlap)
    print("calibration labels: " + "; ".join(report.lines()))
    meta = {"sed": str(cfg.sed), "sed_weights": detector.digest, "hop_s": hop_s, "min_overlap": cfg.min_overlap,
            "train_segments": train_segments, "calibration_segments": int(len(logits)),
            "calibration_manifest": str(cfg.calib_manifest)}
    cal = fit_calibration(logits, targets, priors, labels, min_positives=cfg.min_positives,
                          min_negatives=cfg.min_negatives, l2=cfg.l2, hop_rows=hop_rows,
                          window_rows=cfg.posteriors.window_rows, meta=meta)
    print_table(cal)
    if cfg.heldout_manifest and cfg.heldout_tsv:
        h_logits, h_targets, h_report = segments_of(detector, cfg.heldout_manifest, cfg.heldout_tsv, cfg.cache_dir,
                                                    cfg.min_overlap)
        before, after = evaluate(cal, h_logits, h_targets)
        cal.meta.update({"heldout_manifest": str(cfg.heldout_manifest), "heldout_cllr_before": before,
                         "heldout_cllr_after": after})
        print(f"held-out split ({h_report.clips} clips): mean Cllr before {before:.4f} -> after {after:.4f}")
    cal.save(cfg.out)
    done = [c.index for c in cal.classes if c.calibrated]
    if done:
        sel = np.array(done)
        p_raw = 1.0 / (1.0 + np.exp(-logits[:, sel]))
        p_cal = cal.apply(logits)[:, sel]
        sed_reliability_diagram(p_raw.ravel(), p_cal.ravel(), targets[:, sel].ravel(), cfg.plot,
                                f"SED reliability, {len(done)} classes, {len(logits)} segments")
        print(f"wrote {cfg.out} and {cfg.plot}")
    else:
        print(f"wrote {cfg.out}; no class could be calibrated, so no reliability diagram")
    return cal


def print_table(cal: Calibration) -> None:
    width = max([len(c.name) for c in cal.classes] + [5])
    print(f"{'class':<{width}}  {'pos':>6} {'neg':>7}  {'prior':>7}  {'Cllr before':>11}  {'after':>6}  {'a':>6} {'b':>7}")
    for c in cal.classes:
        if c.calibrated:
            print(f"{c.name:<{width}}  {c.positives:>6} {c.negatives:>7}  {c.prior:>7.4f}  {c.cllr_before:>11.4f}  "
                  f"{c.cllr_after:>6.4f}  {c.a:>6.3f} {c.b:>7.3f}")
    refused = [c for c in cal.classes if not c.calibrated]
    if refused:
        names = ", ".join(f"{c.name} ({c.positives} pos)" for c in refused[:20])
        more = f" and {len(refused) - 20} more" if len(refused) > 20 else ""
        print(f"left uncalibrated ({len(refused)}, too few positives or negatives): {names}{more}")
    before, after = cal.mean_cllr()
    if before is not None:
        n = sum(c.calibrated for c in cal.classes)
        print(f"mean Cllr over {n} calibrated classes: before {before:.4f} -> after {after:.4f}")


def evaluate(cal: Calibration, logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Mean Cllr before/after on another split, over calibrated classes with both outcomes present there."""
    before, after = [], []
    for c in cal.classes:
        y = targets[:, c.index]
        if not c.calibrated or y.all() or not y.any():
            continue
        llr_raw = logits[:, c.index].astype(np.float64) - logit(c.prior)
        before.append(cllr(llr_raw, y))
        after.append(cllr(c.a * llr_raw + c.b, y))
    if not before:
        raise CalibrationError("no calibrated class has both positive and negative segments in this split.")
    return float(np.mean(before)), float(np.mean(after))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. min_positives=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(CalibrateConfig, args.config, args.overrides)
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
