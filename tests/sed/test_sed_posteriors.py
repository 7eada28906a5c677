"""Segment read-out: row logits reproduce the clip output; windows for long clips; short clips; the cache."""

import numpy as np
import torch

from aqa.sed.fbank import beats_fbank
from aqa.sed.labels import LabelMap
from aqa.sed.posteriors import (
    PosteriorConfig,
    SedDetector,
    clip_row_logits,
    pool_rows,
    score_clips,
    segment_posteriors,
    window_plan,
)
from tests.helpers import noise, tiny_beats, write_wave


def test_segment_mean_of_token_logits_reproduces_the_clip_output():
    model = tiny_beats()
    fbank = torch.randn(2, 7 * 16, 128)
    with torch.no_grad():
        out = model(fbank)
    b, n, c = out.token_logits.shape
    assert (b, n, c) == (2, 7 * 8, 3)
    # rows: the 8 frequency tokens of each 160 ms row, token = row * 8 + f (time-major)
    assert torch.allclose(out.row_logits, out.token_logits.view(2, 7, 8, 3).mean(2))
    assert torch.allclose(out.row_logits[:, 2], out.token_logits[:, 16:24].mean(1))
    # the mean of the segment logits is the official clip output, sigmoid(mean of all token logits)
    assert torch.allclose(torch.sigmoid(out.row_logits.mean(1)), out.clip_probs, atol=1e-6)
    assert torch.allclose(out.clip_probs, torch.sigmoid(out.token_logits.mean(1)), atol=1e-6)
    pooled = pool_rows(out.row_logits[0].numpy(), hop_rows=7)
    assert pooled.shape == (1, 3) and np.allclose(pooled[0], out.clip_logits[0].numpy(), atol=1e-6)


def test_pooling_to_a_hop_means_row_logits_with_a_short_last_segment():
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)  # 5 rows, 2 classes
    assert pool_rows(rows, 2).tolist() == [[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]
    post = segment_posteriors(rows, num_samples=16000, hop_rows=2)
    assert np.isclose(post.hop_s, 0.32)
    assert np.allclose(post.bounds(), [[0.0, 0.32], [0.32, 0.64], [0.64, 0.96]])


def test_window_plan_aligns_the_last_window_to_the_end():
    assert window_plan(3, 4) == [(0, 3, 0)]
    assert window_plan(8, 4) == [(0, 4, 0), (4, 4, 0)]
    assert window_plan(10, 4) == [(0, 4, 0), (4, 4, 0), (6, 4, 2)]


def test_long_clips_are_windowed_and_each_row_comes_from_its_window():
    model = tiny_beats(seed=1)
    wave = noise(2.0)  # 198 frames -> 12 rows
    cfg = model.cfg
    rows = clip_row_logits(model, wave, window_rows=5, batch_windows=2)
    assert rows.shape == (12, 3)
    feats = torch.from_numpy(beats_fbank(wave, cfg.fbank_mean, cfg.fbank_std))
    with torch.no_grad():
        second = model(feats[None, 5 * 16: 10 * 16]).row_logits[0].numpy()  # window rows 5..9
        last = model(feats[None, 7 * 16: 12 * 16]).row_logits[0].numpy()  # aligned to the end: rows 7..11
        whole = model(feats[None]).row_logits[0].numpy()
    assert np.allclose(rows[5:10], second, atol=1e-5)
    assert np.allclose(rows[10:12], last[3:5], atol=1e-5)
    assert np.allclose(clip_row_logits(model, wave, window_rows=64), whole, atol=1e-5)  # one window = one pass


def test_a_clip_shorter_than_one_row_gives_no_segments_and_a_note():
    model = tiny_beats()
    rows = clip_row_logits(model, noise(0.17), window_rows=62)
    assert rows.shape == (0, 3)
    post = segment_posteriors(rows, num_samples=2720, hop_rows=1)
    assert post.logits.shape == (0, 3) and "shorter than one BEATs row (0.175 s)" in post.note
    assert clip_row_logits(model, noise(0.175), window_rows=62).shape == (1, 3)  # 2,800 samples: one row


def test_score_clips_caches_per_clip(tmp_path, tiny):
    sed = tiny.beats(LabelMap.from_pairs([("/m/a", "A"), ("/m/b", "B")]), seed=4)
    paths = [write_wave(tmp_path / f"clip{i}.wav", noise(seconds, i)) for i, seconds in enumerate((1.0, 0.1, 0.6))]
    det = SedDetector(sed, PosteriorConfig(window_rows=62, hop_rows=2, batch_windows=2))
    first = score_clips(det, paths, tmp_path / "cache", progress=False)
    assert [first[p].logits.shape for p in paths] == [(3, 2), (0, 2), (2, 2)]  # 6, 0 and 3 rows
    assert first[paths[1]].note is not None and first[paths[0]].note is None
    calls = []
    det.extract = lambda wave: calls.append(1)  # a second run must not score again
    again = score_clips(det, paths, tmp_path / "cache", progress=False)
    assert not calls and all(np.array_equal(first[p].logits, again[p].logits) for p in paths)
