"""AudioSet-Strong annotations to a manifest of temporal questions (see ``aqa.data.temporal_qa``).

Audio is found as ``<segment_id>.wav`` (or ``.flac``) anywhere under the audio root. A clip without audio,
a clip left with no events once generic labels are removed, and an unreadable TSV row are each
quarantined with the reason; every other clip yields one question per supported type.
"""

from __future__ import annotations

from pathlib import Path

from aqa.data.convert import AudioIndex, ConversionError, ManifestWriter, Summary
from aqa.data.manifest import SPLITS
from aqa.data.temporal_qa import (
    AnnotationError,
    TemporalQAConfig,
    clean_events,
    clip_questions,
    question_record,
    read_label_map,
    read_strong_tsv,
)
from aqa.data.validate import RecordError

AUDIO_SUFFIXES = (".wav", ".flac")


def find_clip_audio(audio: AudioIndex, segment_id: str) -> str:
    """The clip's file relative to the audio root; ``RecordError`` naming what was looked for."""
    for suffix in AUDIO_SUFFIXES:
        try:
            return audio.resolve(segment_id + suffix)
        except RecordError:
            continue
    raise RecordError(f"no audio file {segment_id}.wav or {segment_id}.flac under the audio root")


def convert_audioset_strong(
    tsv: str | Path,
    labels: str | Path,
    audio_root: str | Path,
    out_dir: str | Path,
    cfg: TemporalQAConfig,
    split: str = "train",
    progress: bool = True,
    verbose: bool = True,
) -> Summary:
    """Write ``out_dir/<split>.jsonl`` of temporal questions from a strong-label TSV; returns the Summary.

    Counts are per question kept and per clip (or TSV row) quarantined.
    """
    if split not in SPLITS:
        raise ConversionError(f"--split {split} is unknown; use one of {', '.join(SPLITS)}.")
    try:
        label_map = read_label_map(labels)
        clips, bad_rows = read_strong_tsv(tsv)
    except AnnotationError as err:
        raise ConversionError(str(err)) from err
    drop = {g.strip().lower() for g in cfg.generic_labels}
    vocab = sorted({n for m, n in label_map.items() if n.lower() not in drop and m.lower() not in drop})
    audio = AudioIndex(audio_root)
    with ManifestWriter(out_dir, audio_root, source="audioset_strong", splits=[split], total=None,
                        progress=progress, verbose=verbose) as writer:
        for row_id, reason in bad_rows:
            writer.reject(tsv, row_id, reason, split=split)
        for segment_id, rows in clips.items():
            events, dropped = clean_events(rows, label_map, cfg.generic_labels, cfg.merge_gap_s)
            if not events:
                why = ", ".join(f"{n} {k}" for k, n in dropped.items() if n) or "no rows"
                writer.reject(tsv, segment_id, f"no events left after removing generic and unknown labels ({why})",
                              split=split)
                continue
            try:
                rel = find_clip_audio(audio, segment_id)
            except RecordError as err:
                writer.reject(tsv, segment_id, str(err), split=split)
                continue
            for q in clip_questions(segment_id, events, cfg, vocab):
                writer.add(question_record(segment_id, q, events, rel, split, cfg.part), tsv)
        return writer.close()
