"""Which training questions need their audio: a question a model answers right with its audio silenced (or
replaced by noise) has a *weak* audio contribution, one it gets wrong has a *strong* one. AudioMCQ (the DCASE
2025 Task 5 winner) trains SFT on the weak part and GRPO on the strong part ("weak-to-strong").

The labels come from a prediction file of an ``inference/run.py ... audio=silence`` (or ``noise``) pass over
the same manifest; the library half of ``python -m data_prep.audio_contribution``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from aqa.data.manifest import ManifestError, load_manifest, write_jsonl


def split_by_audio_contribution(manifest_path: str | Path, predictions_path: str | Path,
                                out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write ``<stem>_weak.jsonl`` and ``<stem>_strong.jsonl`` (the manifest's records, unchanged, split by
    whether the audio-free pass was right) and ``<stem>_audio_contribution.json`` (counts per part) beside the
    manifest (or into ``out_dir``, with its ``dataset.json``); returns the summary.

    Every question needs exactly one prediction from a pass that did not hear the audio; anything else is a
    :class:`ManifestError` naming the ids or the file to make."""
    manifest = load_manifest(manifest_path)
    rows: dict[str, dict[str, Any]] = {}
    for line in Path(predictions_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row
    heard = sorted({str(r.get("audio", "real")) for r in rows.values()} & {"real"})
    if heard:
        raise ManifestError(f"{predictions_path} was scored with the audio (no 'audio' field); score the manifest "
                            "with inference/run.py ... audio=silence (or noise) and pass those predictions.")
    missing = [r.id for r in manifest.records if r.id not in rows]
    if missing:
        raise ManifestError(f"{len(missing)} question(s) of {manifest.path} have no prediction in {predictions_path} "
                            f"(e.g. {missing[:5]}); score the whole split (no limit).")
    unanswered = [r.id for r in manifest.records if r.answer is None]
    if unanswered:
        raise ManifestError(f"{manifest.path} has questions without answers (e.g. {unanswered[:5]}): only answered "
                            "questions can be labelled.")
    weak = [r for r in manifest.records if rows[r.id]["pred"] == r.answer]
    strong = [r for r in manifest.records if rows[r.id]["pred"] != r.answer]
    out = Path(out_dir) if out_dir is not None else manifest.path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = manifest.path.stem
    write_jsonl(out / f"{stem}_weak.jsonl", weak)
    write_jsonl(out / f"{stem}_strong.jsonl", strong)
    if out.resolve() != manifest.path.parent.resolve():
        from aqa.data.manifest import write_dataset_info

        write_dataset_info(out, manifest.audio_root)
    parts = sorted({r.part for r in manifest.records})
    count = lambda records: Counter(r.part for r in records)  # noqa: E731
    summary = {"manifest": str(manifest.path), "predictions": str(predictions_path),
               "audio": sorted({str(r.get("audio")) for r in rows.values()}),
               "weak": len(weak), "strong": len(strong),
               "per_part": {p: {"weak": count(weak)[p], "strong": count(strong)[p]} for p in parts},
               "files": {"weak": str(out / f"{stem}_weak.jsonl"), "strong": str(out / f"{stem}_strong.jsonl")}}
    (out / f"{stem}_audio_contribution.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
