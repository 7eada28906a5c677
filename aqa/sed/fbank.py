"""BEATs' input features: Kaldi-compatible 128-bin log-mel fbank, computed with ``transformers.audio_utils``.

The official ``BEATs.preprocess`` calls ``torchaudio.compliance.kaldi.fbank(waveform * 2**15,
num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)`` with the remaining Kaldi
defaults (povey window, dither 0, pre-emphasis 0.97, DC removal, ``snip_edges``, 512-point FFT, power
spectrum, 20 Hz to Nyquist mel triangles in mel space, log with a float32-epsilon floor), then normalises
with ``(fbank - 15.41663) / (2 * 6.55582)``. torchaudio does not load next to this torch, so the same
computation runs on ``transformers.audio_utils.spectrogram_batch`` with those settings. They define the
model's input (like an image model's pixel normalisation), not a tunable, which is why they live here.

Frames: ``1 + (S - 400) // 160`` for ``S >= 400`` samples, else none; one 160 ms BEATs row takes 16.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from transformers.audio_utils import mel_filter_bank, spectrogram_batch, window_function

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512  # Kaldi pads the 400-sample frame to the next power of two
PREEMPHASIS = 0.97
LOW_FREQ = 20.0  # Kaldi's default low edge; the high edge is the Nyquist frequency
MEL_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi/torchaudio floor before the log
INT16_SCALE = 2**15  # BEATs feeds Kaldi int16-range samples
# Frames per spectrogram_batch item: the helper loops over frames in Python and vectorises over items,
# so cutting one clip into blocks of frames (exact: Kaldi frames are computed independently) is ~3x faster.
BLOCK_FRAMES = 64


def fbank_settings(num_mel_bins: int = 128) -> dict:
    """Everything that decides the features (the feature cache is keyed by it)."""
    return {"kind": "kaldi_fbank", "sample_rate": SAMPLE_RATE, "num_mel_bins": num_mel_bins,
            "frame_length": FRAME_LENGTH, "hop_length": HOP_LENGTH, "fft_length": FFT_LENGTH,
            "preemphasis": PREEMPHASIS, "low_freq": LOW_FREQ, "window": "povey", "mel_floor": MEL_FLOOR,
            "scale": INT16_SCALE}


def num_frames(num_samples: int) -> int:
    """Kaldi frame count with ``snip_edges``: ``1 + (S - 400) // 160``, or 0 below one frame."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // HOP_LENGTH


@lru_cache(maxsize=4)
def _filters(num_mel_bins: int) -> tuple[np.ndarray, np.ndarray]:
    window = window_function(FRAME_LENGTH, "povey", periodic=False)  # Kaldi's povey window is symmetric
    with warnings.catch_warnings():
        # Kaldi's lowest mel triangles are narrower than one FFT bin and come out all zero; so do Kaldi's own.
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        mel = mel_filter_bank(FFT_LENGTH // 2 + 1, num_mel_bins, LOW_FREQ, SAMPLE_RATE / 2, SAMPLE_RATE,
                              norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)  # [257, M]
    return window, mel


def kaldi_fbank(waveform: np.ndarray, num_mel_bins: int = 128) -> np.ndarray:
    """Log-mel fbank of a 16 kHz mono wave in [-1, 1]: ``[S]`` -> ``[T, num_mel_bins]`` float32, ``T = num_frames(S)``."""
    wave = np.asarray(waveform, dtype=np.float64).reshape(-1) * INT16_SCALE
    total = num_frames(wave.shape[0])
    if total == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    window, mel = _filters(num_mel_bins)
    pieces = [wave[HOP_LENGTH * s: HOP_LENGTH * (min(s + BLOCK_FRAMES, total) - 1) + FRAME_LENGTH]
              for s in range(0, total, BLOCK_FRAMES)]
    specs = spectrogram_batch(pieces, window, FRAME_LENGTH, HOP_LENGTH, fft_length=FFT_LENGTH, power=2.0,
                              center=False, preemphasis=PREEMPHASIS, mel_filters=mel, mel_floor=MEL_FLOOR,
                              log_mel="log", remove_dc_offset=True, dtype=np.float32)  # each [M, frames]
    out = np.concatenate([s.T for s in specs], axis=0)
    if out.shape[0] != total:  # the helper's frame count must agree with Kaldi's
        raise RuntimeError(f"fbank produced {out.shape[0]} frames for {wave.shape[0]} samples, expected {total}.")
    return np.ascontiguousarray(out, dtype=np.float32)


def normalize(fbank: np.ndarray, mean: float, std: float) -> np.ndarray:
    """BEATs' normalisation ``(fbank - mean) / (2 * std)`` (the official code halves the scale)."""
    return ((fbank - mean) / (2.0 * std)).astype(np.float32)


def beats_fbank(waveform: np.ndarray, mean: float, std: float, num_mel_bins: int = 128) -> np.ndarray:
    """The model input for one wave: ``[S]`` -> normalised ``[T, num_mel_bins]``."""
    return normalize(kaldi_fbank(waveform, num_mel_bins), mean, std)
