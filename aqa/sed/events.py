"""Event decoding: segment probabilities -> median filter -> threshold -> contiguous regions -> events.

As in DCASE baselines (and PretrainedSED's ``decode``): each class's probability track is median-filtered
over ``median_window`` segments, segments with ``p > threshold`` are active, and each run of active
segments is one event ``{"label", "onset", "offset", "score"}`` with the run's highest filtered probability
as its score. Times are the nominal segment bounds (``hop_s`` grid), clipped to the clip's duration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

EVENT_KEYS = ("label", "onset", "offset", "score")


@dataclass
class EventConfig:
    median_window: int  # segments; 1 disables the filter (odd values keep events centred)
    threshold: float  # a segment is active when its (filtered) probability is above this
    decimals: int  # rounding of onsets, offsets and scores in the written events


def smooth(probs: np.ndarray, window: int) -> np.ndarray:
    """Median filter along time for each class: ``[N, C]`` -> ``[N, C]`` (edges repeat the end values)."""
    if window < 1:
        raise ValueError("median_window must be at least 1.")
    if window == 1 or len(probs) == 0:
        return np.asarray(probs, dtype=np.float64)
    return median_filter(np.asarray(probs, dtype=np.float64), size=(window, 1), mode="nearest")


def contiguous_regions(active: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a ``[N]`` bool track as ``(start, end)`` segment indices, end exclusive."""
    padded = np.concatenate([[False], np.asarray(active, dtype=bool), [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(change[::2].tolist(), change[1::2].tolist()))


def decode_events(probs: np.ndarray, hop_s: float, duration_s: float, names: list[str],
                  cfg: EventConfig) -> list[dict]:
    """Events of one clip from calibrated probabilities ``[N, C]`` at ``hop_s``; sorted by onset, then label."""
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(f"probabilities {probs.shape} do not match {len(names)} class names.")
    filtered = smooth(probs, cfg.median_window)
    events = []
    for c, name in enumerate(names):
        for start, end in contiguous_regions(filtered[:, c] > cfg.threshold):
            events.append({
                "label": name,
                "onset": round(start * hop_s, cfg.decimals),
                "offset": round(min(end * hop_s, duration_s), cfg.decimals),
                "score": round(float(filtered[start:end, c].max()), cfg.decimals),
            })
    events.sort(key=lambda e: (e["onset"], e["offset"], e["label"]))
    return events
