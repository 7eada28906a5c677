"""The rules every kept manifest record obeys. Each check returns a reason a person understands, or None.

Record rules: a non-empty id unique in its manifest directory; a known split; a non-empty part and
question; 2 to 26 choices (26 option letters exist), none empty, unique after trimming whitespace in the
train split (dev and eval keep repeated options, scored by text);
the answer is one of the choices, and may be null only in the ``eval`` split.

Audio rules: the path stays inside the audio root, the file decodes, its samples are finite and it
lasts at least 50 ms. The duration is recorded in ``record.meta["duration_s"]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aqa.data.audio import AudioError, decode_audio
from aqa.data.manifest import SPLITS, Record
from aqa.data.prompts import LETTERS
from aqa.errors import UserError

MIN_CHOICES = 2  # a question with one option has no question in it
MAX_CHOICES = len(LETTERS)  # each option needs a letter in the prompt
REQUIRED_FIELDS = ("id", "part", "split", "audio", "question", "choices", "answer")


class RecordError(UserError, ValueError):
    """A source record that cannot become a manifest Record; the message is the quarantine reason."""


def parse_record(data: Mapping[str, Any]) -> Record:
    """Build a Record from a manifest-shaped mapping, checking types first.

    ``Record.from_dict`` would turn a dict choice into its repr and a list question into text;
    here a wrong type is a ``RecordError`` whose message names the field.
    """
    if not isinstance(data, Mapping):
        raise RecordError(f"record is a {type(data).__name__}, not a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise RecordError(f"missing field(s) {', '.join(missing)}")
    for key in ("id", "part", "split", "audio", "question"):
        if not isinstance(data[key], (str, int)) or isinstance(data[key], bool):
            raise RecordError(f"field '{key}' must be text, got {type(data[key]).__name__}")
    choices = data["choices"]
    if not isinstance(choices, list):
        raise RecordError(f"field 'choices' must be a list of option texts, got {type(choices).__name__}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, (str, int, float)) or isinstance(choice, bool):
            raise RecordError(f"choice {i + 1} must be text, got {type(choice).__name__}")
    answer = data["answer"]
    if answer is not None and (not isinstance(answer, (str, int, float)) or isinstance(answer, bool)):
        raise RecordError(f"field 'answer' must be option text or null, got {type(answer).__name__}")
    meta = data.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise RecordError(f"field 'meta' must be an object, got {type(meta).__name__}")
    return Record.from_dict(dict(data))


def check_record(record: Record, seen_ids: set[str] | None = None) -> str | None:
    """The record rules; returns the first broken rule as a reason, or None when the record is good.

    ``seen_ids`` holds ids already kept; a good record's id is added to it by the caller.
    """
    if not record.id.strip():
        return "empty id"
    if seen_ids is not None and record.id in seen_ids:
        return f"duplicate id '{record.id}' (ids must be unique across the manifest directory)"
    if record.split not in SPLITS:
        return f"unknown split '{record.split}' (expected one of {', '.join(SPLITS)})"
    if not record.part.strip():
        return "empty part"
    if not record.question.strip():
        return "empty question"
    n = len(record.choices)
    if n < MIN_CHOICES:
        return f"{n} choice(s): a question needs at least {MIN_CHOICES}"
    if n > MAX_CHOICES:
        return f"{n} choices: at most {MAX_CHOICES} can be lettered A-Z"
    trimmed = [c.strip() for c in record.choices]
    for i, text in enumerate(trimmed):
        if not text:
            return f"choice {i + 1} is empty"
    seen: dict[str, int] = {}
    for i, text in enumerate(trimmed):
        # An evaluation split keeps such a question (a benchmark is scored over all of its questions, by option
        # text: any position holding the answer's text is right). Training would teach one letter of two
        # identical texts, so the train split quarantines it.
        if text in seen and record.split == "train":
            return (f"duplicate choices: options {seen[text] + 1} and {i + 1} both read '{text}' (kept in dev and "
                    "eval, where they are scored by text; not trained on)")
        seen.setdefault(text, i)
    if record.answer is None:
        if record.split != "eval":
            return f"missing answer in split '{record.split}' (only the eval split may omit answers)"
    elif record.answer not in record.choices:
        return f"answer '{record.answer}' is not among the choices {record.choices}"
    if not record.audio.strip():
        return "empty audio path"
    return None


def resolve_audio(audio: str, audio_root: str | Path) -> Path:
    """The file a record's ``audio`` names, or ``RecordError`` if the path leaves the audio root.

    The check is lexical (``..`` and absolute paths), not on resolved symlinks, so an audio root that
    links into a large shared store still works.
    """
    root = os.path.abspath(audio_root)
    full = os.path.abspath(os.path.join(root, audio))
    if os.path.commonpath([root, full]) != root:
        raise RecordError(f"audio path '{audio}' escapes the audio root")
    return Path(full)


def check_audio(
    record: Record, audio_root: str | Path, cache: dict[Path, float | str] | None = None
) -> str | None:
    """The audio rules; on success stores ``meta["duration_s"]`` (seconds, 3 decimals) and returns None.

    ``cache`` maps a file to its duration or its reason, so several questions about one clip decode it once.
    """
    try:
        path = resolve_audio(record.audio, audio_root)
    except RecordError as err:
        return str(err)
    outcome = cache.get(path) if cache is not None else None
    if outcome is None:
        try:
            outcome = round(decode_audio(path).duration_s, 3)
        except AudioError as err:
            outcome = str(err)
        if cache is not None:
            cache[path] = outcome
    if isinstance(outcome, str):
        return outcome
    record.meta["duration_s"] = outcome
    return None


def validate_record(
    record: Record,
    audio_root: str | Path,
    seen_ids: set[str] | None = None,
    cache: dict[Path, float | str] | None = None,
) -> str | None:
    """Record rules, then audio rules (decoding is the slow part, so it runs last)."""
    return check_record(record, seen_ids) or check_audio(record, audio_root, cache)
