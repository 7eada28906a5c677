"""The manifest contract: one JSON record per question, shared by every stage.

A manifest directory holds ``<split>.jsonl`` files, ``quarantine.jsonl`` and ``dataset.json``.
``dataset.json`` records the audio root (relative to the manifest directory, or absolute) that every
record's ``audio`` path is relative to. Answers are option *text*; letters exist only in prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aqa.errors import UserError

SPLITS = ("train", "dev", "eval")
DATASET_FILE = "dataset.json"


class ManifestError(UserError, ValueError):
    """A manifest that cannot be read as the contract says."""


@dataclass
class Record:
    """One multiple-choice question about one audio clip."""

    id: str
    part: str
    split: str
    audio: str  # path relative to the manifest's audio root
    question: str
    choices: list[str]
    answer: str | None  # option text; None only in the eval split
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_index(self) -> int | None:
        return None if self.answer is None else self.choices.index(self.answer)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        missing = [k for k in ("id", "part", "split", "audio", "question", "choices", "answer") if k not in data]
        if missing:
            raise ManifestError(f"record {data.get('id', '?')!r} lacks {missing}")
        return cls(
            id=str(data["id"]),
            part=str(data["part"]),
            split=str(data["split"]),
            audio=str(data["audio"]),
            question=str(data["question"]),
            choices=[str(c) for c in data["choices"]],
            answer=None if data["answer"] is None else str(data["answer"]),
            meta=dict(data.get("meta") or {}),
        )


@dataclass
class Manifest:
    """Records of one split plus the audio root their paths are relative to."""

    path: Path
    audio_root: Path
    records: list[Record]

    def audio_path(self, record: Record) -> Path:
        return self.audio_root / record.audio

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)


def write_dataset_info(out_dir: str | Path, audio_root: str | Path, **extra: Any) -> None:
    """Write ``dataset.json``; the audio root is stored relative to ``out_dir`` when it lies inside it."""
    out_dir = Path(out_dir)
    root = Path(audio_root).resolve()
    try:
        stored = str(root.relative_to(out_dir.resolve()))
    except ValueError:
        stored = str(root)
    info = {"audio_root": stored, **extra}
    (out_dir / DATASET_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_dataset_info(manifest_dir: str | Path) -> dict[str, Any]:
    path = Path(manifest_dir) / DATASET_FILE
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: a manifest directory needs dataset.json naming its audio root. "
            "Write manifests with a data_prep converter, or pass audio_root explicitly."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any] | Record]) -> int:
    """Write rows (dicts or Records) as JSON lines; returns the count."""
    n = 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row.to_json() if isinstance(row, Record) else json.dumps(row, ensure_ascii=False)) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a bad line is an error that names the file and line number."""
    rows = []
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path} does not exist.")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
    return rows


def manifest_audio_root(path: str | Path) -> Path:
    """The audio root of the manifest ``DIR/<split>.jsonl``, from ``DIR/dataset.json``."""
    path = Path(path)
    stored = Path(read_dataset_info(path.parent)["audio_root"])
    return stored if stored.is_absolute() else path.parent / stored


def iter_records(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, Record]]:
    """Stream ``(byte offset, record)`` over a manifest, one line in memory at a time (the first ``limit``
    records when given). The offset reads the record again later with :func:`read_record_at`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path} does not exist.")
    n = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(iter(fh.readline, b""), 1):
            if limit is not None and n >= limit:
                return
            offset = fh.tell() - len(line)
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from err
            yield offset, Record.from_dict(data)
            n += 1


def read_record_at(fh: BinaryIO, offset: int) -> Record:
    """The record whose line starts at ``offset`` of a manifest opened in binary mode."""
    fh.seek(offset)
    return Record.from_dict(json.loads(fh.readline()))


def load_manifest(path: str | Path, audio_root: str | Path | None = None) -> Manifest:
    """Load ``DIR/<split>.jsonl``; the audio root comes from ``DIR/dataset.json`` unless given."""
    path = Path(path)
    if audio_root is None:
        audio_root = manifest_audio_root(path)
    records = [Record.from_dict(row) for row in read_jsonl(path)]
    return Manifest(path=path, audio_root=Path(audio_root), records=records)
