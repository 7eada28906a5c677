"""AudioSet-Strong annotations rewritten as temporal multiple-choice questions.

A strong-label TSV (header ``segment_id start_time_seconds end_time_seconds label``, one row per event,
``label`` a MID) is grouped per clip. Per clip, MIDs become display names (``mid_to_display_name.tsv``),
generic or ambiguous labels are removed, and same-label events that overlap (or lie within
``merge_gap_s``) are merged. Four question types follow, each with several phrasings:

- ``counting``: how many different sounds;
- ``sequencing``: the order of the first two distinct sounds;
- ``duration``: how long a named sound lasts (a sound heard once, rounded to ``duration_step_s``);
- ``frequency``: how many times a named sound occurs.

Three distractors come from offline rules: numeric neighbours, the other order, other labels in the clip,
then other labels of the label map. Every random choice uses an RNG seeded by (seed, clip id), so output
is deterministic and independent of row order. Knobs live in ``configs/data/audioset_strong.yaml``.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqa.config import load_config
from aqa.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "audioset_strong.yaml"
TSV_COLUMNS = ["segment_id", "start_time_seconds", "end_time_seconds", "label"]
QUESTION_TYPES = ("counting", "sequencing", "duration", "frequency")

PHRASES = {
    "counting": [
        "How many different sounds can be heard in this clip?",
        "How many distinct types of sound occur in the recording?",
        "Count the different kinds of sound in this audio. How many are there?",
    ],
    "sequencing": [
        "What are the first two different sounds you hear, in order?",
        "Which two distinct sounds start first, and in which order?",
        "In what order do the first two different sounds begin?",
    ],
    "duration": [
        'How long does the sound "{label}" last?',
        'For how many seconds can "{label}" be heard?',
        'What is the duration of the "{label}" sound?',
    ],
    "frequency": [
        'How many times does "{label}" occur in this clip?',
        'How often can you hear "{label}"?',
        'How many separate times is "{label}" heard?',
    ],
}


class AnnotationError(UserError, ValueError):
    """A TSV or label map that cannot be read at all; the message names the file and the fix."""


@dataclass
class TemporalQAConfig:
    """Knobs of the AudioSet-Strong question generator; values live in ``configs/data/audioset_strong.yaml``."""

    seed: int
    part: str  # manifest part name of the generated questions
    question_types: list[str]  # which of counting / sequencing / duration / frequency to generate
    generic_labels: list[str]  # display names or MIDs removed before any question (case-insensitive)
    merge_gap_s: float  # same-label events closer than this are one occurrence
    min_order_gap_s: float  # sequencing: first onsets must be this far apart, or the order is ambiguous
    duration_step_s: float  # duration answers and their neighbours are multiples of this


def load_temporal_qa_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TemporalQAConfig:
    cfg = load_config(TemporalQAConfig, path or DEFAULT_CONFIG, overrides)
    unknown = [t for t in cfg.question_types if t not in QUESTION_TYPES]
    if unknown:
        raise ValueError(f"question_types names unknown types {unknown}; use some of {', '.join(QUESTION_TYPES)}.")
    if cfg.duration_step_s <= 0:
        raise ValueError("duration_step_s must be positive (for example 0.5).")
    return cfg


@dataclass(frozen=True)
class Event:
    """One occurrence of a sound in a clip, after merging."""

    label: str  # display name
    start: float  # seconds
    end: float  # seconds


# --------------------------------------------------------------------------- reading annotations


def read_label_map(path: str | Path) -> dict[str, str]:
    """``mid_to_display_name.tsv`` (no header, ``mid<TAB>display_name``) as ``{mid: name}``."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"label map {path} does not exist; pass --labels mid_to_display_name.tsv.")
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise AnnotationError(f"{path}:{lineno}: expected 'mid<TAB>display_name', got {line!r}.")
        if lineno == 1 and cols[0].strip().lower() == "mid":
            continue  # tolerate a header, though the official file has none
        names[cols[0].strip()] = cols[1].strip()
    if not names:
        raise AnnotationError(f"label map {path} holds no labels.")
    return names


def read_strong_tsv(path: str | Path) -> tuple[dict[str, list[tuple[float, float, str]]], list[tuple[str, str]]]:
    """Group a strong-label TSV by clip: ``({segment_id: [(start, end, mid)]}, [(row id, reason)])``.

    Clips keep their first-seen order. Unreadable rows (wrong column count, non-numeric or reversed
    times) come back with a reason instead of stopping the run.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"strong-label TSV {path} does not exist; check --tsv.")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().split("\t") != TSV_COLUMNS:
        raise AnnotationError(
            f"{path} must start with the header '{chr(9).join(TSV_COLUMNS)}' (tab-separated), "
            f"got {lines[0][:80] if lines else 'an empty file'!r}."
        )
    clips: dict[str, list[tuple[float, float, str]]] = {}
    bad: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = line.split("\t")
        row_id = f"{cols[0]}:line{lineno}"
        if len(cols) != 4:
            bad.append((row_id, f"line {lineno}: expected 4 tab-separated columns, got {len(cols)}"))
            continue
        try:
            start, end = float(cols[1]), float(cols[2])
        except ValueError:
            bad.append((row_id, f"line {lineno}: times {cols[1]!r}, {cols[2]!r} are not numbers"))
            continue
        if not (0 <= start < end) or not np.isfinite(end):
            bad.append((row_id, f"line {lineno}: event from {start} s to {end} s is empty or reversed"))
            continue
        clips.setdefault(cols[0], []).append((start, end, cols[3].strip()))
    return clips, bad


def clean_events(
    rows: list[tuple[float, float, str]], labels: dict[str, str], generic: list[str], merge_gap_s: float
) -> tuple[list[Event], dict[str, int]]:
    """Named, de-generalised, merged events sorted by onset, and how many rows each rule dropped.

    Rows with a MID missing from the label map are dropped (counted as ``unknown``); rows whose MID or
    display name is in ``generic`` are dropped (``generic``); overlapping same-label rows are merged.
    """
    drop = {g.strip().lower() for g in generic}
    dropped = {"unknown": 0, "generic": 0}
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for start, end, mid in rows:
        name = labels.get(mid)
        if name is None:
            dropped["unknown"] += 1
        elif mid.lower() in drop or name.lower() in drop:
            dropped["generic"] += 1
        else:
            by_label[name].append((start, end))
    events = []
    for name, spans in by_label.items():
        spans.sort()
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start <= cur_end + merge_gap_s:
                cur_end = max(cur_end, end)
            else:
                events.append(Event(name, cur_start, cur_end))
                cur_start, cur_end = start, end
        events.append(Event(name, cur_start, cur_end))
    events.sort(key=lambda e: (e.start, e.end, e.label))
    return events, dropped


# --------------------------------------------------------------------------- questions


@dataclass
class TemporalQuestion:
    question_type: str
    question: str
    choices: list[str]  # shuffled; the answer is among them
    answer: str
    label: str | None = None  # the sound asked about (duration, frequency)


def clip_rng(seed: int, segment_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(segment_id.encode())])


def numeric_neighbours(value: float, step: float, lowest: float, n: int = 3) -> list[float]:
    """The ``n`` values nearest ``value`` on a grid of ``step`` (above first on ties), none below ``lowest``."""
    out, k = [], 1
    while len(out) < n:
        for cand in (value + k * step, value - k * step):
            if cand >= lowest - 1e-9 and len(out) < n:
                out.append(round(cand, 6))
        k += 1
    return out


def _fmt_seconds(x: float) -> str:
    return f"{x:g} seconds" if x != 1 else "1 second"


def _finish(rng: np.random.Generator, qtype: str, answer: str, distractors: list[str], label=None, **kw):
    choices = [answer, *distractors]
    choices = [choices[int(i)] for i in rng.permutation(len(choices))]
    phrases = PHRASES[qtype]
    question = phrases[int(rng.integers(len(phrases)))].format(label=label, **kw)
    return TemporalQuestion(qtype, question, choices, answer, label)


def first_onsets(events: list[Event]) -> list[tuple[str, float]]:
    """Each distinct label with its first onset, in order of that onset."""
    first: dict[str, float] = {}
    for e in events:
        first.setdefault(e.label, e.start)
    return sorted(first.items(), key=lambda kv: (kv[1], kv[0]))


def counting(events: list[Event], rng, cfg, vocab: list[str]) -> TemporalQuestion | None:
    n = len({e.label for e in events})
    wrong = [str(int(v)) for v in numeric_neighbours(n, 1, lowest=1)]
    return _finish(rng, "counting", str(n), wrong)


def sequencing(events: list[Event], rng, cfg, vocab: list[str]) -> TemporalQuestion | None:
    order = first_onsets(events)
    if len(order) < 2:
        return None
    gaps = [b[1] - a[1] for a, b in zip(order, order[1:3])]
    if min(gaps) < cfg.min_order_gap_s:  # the first two (or the second and third) start together
        return None
    x, y = order[0][0], order[1][0]
    in_clip = [lbl for lbl, _ in order[2:]]
    in_clip = [in_clip[int(i)] for i in rng.permutation(len(in_clip))]
    others = [v for v in vocab if v not in {lbl for lbl, _ in order}]
    others = [others[int(i)] for i in rng.permutation(len(others))]
    candidates = [(y, x)]  # the other order first: the hardest distractor
    for z in in_clip + others:
        candidates += [(x, z), (z, x), (y, z), (z, y)]
    wrong: list[str] = []
    for a, b in candidates:
        text = f"{a}, then {b}"
        if text not in wrong and len(wrong) < 3:
            wrong.append(text)
    if len(wrong) < 3:
        return None
    return _finish(rng, "sequencing", f"{x}, then {y}", wrong)


def duration(events: list[Event], rng, cfg, vocab: list[str]) -> TemporalQuestion | None:
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        counts[e.label] += 1
    once = sorted(lbl for lbl, c in counts.items() if c == 1)  # a sound heard twice has no single duration
    if not once:
        return None
    label = once[int(rng.integers(len(once)))]
    event = next(e for e in events if e.label == label)
    step = cfg.duration_step_s
    value = max(step, round((event.end - event.start) / step) * step)
    wrong = [_fmt_seconds(v) for v in numeric_neighbours(value, step, lowest=step)]
    return _finish(rng, "duration", _fmt_seconds(round(value, 6)), wrong, label=label)


def frequency(events: list[Event], rng, cfg, vocab: list[str]) -> TemporalQuestion | None:
    labels = sorted({e.label for e in events})
    label = labels[int(rng.integers(len(labels)))]
    n = sum(e.label == label for e in events)
    wrong = [str(int(v)) for v in numeric_neighbours(n, 1, lowest=1)]
    return _finish(rng, "frequency", str(n), wrong, label=label)


GENERATORS = {"counting": counting, "sequencing": sequencing, "duration": duration, "frequency": frequency}


def clip_questions(
    segment_id: str, events: list[Event], cfg: TemporalQAConfig, vocab: list[str]
) -> list[TemporalQuestion]:
    """Every configured question type that the clip's events support, in ``cfg.question_types`` order.

    ``vocab`` is the label map's non-generic display names, sorted, for distractors the clip lacks.
    """
    rng = clip_rng(cfg.seed, segment_id)
    out = []
    for qtype in cfg.question_types:
        q = GENERATORS[qtype](events, rng, cfg, vocab)
        if q is not None:
            out.append(q)
    return out


def question_record(
    segment_id: str, q: TemporalQuestion, events: list[Event], audio: str, split: str, part: str
) -> dict[str, Any]:
    """A manifest dict for one question; ``meta.events`` keeps the cleaned annotations it came from."""
    meta: dict[str, Any] = {
        "question_type": q.question_type,
        "chance": round(1.0 / len(q.choices), 6),
        "segment_id": segment_id,
        "events": [[e.label, round(e.start, 3), round(e.end, 3)] for e in events],
    }
    if q.label is not None:
        meta["label"] = q.label
    return {"id": f"{segment_id}_{q.question_type}", "part": part, "split": split, "audio": audio,
            "question": q.question, "choices": q.choices, "answer": q.answer,
            "meta": meta}
