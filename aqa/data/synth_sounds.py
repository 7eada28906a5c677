"""The synthetic sound catalogue: a few animal "species" and sound events, each in its own frequency band.

The synthetic data set must be learnable by a tiny random-init audio model in minutes, so every sound
owns a band of its own on a log-mel axis (80 Hz to 7.8 kHz) and species differ by pitch contour as well.
Each instance is jittered a little so no two clips are sample-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sound:
    """One kind of sound the generator can place in a clip."""

    name: str  # how questions, options and the label map name it
    kind: str  # "species" (an animal call) or "event"
    contour: str  # pitch contour word for species ("rising", ...); "" for events
    pitch_hz: float  # centre of its band, which decides "which is higher" answers
    mid: str  # AudioSet-style label id in the synthetic label map


# Canonical order (species, then events, each alphabetical): options that list sounds use it.
SPECIES = (
    Sound("Azure warbler", "species", "rising", 3100.0, "/m/syn_azure_warbler"),
    Sound("Dusk hooter", "species", "steady", 500.0, "/m/syn_dusk_hooter"),
    Sound("Marsh whistler", "species", "falling", 5000.0, "/m/syn_marsh_whistler"),
    Sound("Reed cricket", "species", "trilling", 1900.0, "/m/syn_reed_cricket"),
)
EVENTS = (
    Sound("beep", "event", "", 1200.0, "/m/syn_beep"),
    Sound("engine hum", "event", "", 160.0, "/m/syn_engine_hum"),
    Sound("hiss", "event", "", 7100.0, "/m/syn_hiss"),
    Sound("rattle", "event", "", 4200.0, "/m/syn_rattle"),
)
CATALOGUE = SPECIES + EVENTS
CONTOURS = ("rising", "falling", "steady", "trilling")  # canonical option order for contour questions
BY_NAME = {s.name: s for s in CATALOGUE}


def _sweep(f0: float, f1: float, n: int, sr: int) -> np.ndarray:
    """A sine whose frequency moves linearly from f0 to f1 Hz over n samples; shape [n]."""
    freq = np.linspace(f0, f1, n)
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _band_noise(lo: float, hi: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """White noise restricted to [lo, hi] Hz by an FFT mask; shape [n]."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0.0
    return np.fft.irfft(spec, n)


def _pulses(rate_hz: float, duty: float, n: int, sr: int) -> np.ndarray:
    """A smoothed on/off gate at ``rate_hz`` with the given duty cycle; shape [n], values in [0, 1]."""
    phase = (np.arange(n) * rate_hz / sr) % 1.0
    gate = (phase < duty).astype(np.float64)
    k = max(1, int(0.002 * sr))  # 2 ms smoothing keeps the gate from clicking
    return np.convolve(gate, np.ones(k) / k, mode="same")


def _source(sound: Sound, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """The raw waveform of one instance of ``sound``, before envelope and level; shape [n]."""
    j = 1.0 + rng.uniform(-0.04, 0.04)  # per-instance pitch jitter
    name = sound.name
    if name == "Azure warbler":
        return _sweep(2600 * j, 3600 * j, n, sr)
    if name == "Dusk hooter":
        return _sweep(500 * j, 500 * j, n, sr) + 0.3 * _sweep(1000 * j, 1000 * j, n, sr)
    if name == "Marsh whistler":
        return _sweep(5400 * j, 4600 * j, n, sr)
    if name == "Reed cricket":
        return _sweep(1900 * j, 1900 * j, n, sr) * _pulses(25.0 * j, 0.5, n, sr)
    if name == "beep":
        return _sweep(1200 * j, 1200 * j, n, sr)
    if name == "engine hum":
        t = np.arange(n) / sr
        tone = sum(a * _sweep(h * 80 * j, h * 80 * j, n, sr) for h, a in ((1, 1.0), (2, 0.6), (3, 0.4)))
        return tone * (1.0 + 0.2 * np.sin(2 * np.pi * 4.0 * t))
    if name == "hiss":
        return _band_noise(6500, 7800, n, sr, rng)
    if name == "rattle":
        return _band_noise(3900, 4500, n, sr, rng) * _pulses(10.0 * j, 0.35, n, sr)
    raise KeyError(f"no synthesis rule for sound {name!r}; add one to aqa/data/synth_sounds.py.")


def render(sound: Sound, seconds: float, level_db: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One instance of ``sound``, ``seconds`` long, at ``level_db`` dB RMS re full scale.

    Returns float64 samples, shape ``[round(seconds * sr)]``, with 10 ms raised-cosine fades so onsets and
    offsets are where the annotations say and do not click.
    """
    n = max(1, int(round(seconds * sr)))
    x = _source(sound, n, sr, rng)
    fade = min(n // 2, int(0.01 * sr))
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
        x[:fade] *= ramp
        x[n - fade :] *= ramp[::-1]
    rms = float(np.sqrt(np.mean(x**2))) or 1.0
    return x * (10.0 ** (level_db / 20.0) / rms)


def mix(
    placed: list[tuple[Sound, float, float, float]], seconds: float, noise_db: float, sr: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A clip: a white-noise floor at ``noise_db`` dB RMS plus each ``(sound, onset, offset, level_db)``.

    Returns float32 samples in [-1, 1], shape ``[round(seconds * sr)]``.
    """
    n = int(round(seconds * sr))
    out = rng.standard_normal(n) * 10.0 ** (noise_db / 20.0)
    for sound, onset, offset, level_db in placed:
        start = int(round(onset * sr))
        wave = render(sound, offset - onset, level_db, sr, rng)[: n - start]
        out[start : start + len(wave)] += wave
    return np.clip(out, -1.0, 1.0).astype(np.float32)
