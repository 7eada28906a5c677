"""DCASE 2025 Task 5 question files to a manifest.

Official layout: one JSON object per question, id = file stem, with ``audio_url``, ``question``,
``choice`` (list), ``answer`` and an optional ``question_type``. The same objects are accepted as a
JSON list or as JSONL (id: the item's ``id``/``question_id`` field, else ``<file stem>_<index>``).

- ``audio_url`` may be a URL or a path; it is resolved under the audio root (see ``AudioIndex``).
- Options may carry ``A. `` prefixes, which are stripped; the answer may be given with or without
  its letter, or as a bare letter.
- The part (bqa, tsqa, cqa) and split (train, dev, eval) come from the arguments or, when absent,
  from folder names (innermost first) from ``--src`` itself downwards, e.g. ``raw/BQA/dev/q1.json``;
  folders above ``--src`` are never read, so where a data set happens to live cannot decide its split.
- A question file that is not UTF-8, is malformed JSON or lacks fields is quarantined with the reason;
  a ``--src`` that does not exist, holds no question files, or is a single unreadable file is an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aqa.data.convert import (
    AudioIndex,
    ConversionError,
    ManifestWriter,
    Summary,
    iter_jsonl,
    load_json_input,
    read_json_file,
)
from aqa.data.manifest import SPLITS
from aqa.data.sources.options import match_answer, option_texts, raw_choices_meta, strip_letter_prefixes
from aqa.data.validate import RecordError

PARTS = ("bqa", "tsqa", "cqa")
_PART_WORDS = {"bqa": "bqa", "bioacoustic": "bqa", "bioacoustics": "bqa", "tsqa": "tsqa", "temporal": "tsqa",
               "cqa": "cqa", "complex": "cqa"}
_SPLIT_WORDS = {"train": "train", "training": "train", "dev": "dev", "development": "dev", "val": "dev",
                "valid": "dev", "validation": "dev", "eval": "eval", "evaluation": "eval", "test": "eval"}


def _from_folders(path: Path, words: dict[str, str]) -> str | None:
    """The first folder (innermost first) whose name holds one of ``words`` as a word."""
    for folder in reversed(path.parts[:-1]):
        for token in re.split(r"[^a-z0-9]+", folder.lower()):
            if token in words:
                return words[token]
    return None


def infer_part(path: str | Path) -> str | None:
    """``raw/Part1_BQA/dev/q.json`` -> ``"bqa"``; None when no folder names a part."""
    return _from_folders(Path(path), _PART_WORDS)


def infer_split(path: str | Path) -> str | None:
    """``raw/bqa/dev/q.json`` -> ``"dev"``; None when no folder names a split."""
    return _from_folders(Path(path), _SPLIT_WORDS)


def dcase_record(item: Any, rid: str, part: str, split: str, audio: AudioIndex) -> dict[str, Any]:
    """One DCASE question object as a manifest dict; ``RecordError`` with the reason when it cannot be."""
    if not isinstance(item, dict):
        raise RecordError(f"question is a JSON {type(item).__name__}, not an object")
    raw_choices = item.get("choice", item.get("choices"))
    missing = [k for k, v in (("audio_url", item.get("audio_url")), ("question", item.get("question")),
                              ("choice", raw_choices)) if v is None]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    if not isinstance(item["question"], str):
        raise RecordError(f"field 'question' must be text, got {type(item['question']).__name__}")
    raw = option_texts(raw_choices)
    choices, _ = strip_letter_prefixes(raw)
    meta: dict[str, Any] = raw_choices_meta(raw_choices, choices)  # the official strings, for the submission
    if item.get("question_type") is not None:
        meta["question_type"] = str(item["question_type"])
    return {
        "id": rid,
        "part": part,
        "split": split,
        "audio": audio.resolve(item["audio_url"]),
        "question": item["question"].strip(),
        "choices": choices,
        "answer": match_answer(item.get("answer"), raw, choices),
        "meta": meta,
    }


def _item_id(item: Any, stem: str, index: int) -> str:
    if isinstance(item, dict):
        for key in ("id", "question_id"):
            if item.get(key) not in (None, ""):
                return str(item[key])
    return f"{stem}_{index:05d}"


def _question_files(src: Path) -> list[Path]:
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise ConversionError(f"no .json or .jsonl question files under {src}; check --src.")
        return files
    if src.is_file():
        return [src]
    raise ConversionError(f"--src {src} does not exist.")


def _items(path: Path, preloaded: Any = None) -> Iterator[tuple[str, Any]]:
    """``(id, item or RecordError)`` for each question in one source file (``preloaded``: its parsed JSON)."""
    if path.suffix.lower() == ".jsonl":
        for i, (lineno, obj) in enumerate(iter_jsonl(path)):
            yield (f"{path.stem}_line{lineno}" if isinstance(obj, RecordError) else _item_id(obj, path.stem, i)), obj
        return
    if preloaded is not None:
        data = preloaded
    else:
        try:
            data = read_json_file(path)
        except RecordError as err:
            yield path.stem, err
            return
    if isinstance(data, list):
        for i, item in enumerate(data):
            yield _item_id(item, path.stem, i), item
    else:
        yield path.stem, data


def convert_dcase(
    src: str | Path,
    out_dir: str | Path,
    audio_root: str | Path | None = None,
    split: str | None = None,
    part: str | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> Summary:
    """Convert DCASE question files under ``src`` into ``out_dir``; returns the run's Summary.

    ``audio_root`` defaults to ``src`` (its folder when ``src`` is a file). Without ``split`` the run
    owns the splits its folder names show; with it, exactly that split.
    """
    src = Path(src)
    if part is not None and part not in PARTS:
        raise ConversionError(f"--part {part} is unknown; use one of {', '.join(PARTS)}.")
    if split is not None and split not in SPLITS:
        raise ConversionError(f"--split {split} is unknown; use one of {', '.join(SPLITS)}.")
    src = Path(os.path.abspath(src))
    files = _question_files(src)
    if audio_root is None:
        audio_root = src if src.is_dir() else src.parent
    audio = AudioIndex(audio_root)
    # Folder names are read from --src downwards only (see the module docstring).
    scope = {f: f.relative_to(src.parent) if src.is_dir() else Path(src.parent.name, f.name) for f in files}
    split_of = {f: split or infer_split(scope[f]) for f in files}
    owned = sorted({s for s in split_of.values() if s}, key=SPLITS.index)
    if not owned:
        raise ConversionError(f"cannot tell the split from the folder names under {src}; pass --split train|dev|eval.")
    # A single .json input is the whole input: unreadable is an error (before any output), not a quarantine entry.
    preloaded = load_json_input(src, "question file") if src.is_file() and src.suffix.lower() != ".jsonl" else None
    with ManifestWriter(out_dir, audio_root, source="dcase", splits=owned, total=len(files) if len(files) > 1 else None,
                        progress=progress, verbose=verbose) as writer:
        for path in files:
            file_split = split_of[path]
            file_part = part or infer_part(scope[path])
            for rid, item in _items(path, preloaded):
                if isinstance(item, RecordError):
                    writer.reject(path, rid, str(item), split=file_split)
                elif file_split is None:
                    writer.reject(path, rid, "cannot tell the split from the folder names; pass --split",
                                  split=None)
                elif file_part is None:
                    writer.reject(path, rid, "cannot tell the part (bqa, tsqa, cqa) from the folder names; "
                                  "pass --part", split=file_split)
                else:
                    try:
                        record = dcase_record(item, rid, file_part, file_split, audio)
                    except RecordError as err:
                        writer.reject(path, rid, str(err), split=file_split)
                        continue
                    writer.add(record, path)
        return writer.close()
