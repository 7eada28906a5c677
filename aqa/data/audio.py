"""Audio decoding: any WAV/FLAC/OGG file to 16 kHz mono float32, with errors a person can act on.

Decoding is soundfile (libsndfile), resampling is librosa's soxr backend; torchaudio is never used.
Clips longer than 30 s are kept whole: cutting them is a backbone's business, not the data layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from aqa.errors import UserError

SAMPLE_RATE = 16000  # every backbone in this project (Whisper-style front ends) expects 16 kHz
MIN_DURATION_S = 0.05  # shorter clips hold less than one 25 ms analysis window pair: nothing to hear
RESAMPLE_TYPE = "soxr_hq"


class AudioError(UserError, ValueError):
    """An audio file that cannot be used; the message says why in plain words."""


@dataclass
class DecodedAudio:
    """A decoded file at its native rate, before any resampling."""

    samples: np.ndarray  # [S, C] float32
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate

    @property
    def channels(self) -> int:
        return self.samples.shape[1]


def decode_audio(path: str | Path) -> DecodedAudio:
    """Decode a file at its native rate and check it is usable.

    Returns samples ``[S, C]`` float32 (C channels as stored). Raises ``AudioError`` when the file is
    missing, cannot be decoded, holds no samples, holds NaN/inf, or is shorter than ``MIN_DURATION_S``.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"audio file '{path.name}' not found")
    if not path.is_file():
        raise AudioError(f"audio path '{path.name}' is not a file")
    try:
        samples, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError) as err:
        # libsndfile's own words ("Format not recognised", "unspecified internal error") say little
        # to a user; lead with ours and keep theirs for the curious.
        raise AudioError(f"cannot decode audio '{path.name}' (corrupt, or not WAV/FLAC/OGG): {err}") from err
    if samples.size == 0 or sample_rate <= 0:
        raise AudioError(f"audio '{path.name}' is empty (no samples)")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"audio '{path.name}' holds {bad} NaN/inf samples")
    decoded = DecodedAudio(samples=samples, sample_rate=int(sample_rate))
    if decoded.duration_s < MIN_DURATION_S:
        raise AudioError(
            f"audio '{path.name}' lasts {decoded.duration_s * 1000:.1f} ms, under the "
            f"{MIN_DURATION_S * 1000:.0f} ms minimum"
        )
    return decoded


def downmix_resample(decoded: DecodedAudio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Downmix ``[S, C]`` to mono and resample to ``sample_rate``: returns ``[S']`` float32."""
    mono = decoded.samples.mean(axis=1, dtype=np.float32)  # [S]
    if decoded.sample_rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=decoded.sample_rate, target_sr=sample_rate, res_type=RESAMPLE_TYPE)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Load any WAV (PCM or float subtype), FLAC or OGG file as mono float32 at ``sample_rate``.

    Returns ``[S]`` with ``S = round(duration_s * sample_rate)``. Raises ``AudioError`` (a ValueError)
    naming the reason when the file cannot be used (see ``decode_audio``).
    """
    return downmix_resample(decode_audio(path), sample_rate)


def header_duration(path: str | Path) -> float:
    """Duration in seconds from the file's header, nothing decoded: for ordering clips by length, not for
    checking them (``audio_duration`` does that)."""
    info = sf.info(str(path))
    return info.frames / info.samplerate if info.samplerate > 0 else 0.0


def audio_duration(path: str | Path) -> float:
    """Decode ``path`` fully (so corrupt tails are caught) and return its duration in seconds."""
    return decode_audio(path).duration_s
