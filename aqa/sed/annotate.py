"""Sound events into a manifest: each record gets ``meta.events`` from its clip (the library of
``data_prep.sed_events``).

The SED scores each distinct clip once (cached per clip, see :func:`aqa.sed.posteriors.score_clips`),
the calibration maps segment logits to calibrated probabilities (fitted on the same segment grid, which
is checked), and :mod:`aqa.sed.events` decodes them. Output, in ``OUT``:

- ``<manifest name>``: the same records, with ``meta.events`` (a list of ``{label, onset, offset, score}``)
  and, for clips too short for one BEATs row, ``meta.sed_note``;
- ``events/<manifest stem>.jsonl``: ``{"id", "audio", "events", "note"}`` per record, reusable with ``--events``;
- ``events/<manifest stem>.json``: what produced the events and how many there are;
- ``dataset.json``: the input's audio root, so ``OUT/<split>.jsonl`` loads like any manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from aqa.data.manifest import Record, load_manifest, read_jsonl, write_dataset_info, write_jsonl
from aqa.errors import UserError
from aqa.sed.calibration import Calibration, CalibrationError
from aqa.sed.events import EventConfig, decode_events
from aqa.sed.posteriors import PosteriorConfig, SedDetector, score_clips

EVENTS_DIR = "events"


class EventsError(UserError, ValueError):
    """Events that do not fit the manifest; the message lists the ids."""


@dataclass
class SedEventsConfig:
    posteriors: PosteriorConfig
    events: EventConfig
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)


def _listed(ids: list[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def attach_events(records: list[Record], events_by_id: dict[str, list[dict]],
                  notes: dict[str, str] | None = None) -> list[Record]:
    """Set ``meta.events`` (and ``meta.sed_note``) on every record; ids must match both ways."""
    ids = {r.id for r in records}
    unknown = sorted(set(events_by_id) - ids)
    if unknown:
        raise EventsError(f"events were given for {len(unknown)} id(s) missing from the manifest: {_listed(unknown)}. "
                          "The events belong to another manifest; compute them for this one with --sed.")
    lacking = [r.id for r in records if r.id not in events_by_id]
    if lacking:
        raise EventsError(f"{len(lacking)} manifest id(s) have no events: {_listed(lacking)}. Compute events for "
                          "this manifest with --sed (an empty list is a valid 'no events').")
    notes = notes or {}
    for r in records:
        r.meta["events"] = events_by_id[r.id]
        if r.id in notes:
            r.meta["sed_note"] = notes[r.id]
        else:
            r.meta.pop("sed_note", None)
    return records


def read_events_file(path: str | Path) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """``events.jsonl`` -> ``({id: events}, {id: note})``."""
    events, notes = {}, {}
    for i, row in enumerate(read_jsonl(path), 1):
        if "id" not in row or not isinstance(row.get("events"), list):
            raise EventsError(f"{path}: row {i} needs 'id' and an 'events' list.")
        events[str(row["id"])] = row["events"]
        if row.get("note"):
            notes[str(row["id"])] = row["note"]
    return events, notes


def load_checked_calibration(path: str | Path, detector: SedDetector, posteriors: PosteriorConfig) -> Calibration:
    cal = Calibration.load(path)
    cal.check_labels(detector.labels, str(path))
    if (cal.hop_rows, cal.window_rows) != (posteriors.hop_rows, posteriors.window_rows):
        raise CalibrationError(
            f"{path} was fitted on segments of hop_rows={cal.hop_rows}, window_rows={cal.window_rows}, but this run "
            f"reads hop_rows={posteriors.hop_rows}, window_rows={posteriors.window_rows}. Use the same posteriors "
            "settings as the calibration (posteriors.hop_rows=... posteriors.window_rows=...) or calibrate again."
        )
    return cal


def detect_events(manifest: str | Path, sed_dir: str | Path, calibration: str | Path | None, cfg: SedEventsConfig,
                  cache_dir: str | Path, device: Any = "cpu") -> tuple[list[Record], dict[str, list[dict]],
                                                                        dict[str, str], dict[str, Any]]:
    """Score the manifest's clips and decode events: ``(records, {id: events}, {id: note}, summary)``."""
    m = load_manifest(manifest)
    detector = SedDetector(sed_dir, cfg.posteriors, device)
    cal = None if calibration is None else load_checked_calibration(calibration, detector, cfg.posteriors)
    paths = list(dict.fromkeys(m.audio_path(r) for r in m.records))
    posts = score_clips(detector, paths, cache_dir)
    by_clip, clip_notes = {}, {}
    for path in tqdm(paths, desc="decoding events", unit="clip", dynamic_ncols=True):
        post = posts[path]
        probs = post.probs if cal is None else cal.apply(post.logits)
        by_clip[path] = decode_events(probs, post.hop_s, post.duration_s, detector.labels.names, cfg.events)
        if post.note:
            clip_notes[path] = post.note
    events = {r.id: by_clip[m.audio_path(r)] for r in m.records}
    notes = {r.id: clip_notes[m.audio_path(r)] for r in m.records if m.audio_path(r) in clip_notes}
    summary = {"sed": str(sed_dir), "sed_weights": detector.digest,
               "calibration": None if calibration is None else str(calibration),
               "config": asdict(cfg), "clips": len(paths),
               "events": sum(len(v) for v in by_clip.values()),
               "clips_without_events": sum(1 for v in by_clip.values() if not v),
               "short_clips": len(clip_notes)}
    return m.records, events, notes, summary


def write_annotated(manifest: str | Path, records: list[Record], events: dict[str, list[dict]],
                    notes: dict[str, str], out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Attach and write the manifest, ``events.jsonl``, ``dataset.json`` and the summary; returns the manifest path."""
    m = load_manifest(manifest)  # for its audio root
    attach_events(records, events, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / Path(manifest).name
    if target.resolve() == Path(manifest).resolve():
        raise EventsError(f"--out {out} is the input manifest's folder; choose another so {target.name} is not "
                          "overwritten.")
    write_jsonl(target, records)
    stem = Path(manifest).stem
    write_jsonl(out / EVENTS_DIR / f"{stem}.jsonl", [{"id": r.id, "audio": r.audio, "events": events[r.id],
                                                      "note": notes.get(r.id)} for r in records])
    (out / EVENTS_DIR / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_dataset_info(out, m.audio_root.resolve(), source="sed_events")
    return target
