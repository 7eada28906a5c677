"""MMAU test-mini (``mmau-test-mini.json``, a JSON list) to a manifest of part ``mmau``.

Each item has ``id, audio_id, question, choices, answer, dataset, task, split, category,
sub-category, difficulty``. ``audio_id`` (``./test-mini-audios/<id>.wav``) is resolved under the audio
root, by its path first and then by file name. ``category`` is sometimes a one-element list
(``["Reasoning"]``): it is normalised to text. Task, category, sub-category, difficulty, the source
data set and the source split go to ``meta``.

MMAU answers are known, so the records go to the ``dev`` split by default: inference on ``--split dev``
then reports accuracy. The official file holds 27 items whose options repeat a text (e.g.
``["one", "three", "three", "zero"]``): in dev and eval they are kept and scored by text (any position
holding the answer's text is right), so all 1000 questions are scored as published figures are; converted
into the train split (``--split train``) they are quarantined with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aqa.data.convert import AudioIndex, ConversionError, ManifestWriter, Summary, load_json_input
from aqa.data.sources.options import match_answer, option_texts, raw_choices_meta
from aqa.data.validate import RecordError

PART = "mmau"
_META_KEYS = {"task": "task", "sub-category": "sub_category", "difficulty": "difficulty", "dataset": "dataset"}


def normalise_category(value: Any) -> str | None:
    """``"Reasoning"`` and ``["Reasoning"]`` -> ``"Reasoning"``; several distinct entries are joined by ``" / "``."""
    if value is None:
        return None
    if isinstance(value, list):
        items = list(dict.fromkeys(str(v).strip() for v in value if str(v).strip()))
        return " / ".join(items) or None
    return str(value).strip() or None


def mmau_record(item: Any, split: str, audio: AudioIndex) -> dict[str, Any]:
    """One MMAU item as a manifest dict; ``RecordError`` with the reason when it cannot be."""
    if not isinstance(item, dict):
        raise RecordError(f"item is a JSON {type(item).__name__}, not an object")
    missing = [k for k in ("id", "audio_id", "question", "choices", "answer") if k not in item]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    if not isinstance(item["question"], str):
        raise RecordError(f"field 'question' must be text, got {type(item['question']).__name__}")
    choices = option_texts(item["choices"], field="choices")
    meta: dict[str, Any] = {new: str(item[old]) for old, new in _META_KEYS.items() if item.get(old) is not None}
    meta.update(raw_choices_meta(item["choices"], choices))
    category = normalise_category(item.get("category"))
    if category is not None:
        meta["category"] = category
    if item.get("split") is not None:
        meta["source_split"] = str(item["split"])
    return {
        "id": str(item["id"]),
        "part": PART,
        "split": split,
        "audio": audio.resolve(item["audio_id"]),
        "question": item["question"].strip(),
        "choices": choices,
        "answer": match_answer(item["answer"], choices, choices),
        "meta": meta,
    }


def convert_mmau(
    src: str | Path,
    audio_root: str | Path,
    out_dir: str | Path,
    split: str = "dev",
    progress: bool = True,
    verbose: bool = True,
) -> Summary:
    """Convert ``mmau-test-mini.json`` into ``out_dir/<split>.jsonl``; returns the run's Summary."""
    src = Path(src)
    items = load_json_input(src, "MMAU file")
    if not isinstance(items, list):
        raise ConversionError(f"MMAU file {src} holds a JSON {type(items).__name__}; expected the list of test-mini items.")
    audio = AudioIndex(audio_root)
    with ManifestWriter(out_dir, audio_root, source="mmau", splits=(split,), total=len(items),
                        progress=progress, verbose=verbose) as writer:
        for i, item in enumerate(items):
            rid = item.get("id") if isinstance(item, dict) else None
            try:
                record = mmau_record(item, split, audio)
            except RecordError as err:
                writer.reject(src, rid if rid is not None else f"item {i}", str(err))
                continue
            writer.add(record, src)
        return writer.close()
