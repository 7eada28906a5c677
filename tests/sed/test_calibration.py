"""Calibration: Cllr on hand-worked values, recovery of known slopes/offsets, refusals, the CLI end to end."""

import json
import math

import numpy as np
import pytest
import yaml

from aqa.sed.calibrate import main as calibrate_main
from aqa.sed.calibration import (
    Calibration,
    CalibrationError,
    cllr,
    fit_affine,
    fit_calibration,
    logit,
    sigmoid,
)
from aqa.sed.labels import LabelMap
from aqa.sed.strong import segment_targets
from tests.helpers import ROOT, record, write_manifest, write_wave


def test_cllr_of_lr_one_everywhere_is_one():
    labels = np.array([1, 0, 0, 1, 0])
    assert cllr(np.zeros(5), labels) == pytest.approx(1.0)


def test_cllr_on_hand_worked_values():
    # LR 3 for the positive, 1/3 for the negative: each term is log2(1 + 1/3) = log2(4/3)
    assert cllr(np.array([math.log(3), -math.log(3)]), np.array([1, 0])) == pytest.approx(math.log2(4 / 3))
    # a wrong but confident system: LR 1/9 for the positive, 9 for the negative -> log2(10)
    assert cllr(np.array([-math.log(9), math.log(9)]), np.array([1, 0])) == pytest.approx(math.log2(10))
    # positives and negatives weigh half each whatever their counts
    llr = np.array([math.log(3), math.log(3), 0.0])
    assert cllr(llr, np.array([1, 1, 0])) == pytest.approx(0.5 * (math.log2(4 / 3) + 1.0))
    assert cllr(np.array([50.0, -50.0]), np.array([1, 0])) < 1e-15
    with pytest.raises(CalibrationError, match="both positive and negative"):
        cllr(np.zeros(3), np.ones(3))


def test_affine_fit_recovers_known_slope_and_offset():
    # Equal-variance Gaussian scores: the true LLR is linear in the score with known a and b.
    rng = np.random.default_rng(0)
    mu1, mu0, sd = 2.0, -1.0, 1.5
    x = np.concatenate([rng.normal(mu1, sd, 200_000), rng.normal(mu0, sd, 400_000)])
    y = np.concatenate([np.ones(200_000), np.zeros(400_000)])
    a, b = fit_affine(x, y, l2=0.0)
    assert a == pytest.approx((mu1 - mu0) / sd**2, abs=0.02)
    assert b == pytest.approx((mu0**2 - mu1**2) / (2 * sd**2), abs=0.02)
    assert cllr(a * x + b, y) < cllr(x, y)


def test_class_fit_recovers_slopes_offsets_through_priors_and_refuses_rare_classes():
    rng = np.random.default_rng(1)
    n = 60_000
    labels = LabelMap.from_pairs([("/m/a", "A"), ("/m/b", "B"), ("/m/rare", "Rare")])
    priors = np.array([0.2, 0.05, 0.01])
    true_a, true_b = np.array([0.5, 2.0]), np.array([1.0, -0.5])
    y = np.zeros((n, 3))
    y[: n // 3, 0] = 1
    y[: n // 4, 1] = 1
    y[:3, 2] = 1
    logits = np.zeros((n, 3))
    for c in range(2):  # a model whose raw LLR x has true LLR a*x + b, plus its training prior
        mu1, mu0 = 1.0, -1.0  # score LLR = 2x -> scale to the wanted a, b
        x = np.where(y[:, c] > 0, rng.normal(mu1, 1.0, n), rng.normal(mu0, 1.0, n))
        true_llr = 2 * x
        llr_raw = (true_llr - true_b[c]) / true_a[c]
        logits[:, c] = llr_raw + logit(priors[c])
    logits[:, 2] = rng.normal(size=n)
    cal = fit_calibration(logits, y, priors, labels, min_positives=10, min_negatives=10, l2=1e-8, hop_rows=1,
                          window_rows=62)
    for c in range(2):
        assert cal.classes[c].calibrated
        assert cal.classes[c].a == pytest.approx(true_a[c], rel=0.03)
        assert cal.classes[c].b == pytest.approx(true_b[c], abs=0.05)
        assert cal.classes[c].cllr_after < cal.classes[c].cllr_before
    rare = cal.classes[2]
    assert not rare.calibrated and (rare.a, rare.b) == (1.0, 0.0)
    assert "3 positive" in rare.reason and "min_positives=10" in rare.reason
    # applying: p_cal = sigmoid(a * (logit - logit(prior)) + b + logit(prior)); rare class unchanged
    p = cal.apply(logits[:5])
    expect = sigmoid(0.5 * (logits[:5, 0] - logit(0.2)) + 1.0 + logit(0.2))
    assert np.allclose(p[:, 0], expect, atol=0.03)
    assert np.allclose(p[:, 2], sigmoid(logits[:5, 2]))


def test_calibration_file_round_trip_and_label_check(tmp_path):
    labels = LabelMap.from_pairs([("/m/a", "A"), ("/m/b", "B")])
    rng = np.random.default_rng(2)
    y = (rng.random((500, 2)) < 0.3).astype(float)
    logits = rng.normal(size=(500, 2)) + 2 * y
    cal = fit_calibration(logits, y, np.array([0.3, 0.3]), labels, min_positives=5, min_negatives=5, l2=1e-3,
                          hop_rows=2, window_rows=10)
    back = Calibration.load(cal.save(tmp_path / "calibration.json"))
    assert np.allclose(back.apply(logits), cal.apply(logits))
    assert back.mean_cllr() == cal.mean_cllr()
    with pytest.raises(CalibrationError, match="fitted for another SED"):
        back.check_labels(LabelMap.from_pairs([("/m/b", "B"), ("/m/a", "A")]), "calibration.json")


def test_segment_targets_on_a_hand_made_grid():
    # 0.16 s segments, min_overlap 0.5 of the shorter of segment and event.
    # Event 0.20-0.55 s (need 0.08 s): segment 1 (0.16-0.32) overlaps 0.12, 2 fully, 3 (0.48-0.64) only 0.07.
    # Event 0.66-0.70 s is shorter than a segment (need 0.02 s): it marks segment 4, which holds it.
    t = segment_targets([(0.20, 0.55, 0), (0.66, 0.70, 1)], 5, 2, 0.16, 0.5)
    assert t[:, 0].tolist() == [0, 1, 1, 0, 0]
    assert t[:, 1].tolist() == [0, 0, 0, 0, 1]
    assert segment_targets([(0.0, 1.0, 0)], 0, 1, 0.16, 0.5).shape == (0, 1)


def _write_clip(path, events_s, seconds, rng):
    """Noise with loud tones where the events are, so a random SED still scores them differently."""
    wave = 0.01 * rng.standard_normal(int(seconds * 16000))
    for onset, offset in events_s:
        i0, i1 = int(onset * 16000), int(offset * 16000)
        wave[i0:i1] += 0.5 * np.sin(2 * np.pi * 1500 * np.arange(i1 - i0) / 16000)
    write_wave(path, wave.astype(np.float32))


def _split(root, name, n, rng, rare_count=0):
    rows, tsv = [], ["segment_id\tstart_time_seconds\tend_time_seconds\tlabel"]
    for i in range(n):
        cid = f"{name}{i:03d}"
        ev = [(0.3 + 0.1 * (i % 3), 1.1 + 0.1 * (i % 4))]
        _write_clip(root / "audio" / f"{cid}.wav", ev, 2.0, rng)
        tsv += [f"{cid}\t{a:.2f}\t{b:.2f}\t/m/tone" for a, b in ev]
        if i < rare_count:
            tsv.append(f"{cid}\t0.00\t0.20\t/m/rare")
        tsv.append(f"{cid}\t0.00\t2.00\t/m/unknown")
        rows.append(record(id=f"q{cid}", split=name, audio=f"{cid}.wav", question="q?"))
    write_manifest(root, name, rows)
    (root / f"{name}.tsv").write_text("\n".join(tsv) + "\n")


def test_calibrate_cli_writes_json_plot_and_names_refused_classes(tmp_path, capsys, tiny):
    rng = np.random.default_rng(3)
    _split(tmp_path / "data", "train", 8, rng, rare_count=2)
    _split(tmp_path / "data", "dev", 12, rng, rare_count=1)
    labels = LabelMap.from_pairs([("/m/tone", "Tone"), ("/m/rare", "Rare sound")])
    sed = tiny.beats(labels, seed=0)
    cfg = yaml.safe_load((ROOT / "configs" / "demo" / "cascade_calibrate.yaml").read_text())
    d = tmp_path / "data"
    cfg.update(sed=str(sed), train_manifest=str(d / "train.jsonl"), train_tsv=str(d / "train.tsv"),
               calib_manifest=str(d / "dev.jsonl"), calib_tsv=str(d / "dev.tsv"), out=str(tmp_path / "cal.json"),
               plot=str(tmp_path / "rel.png"), cache_dir=str(tmp_path / "cache"), min_positives=5,
               heldout_manifest=None, heldout_tsv=None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert calibrate_main(["--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "left uncalibrated (1, too few positives or negatives): Rare sound (1 pos)" in out
    assert "mean Cllr over 1 calibrated classes: before" in out
    assert "rows of 1 labels the SED does not predict were dropped: /m/unknown" in out
    data = json.loads((tmp_path / "cal.json").read_text())
    tone = data["classes"][0]
    assert tone["calibrated"] and tone["cllr_after"] <= tone["cllr_before"]
    assert data["mean_cllr_after"] <= data["mean_cllr_before"]
    assert 0 < tone["prior"] < 1 and data["classes"][1]["reason"]
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
