"""A person's overview of a manifest directory: what is in it, how hard it is by chance, how long the clips are."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import soundfile as sf

from aqa.data.convert import QUARANTINE_FILE
from aqa.data.manifest import SPLITS, Manifest, Record, load_manifest, read_jsonl
from aqa.data.prompts import LETTERS


def record_chance(record: Record) -> float:
    """The accuracy of a uniform guess: ``meta.chance`` when a converter recorded it, else 1 / options."""
    return float(record.meta.get("chance", 1.0 / len(record.choices)))


def _duration(manifest: Manifest, record: Record, cache: dict[str, float]) -> float:
    """Seconds of the record's clip: ``meta.duration_s`` from validation, else the file header."""
    if "duration_s" in record.meta:
        return float(record.meta["duration_s"])
    if record.audio not in cache:
        cache[record.audio] = float(sf.info(str(manifest.audio_path(record))).duration)
    return cache[record.audio]


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if str(c)[:1].isdigit() else str(c).ljust(w) for c, w in zip(cells, widths)
        ).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _letters(records: list[Record]) -> str:
    """How often each letter is right, e.g. ``A38 B37 C13 D12`` (answers in manifest order)."""
    c = Counter(LETTERS[r.answer_index] for r in records if r.answer is not None)
    return " ".join(f"{k}{c[k]}" for k in sorted(c)) or "(no answers)"


def summarize(manifest_dir: str | Path) -> str:
    """A text report of ``manifest_dir``: one row per split and part, then question types per part.

    Rows give questions, distinct clips, option counts (e.g. ``2:40 4:60``), mean chance level, how often
    each answer letter is right, and clip durations (min/mean/max seconds); then the quarantine count.
    """
    manifest_dir = Path(manifest_dir)
    manifests = [load_manifest(manifest_dir / f"{s}.jsonl") for s in SPLITS if (manifest_dir / f"{s}.jsonl").is_file()]
    if not manifests:
        raise FileNotFoundError(f"no <split>.jsonl in {manifest_dir}; build it with a data_prep converter first.")
    cache: dict[str, float] = {}
    rows, types = [], defaultdict(Counter)
    type_chance: dict[tuple[str, str], list[float]] = defaultdict(list)
    for split, manifest in zip([m.path.stem for m in manifests], manifests):
        by_part: dict[str, list[Record]] = defaultdict(list)
        for record in manifest:
            by_part[record.part].append(record)
        for part in sorted(by_part):
            recs = by_part[part]
            durs = [_duration(manifest, r, cache) for r in recs]
            options = Counter(len(r.choices) for r in recs)
            chance = sum(record_chance(r) for r in recs) / len(recs)
            rows.append([
                split, part, str(len(recs)), str(len({r.audio for r in recs})),
                " ".join(f"{n}:{options[n]}" for n in sorted(options)), f"{chance:.3f}", _letters(recs),
                f"{min(durs):.1f}/{sum(durs) / len(durs):.1f}/{max(durs):.1f}",
            ])
            for r in recs:
                qtype = str(r.meta.get("question_type", "-"))
                types[part][qtype] += 1
                type_chance[(part, qtype)].append(record_chance(r))
        total = len(manifest)
        if len(by_part) > 1:
            chance = sum(record_chance(r) for r in manifest) / max(total, 1)
            rows.append([split, "(all)", str(total), str(len({r.audio for r in manifest})), "", f"{chance:.3f}",
                         _letters(manifest.records), ""])
    out = [f"Manifest {manifest_dir}", "",
           _table(["split", "part", "questions", "clips", "options", "chance", "right letter", "clip s min/mean/max"],
                  rows), "", "Question types (all splits):"]
    type_rows = []
    for part in sorted(types):
        for qtype, n in sorted(types[part].items(), key=lambda kv: (-kv[1], kv[0])):
            vals = type_chance[(part, qtype)]
            type_rows.append([part, qtype, str(n), f"{sum(vals) / len(vals):.3f}"])
    out.append(_table(["part", "question type", "questions", "chance"], type_rows))
    qpath = manifest_dir / QUARANTINE_FILE
    n_quarantined = len(read_jsonl(qpath)) if qpath.is_file() else 0
    out += ["", f"Quarantined source records: {n_quarantined} (see {QUARANTINE_FILE})"]
    return "\n".join(out)
