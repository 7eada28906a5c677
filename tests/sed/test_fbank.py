"""BEATs' fbank against a hand-written Kaldi computation, frame counts, and the normalisation."""

import numpy as np
import pytest

from aqa.sed.fbank import beats_fbank, kaldi_fbank, num_frames
from tests.helpers import sine

SR = 16000


def _hand_kaldi_fbank(wave: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """Kaldi fbank as its documentation defines it, written out step by step (float64)."""
    x = wave.astype(np.float64) * 32768.0
    n = 1 + (len(x) - 400) // 160
    frames = np.stack([x[i * 160: i * 160 + 400] for i in range(n)])  # [T, 400], snip_edges
    frames = frames - frames.mean(axis=1, keepdims=True)  # DC removal
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # first sample pre-emphasised by itself
    frames = frames - 0.97 * prev
    i = np.arange(400)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * i / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames * povey, n=512)) ** 2  # [T, 257]

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / (n_mels + 1)
    bin_mel = mel(np.arange(256) * SR / 512)  # Kaldi uses bins 0..255; Nyquist gets weight 0
    banks = np.zeros((n_mels, 257))
    for m in range(n_mels):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        up = (bin_mel - left) / (center - left)
        down = (right - bin_mel) / (right - center)
        banks[m, :256] = np.maximum(0.0, np.minimum(up, down))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_known_sine_matches_the_hand_computed_reference():
    wave = sine(0.5, freq=1000.0) + 0.01 * np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    ours = kaldi_fbank(wave)
    ref = _hand_kaldi_fbank(wave)
    assert ours.shape == ref.shape == (48, 128)
    assert np.abs(ours - ref).max() < 2e-3  # float32 output of values around 10..25


def test_the_sine_energy_peaks_in_the_mel_band_of_its_frequency():
    for freq in (300.0, 1000.0, 4000.0):
        fb = kaldi_fbank(sine(0.3, freq=freq))
        lo, hi = 1127 * np.log(1 + 20 / 700), 1127 * np.log(1 + 8000 / 700)
        centers = lo + (np.arange(128) + 1) * (hi - lo) / 129
        expected = int(np.argmin(np.abs(centers - 1127 * np.log(1 + freq / 700))))
        assert abs(int(np.median(fb.argmax(axis=1))) - expected) <= 1


@pytest.mark.parametrize("samples,frames", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (2799, 15),
                                            (2800, 16), (16000, 98), (48123, 299), (160000, 998)])
def test_frame_count_for_a_given_length(samples, frames):
    assert num_frames(samples) == frames
    assert kaldi_fbank(np.zeros(samples, dtype=np.float32) + 0.001).shape == (frames, 128)


def test_normalisation_is_beats_mean_and_twice_the_std():
    wave = sine(0.2, freq=440.0)
    raw = kaldi_fbank(wave)
    norm = beats_fbank(wave, 15.41663, 6.55582)
    assert np.allclose(norm, (raw - 15.41663) / (2 * 6.55582), atol=1e-6)


def test_silence_floors_at_log_epsilon():
    fb = kaldi_fbank(np.zeros(1600, dtype=np.float32))
    assert np.allclose(fb, np.log(np.finfo(np.float32).eps))
