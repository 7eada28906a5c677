"""Segment posteriors: per-class probabilities per 160 ms BEATs row, pooled to a configured hop.

BEATs has no frame output; its predictor scores every token and the clip output is the mean token
logit. Token ``t * 8 + f`` is frequency patch ``f`` of row ``t`` (16 fbank frames = 160 ms hop, each
spanning 175 ms), so the segment logit of row ``t`` is the mean of its 8 token logits
(:attr:`BeatsOutput.row_logits`); averaging rows again reproduces the clip output. A hop of ``k`` rows
averages ``k`` row logits per segment.

Any length: the fbank is computed once per clip and cut into windows of ``window_rows`` rows (62 rows =
10 s, BEATs' training length); the last window is aligned to the clip's end, so it has full context and
only its new rows are kept. Kaldi frames are independent, so the windows see exactly the clip's frames.
Clips shorter than one row (2,800 samples, 0.175 s) give no segments and a note, never an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aqa.sed.beats import BeatsModel
from aqa.sed.fbank import FRAME_LENGTH, HOP_LENGTH, SAMPLE_RATE, beats_fbank, fbank_settings, num_frames
from aqa.sed.weights import WEIGHTS_FILE, load_sed_dir

LOGITS_KEY = "row_logits"


@dataclass
class PosteriorConfig:
    """How segment posteriors are read (a section of the calibrate and events configs)."""

    window_rows: int  # rows per model window (62 = 10 s for BEATs)
    hop_rows: int  # rows averaged into one segment (1 = 160 ms)
    batch_windows: int  # windows per forward pass


def row_seconds(patch: int = 16) -> float:
    """Time between rows: ``patch`` fbank frames of 10 ms (0.16 s)."""
    return patch * HOP_LENGTH / SAMPLE_RATE


def min_samples(patch: int = 16) -> int:
    """Fewest samples that give one row: ``(patch - 1) * 160 + 400`` (2,800 = 0.175 s)."""
    return (patch - 1) * HOP_LENGTH + FRAME_LENGTH


def short_clip_note(num_samples: int, patch: int = 16) -> str:
    return (f"clip of {num_samples / SAMPLE_RATE:.3f} s is shorter than one BEATs row "
            f"({min_samples(patch) / SAMPLE_RATE:.3f} s): no segments, no events")


def window_plan(total_rows: int, window_rows: int) -> list[tuple[int, int, int]]:
    """``[(first row of the window, rows in it, rows of it to keep from its start offset)]``.

    Returned as ``(start, length, keep_from)``: rows ``start + keep_from .. start + length`` are new.
    The last window ends at the clip's end and overlaps the previous one instead of being short.
    """
    if window_rows < 1:
        raise ValueError("window_rows must be at least 1.")
    plan = []
    start = 0
    while start < total_rows:
        if start + window_rows <= total_rows or start == 0:
            length = min(window_rows, total_rows - start)
            plan.append((start, length, 0))
        else:
            aligned = total_rows - window_rows  # full context for the last rows
            plan.append((aligned, window_rows, start - aligned))
        start += window_rows
    return plan


@torch.no_grad()
def clip_row_logits(model: BeatsModel, waveform: np.ndarray, window_rows: int, batch_windows: int = 4,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Segment logits of one clip: ``[S]`` 16 kHz wave -> ``[R, C]`` float32, ``R = num_frames(S) // 16``."""
    cfg = model.cfg
    patch = cfg.input_patch_size
    total_rows = num_frames(len(waveform)) // patch
    if total_rows == 0:
        return np.zeros((0, model.num_classes), dtype=np.float32)
    feats = torch.from_numpy(beats_fbank(waveform, cfg.fbank_mean, cfg.fbank_std, cfg.num_mel_bins))  # [T, M]
    plan = window_plan(total_rows, window_rows)
    width = max(length for _, length, _ in plan) * patch
    out = []
    for i in range(0, len(plan), batch_windows):
        chunk = plan[i:i + batch_windows]
        batch = torch.zeros(len(chunk), width, feats.shape[1])
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for j, (start, length, _) in enumerate(chunk):
            batch[j, : length * patch] = feats[start * patch:(start + length) * patch]
            mask[j, : length * patch] = True
        res = model(batch.to(device), mask.to(device) if not bool(mask.all()) else None)
        rows = res.row_logits.float().cpu()  # [W, width / patch, C]
        for j, (_, length, keep) in enumerate(chunk):
            out.append(rows[j, keep:length])
    return torch.cat(out).numpy()


def pool_rows(row_logits: np.ndarray, hop_rows: int) -> np.ndarray:
    """``[R, C]`` -> ``[ceil(R / hop_rows), C]``: mean row logit per segment (the last may be shorter)."""
    if hop_rows < 1:
        raise ValueError("hop_rows must be at least 1.")
    r, c = row_logits.shape
    n = -(-r // hop_rows)
    out = np.zeros((n, c), dtype=np.float32)
    for s in range(n):
        out[s] = row_logits[s * hop_rows:(s + 1) * hop_rows].mean(axis=0)
    return out


@dataclass
class SegmentPosteriors:
    """Segment logits of one clip at ``hop_s`` spacing; ``probs`` are the model's (uncalibrated) ones."""

    logits: np.ndarray  # [N, C]
    hop_s: float
    duration_s: float
    note: str | None = None

    @property
    def probs(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))

    def bounds(self) -> np.ndarray:
        """``[N, 2]`` nominal (onset, offset) seconds of each segment, clipped to the clip's duration."""
        starts = np.arange(len(self.logits)) * self.hop_s
        return np.stack([starts, np.minimum(starts + self.hop_s, self.duration_s)], axis=1)


def segment_posteriors(row_logits: np.ndarray, num_samples: int, hop_rows: int, patch: int = 16) -> SegmentPosteriors:
    """Pool a clip's row logits to ``hop_rows`` and attach times (and the short-clip note)."""
    note = short_clip_note(num_samples, patch) if len(row_logits) == 0 else None
    return SegmentPosteriors(logits=pool_rows(row_logits, hop_rows), hop_s=hop_rows * row_seconds(patch),
                             duration_s=num_samples / SAMPLE_RATE, note=note)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:24]


class SedDetector:
    """A SED directory ready to score clips; ``extract`` is a feature-cache extractor of row logits."""

    def __init__(self, sed_dir: str | Path, posteriors: PosteriorConfig, device: str | torch.device = "cpu"):
        self.sed_dir = Path(sed_dir)
        self.device = torch.device(device)
        self.model, self.labels = load_sed_dir(self.sed_dir, self.device)
        self.posteriors = posteriors
        self.digest = file_digest(self.sed_dir / WEIGHTS_FILE)  # a retrained model gets a fresh cache

    @property
    def patch(self) -> int:
        return self.model.cfg.input_patch_size

    def settings(self) -> dict:
        """What decides the cached row logits: the weights, the label order, the windows and the features."""
        return {"kind": "beats_row_logits", "weights": self.digest, "labels": self.labels.mids,
                "window_rows": self.posteriors.window_rows, "fbank": fbank_settings(self.model.cfg.num_mel_bins)}

    def extract(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        """Feature-cache extractor: ``[S]`` -> ``{"row_logits": [R, C], "num_samples": []}``."""
        logits = clip_row_logits(self.model, waveform, self.posteriors.window_rows, self.posteriors.batch_windows,
                                 self.device)
        return {LOGITS_KEY: logits, "num_samples": np.asarray(len(waveform), dtype=np.int64)}

    def from_cached(self, feats: dict[str, np.ndarray]) -> SegmentPosteriors:
        return segment_posteriors(feats[LOGITS_KEY], int(feats["num_samples"]), self.posteriors.hop_rows, self.patch)


def score_clips(detector: SedDetector, paths: list[Path], cache_dir: str | Path,
                progress: bool = True) -> dict[Path, SegmentPosteriors]:
    """Segment posteriors of every audio file, computed once per clip into the feature cache at ``cache_dir``."""
    from aqa.data.cache import FeatureCache  # the data layer's cache, keyed by file identity + our settings

    cache = FeatureCache(cache_dir, detector.settings())
    cache.ensure(paths, detector.extract, progress=progress)
    return {p: detector.from_cached(cache.get(p)) for p in paths}
