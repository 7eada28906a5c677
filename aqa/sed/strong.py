"""Strong labels over manifest audio: AudioSet-Strong TSV rows -> per-segment targets for a SED's classes.

A TSV row is ``segment_id, start, end, MID``. Its clip is the manifest audio file whose name (without
suffix) is the ``segment_id``, as AudioSet clips and the synthetic set are named. Several questions may
share one clip; each clip is used once. Clips without TSV rows are left out (an unlabelled clip is not a
negative one), and rows whose MID the SED does not predict are dropped; both are counted.

Targets live on the SED's segment grid: segment ``s`` spans ``[s * hop, (s + 1) * hop)`` seconds, and is
positive for a class when an event covers at least ``min_overlap`` of the shorter of the two (so an event
shorter than a segment still marks the segment it sits in).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from aqa.data.manifest import load_manifest
from aqa.data.temporal_qa import AnnotationError, read_strong_tsv
from aqa.errors import UserError
from aqa.sed.labels import LabelMap


class StrongLabelError(UserError, ValueError):
    """Strong labels that cannot be matched to the manifest; the message says what to check."""


@dataclass
class StrongClip:
    """One audio clip with its events as (onset s, offset s, class index)."""

    clip_id: str
    audio: Path
    events: list[tuple[float, float, int]]


@dataclass
class StrongReport:
    clips: int = 0
    unlabelled_clips: int = 0  # manifest clips with no TSV row: left out
    tsv_clips_without_audio: int = 0  # TSV clips not in the manifest: ignored
    bad_rows: list[tuple[str, str]] = field(default_factory=list)
    dropped_mids: Counter = field(default_factory=Counter)  # MIDs the SED does not predict -> rows

    def lines(self) -> list[str]:
        out = [f"{self.clips} labelled clips"]
        if self.unlabelled_clips:
            out.append(f"{self.unlabelled_clips} manifest clips have no TSV rows and are left out")
        if self.tsv_clips_without_audio:
            out.append(f"{self.tsv_clips_without_audio} TSV clips are not in the manifest and are ignored")
        if self.bad_rows:
            out.append(f"{len(self.bad_rows)} unreadable TSV rows skipped (first: {self.bad_rows[0][1]})")
        if self.dropped_mids:
            top = ", ".join(f"{m} ({n})" for m, n in self.dropped_mids.most_common(3))
            out.append(f"{sum(self.dropped_mids.values())} rows of {len(self.dropped_mids)} labels the SED does "
                       f"not predict were dropped: {top}")
        return out


def load_strong_clips(manifest: str | Path, tsv: str | Path, labels: LabelMap) -> tuple[list[StrongClip], StrongReport]:
    """The manifest's distinct clips that have strong labels, with events mapped to ``labels`` rows."""
    m = load_manifest(manifest)
    try:
        rows, bad = read_strong_tsv(tsv)
    except AnnotationError as err:
        raise StrongLabelError(str(err)) from err
    report = StrongReport(bad_rows=bad)
    seen: set[Path] = set()
    clips = []
    for record in m.records:
        path = m.audio_path(record)
        if path in seen:
            continue
        seen.add(path)
        clip_rows = rows.get(path.stem)
        if clip_rows is None:
            report.unlabelled_clips += 1
            continue
        events = []
        for start, end, mid in clip_rows:
            idx = labels.index_of(mid)
            if idx is None:
                report.dropped_mids[mid] += 1
            else:
                events.append((start, end, idx))
        clips.append(StrongClip(path.stem, path, sorted(events)))
    report.clips = len(clips)
    report.tsv_clips_without_audio = len(set(rows) - {p.stem for p in seen})
    if not clips:
        raise StrongLabelError(
            f"no clip of {manifest} has rows in {tsv}: TSV segment ids must equal the audio file names "
            f"(without suffix), e.g. {next(iter(rows), 'Y...')!r} for {next(iter(seen), Path('?')).name!r}."
        )
    return clips, report


def segment_targets(events: list[tuple[float, float, int]], n_segments: int, n_classes: int, hop_s: float,
                    min_overlap: float) -> np.ndarray:
    """``[n_segments, n_classes]`` float32 0/1 targets on a ``hop_s`` grid (see the module docstring)."""
    out = np.zeros((n_segments, n_classes), dtype=np.float32)
    if n_segments == 0:
        return out
    seg_start = np.arange(n_segments) * hop_s
    seg_end = seg_start + hop_s
    for onset, offset, idx in events:
        overlap = np.minimum(seg_end, offset) - np.maximum(seg_start, onset)  # [S]
        need = min_overlap * min(hop_s, offset - onset)
        out[(overlap > 0) & (overlap >= need - 1e-9), idx] = 1.0
    return out


def num_samples_16k(path: str | Path) -> int:
    """Samples the clip will have at 16 kHz, from the file header (nothing decoded)."""
    info = sf.info(str(path))
    return int(round(info.frames * 16000 / info.samplerate))


def class_priors(clips: list[StrongClip], n_classes: int, hop_s: float, min_overlap: float, rows_of,
                 floor: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-class share of positive segments: ``(priors [C] clipped to [floor, 1 - floor], positives [C], segments)``.

    ``rows_of(clip) -> int`` gives a clip's segment count (from its length).
    """
    positives = np.zeros(n_classes, dtype=np.int64)
    total = 0
    for clip in clips:
        n = rows_of(clip)
        total += n
        positives += segment_targets(clip.events, n, n_classes, hop_s, min_overlap).sum(0).astype(np.int64)
    if total == 0:
        raise StrongLabelError("the training clips hold no segments: every clip is shorter than one BEATs row.")
    return np.clip(positives / total, floor, 1.0 - floor), positives, total
