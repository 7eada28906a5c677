"""Scaffolding shared by every converter in ``data_prep/``: validate, write, quarantine, summarise.

A converter parses its source format into manifest-shaped dicts (or Records) and hands each to a
``ManifestWriter``; a source record it cannot even parse goes to ``writer.reject``. The writer

- validates every record (``aqa.data.validate``: record rules, then audio rules),
- streams kept records to ``DIR/<split>.jsonl`` and rejected ones to ``DIR/quarantine.jsonl``
  (``{"source", "id", "split", "reason"}``),
- writes ``DIR/dataset.json`` (audio root and per-split counts),
- shows a tqdm bar and prints ``<source>: in=N kept=K quarantined=Q (train=.. dev=..)``.

**Ownership of splits.** A run owns the splits it is constructed with, and writes every one of them,
*even when empty*: a stale file from an earlier run never survives beside fresh ones, and readers
find the file they expect. Splits it does not own are left untouched, so ``data_prep.dcase`` can be
run once per split into one directory: their ids count for uniqueness, their quarantine entries are
kept, and their audio root must match. Files are written under temporary names and renamed on close.

``ConversionError`` is for input that cannot be read at all, or a run that keeps nothing; ``run_cli``
turns it into a clear message and a non-zero exit in each converter's ``main()``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from aqa.data.manifest import (
    DATASET_FILE,
    SPLITS,
    ManifestError,
    Record,
    read_dataset_info,
    read_jsonl,
    write_dataset_info,
)
from aqa.data.validate import RecordError, parse_record, validate_record
from aqa.errors import UserError

QUARANTINE_FILE = "quarantine.jsonl"


class ConversionError(UserError, RuntimeError):
    """The input cannot be read at all, or nothing survived validation. The message names the fix."""


# --------------------------------------------------------------------------- reading source files


def read_json_file(path: str | Path) -> Any:
    """Parse one JSON file; a non-UTF-8 or malformed file raises ``RecordError`` with the reason."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RecordError(f"cannot read file: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM, which some editors add
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` per non-blank line; a bad line yields a ``RecordError`` instead.

    Lines are decoded one by one, so one non-UTF-8 or malformed line is quarantined, not the whole file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror or err}") from err
    for lineno, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield lineno, RecordError(f"line {lineno}: not UTF-8 text (byte 0x{line[err.start]:02x})")
            continue
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as err:
            yield lineno, RecordError(f"line {lineno}: malformed JSON: {err.msg} at column {err.colno}")


def load_json_input(path: str | Path, what: str) -> Any:
    """Read a whole-file JSON input (an MMAU list, a DCASE list); unreadable means ``ConversionError``."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} {path} does not exist; check --src.")
    try:
        return read_json_file(path)
    except RecordError as err:
        raise ConversionError(f"{what} {path} cannot be read: {err}.") from err


# --------------------------------------------------------------------------- audio references


class AudioIndex:
    """Maps an audio reference from a source file (URL, relative or absolute path) to a path under the root.

    Resolution order: a relative path that exists under the root; an absolute path inside the root;
    otherwise the file name, looked up anywhere under the root (URLs and paths from another machine).
    A relative path with ``..`` that leaves the root is refused, never looked up by name.
    """

    def __init__(self, audio_root: str | Path):
        self.root = Path(os.path.abspath(audio_root))
        if not self.root.is_dir():
            raise ConversionError(f"audio root {audio_root} is not a directory; check --audio-root.")
        self._by_name: dict[str, list[str]] | None = None

    def _index(self) -> dict[str, list[str]]:
        if self._by_name is None:  # walked once, lazily: most references resolve directly
            self._by_name = {}
            for dirpath, _, files in os.walk(self.root, followlinks=True):
                rel_dir = os.path.relpath(dirpath, self.root)
                for name in files:
                    rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
                    self._by_name.setdefault(name, []).append(rel)
        return self._by_name

    def resolve(self, ref: Any) -> str:
        """The reference as a POSIX path relative to the root; ``RecordError`` with the reason if none."""
        if not isinstance(ref, str) or not ref.strip():
            raise RecordError("no audio path given")
        ref = ref.strip()
        if "://" in ref:
            hint = unquote(urlparse(ref).path)
            return self._by_basename(hint)
        hint = ref.replace("\\", "/")
        if os.path.isabs(hint):
            full = os.path.normpath(hint)
            if os.path.commonpath([str(self.root), full]) == str(self.root) and os.path.isfile(full):
                return Path(os.path.relpath(full, self.root)).as_posix()
            return self._by_basename(hint)
        norm = os.path.normpath(hint)
        if norm == ".." or norm.startswith("../"):
            raise RecordError(f"audio path '{ref}' escapes the audio root")
        if (self.root / norm).is_file():
            return Path(norm).as_posix()
        return self._by_basename(hint)

    def _by_basename(self, hint: str) -> str:
        name = hint.rstrip("/").rsplit("/", 1)[-1]
        candidates = self._index().get(name, [])
        if not candidates:
            raise RecordError(f"audio file '{name}' not found under the audio root")
        if len(candidates) == 1:
            return candidates[0]
        # Several files share the name: prefer the one whose folders match the reference's tail.
        parts = [p for p in hint.split("/") if p]

        def shared_tail(rel: str) -> int:
            n = 0
            for a, b in zip(reversed(rel.split("/")), reversed(parts)):
                if a != b:
                    break
                n += 1
            return n

        scores = sorted(((shared_tail(c), c) for c in candidates), reverse=True)
        if scores[0][0] == scores[1][0]:
            raise RecordError(f"audio file name '{name}' is ambiguous: {len(candidates)} files under the audio root")
        return scores[0][1]


# --------------------------------------------------------------------------- the writer


@dataclass
class Summary:
    """What one converter run did. ``n_in == sum(kept.values()) + quarantined`` always."""

    source: str
    out_dir: Path
    kept: dict[str, int]
    quarantined: int
    reasons: Counter = field(default_factory=Counter)

    @property
    def n_in(self) -> int:
        return sum(self.kept.values()) + self.quarantined

    @property
    def n_kept(self) -> int:
        return sum(self.kept.values())

    def line(self) -> str:
        splits = " ".join(f"{s}={n}" for s, n in self.kept.items())
        return (
            f"{self.source}: in={self.n_in} kept={self.n_kept} quarantined={self.quarantined} "
            f"({splits}) -> {self.out_dir}"
        )

    def top_reasons(self, k: int = 5) -> list[str]:
        return [f"{n} x {reason}" for reason, n in self.reasons.most_common(k)]


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: quoted details and numbers blanked ("audio file '…' not found")."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\[[^\]]*\]", "[…]", reason)
    return re.sub(r"(?<![\w-])\d+(\.\d+)?(?!\w)", "N", reason)


class ManifestWriter:
    """Validate and write one converter run's records. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        out_dir: str | Path,
        audio_root: str | Path,
        source: str,
        splits: Iterable[str] = SPLITS,
        total: int | None = None,
        progress: bool = True,
        verbose: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.audio_root = Path(audio_root)
        self.source = source
        self.splits = tuple(splits)
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise ValueError(f"splits {list(self.splits)} must be a non-empty subset of {SPLITS}")
        if not self.audio_root.is_dir():
            raise ConversionError(f"audio root {audio_root} is not a directory; check --audio-root.")
        self.verbose = verbose
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._seen_ids: set[str] = set()
        self._audio_cache: dict[Path, float | str] = {}
        self._kept = {s: 0 for s in self.splits}
        self._quarantine: list[dict[str, Any]] = []
        self._reasons: Counter = Counter()
        self._other_splits: dict[str, Any] = {}
        self._old_quarantine: list[dict[str, Any]] = []
        self._adopt_existing()
        self._files = {s: (self.out_dir / f"{s}.jsonl.tmp").open("w", encoding="utf-8") for s in self.splits}
        self._bar = tqdm(total=total, desc=source, unit="rec", disable=not progress, dynamic_ncols=True)
        self._closed = False

    def _adopt_existing(self) -> None:
        """Keep splits this run does not own: their ids, counts and quarantine entries survive."""
        others = [s for s in SPLITS if s not in self.splits and (self.out_dir / f"{s}.jsonl").is_file()]
        if not others:
            return
        if (self.out_dir / DATASET_FILE).is_file():
            info = read_dataset_info(self.out_dir)
            stored = Path(info.get("audio_root", ""))
            stored = stored if stored.is_absolute() else self.out_dir / stored
            if os.path.abspath(stored) != os.path.abspath(self.audio_root):
                raise ConversionError(
                    f"{self.out_dir} already holds {', '.join(others)} with audio root {stored}; one manifest "
                    f"directory has one audio root. Pass --audio-root {stored} or use another --out."
                )
            self._other_splits = {s: v for s, v in (info.get("splits") or {}).items() if s in others}
        for split in others:
            try:
                rows = read_jsonl(self.out_dir / f"{split}.jsonl")
            except ManifestError as err:
                raise ConversionError(f"cannot extend {self.out_dir}: {err} Remove it or use another --out.") from err
            self._seen_ids.update(str(r.get("id")) for r in rows)
            self._other_splits.setdefault(split, {"count": len(rows)})
        qpath = self.out_dir / QUARANTINE_FILE
        if qpath.is_file():
            self._old_quarantine = [q for q in read_jsonl(qpath) if q.get("split") not in self.splits]

    def add(self, record: Record | Mapping[str, Any], source_file: str | Path) -> str | None:
        """Validate one record and write it; returns None when kept, else the quarantine reason."""
        rid = record.id if isinstance(record, Record) else (record.get("id") if isinstance(record, Mapping) else None)
        split = record.split if isinstance(record, Record) else (
            record.get("split") if isinstance(record, Mapping) else None
        )
        try:
            rec = record if isinstance(record, Record) else parse_record(record)
        except RecordError as err:
            self.reject(source_file, rid, str(err), split=split)
            return str(err)
        if rec.split not in self.splits:
            reason = f"split '{rec.split}' is not written by this run (it writes {', '.join(self.splits)})"
            self.reject(source_file, rec.id, reason, split=rec.split)
            return reason
        reason = validate_record(rec, self.audio_root, self._seen_ids, self._audio_cache)
        if reason is not None:
            self.reject(source_file, rec.id, reason, split=rec.split)
            return reason
        self._seen_ids.add(rec.id)
        self._files[rec.split].write(rec.to_json() + "\n")
        self._kept[rec.split] += 1
        self._bar.update(1)
        return None

    def reject(self, source_file: str | Path, id: Any, reason: str, split: str | None = None) -> None:
        """Quarantine one source record. With one owned split, entries default to it (for later merges)."""
        if split is None and len(self.splits) == 1:
            split = self.splits[0]
        self._quarantine.append(
            {"source": str(source_file), "id": None if id is None else str(id), "split": split, "reason": reason}
        )
        self._reasons[_reason_kind(reason)] += 1
        self._bar.update(1)

    def abort(self) -> None:
        """Drop everything written so far (used when a converter raises mid-run)."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        for split, fh in self._files.items():
            fh.close()
            (self.out_dir / f"{split}.jsonl.tmp").unlink(missing_ok=True)

    def close(self) -> Summary:
        """Publish the split files, quarantine and dataset.json; print the summary.

        Raises ``ConversionError`` (after writing, so the quarantine can be read) when nothing was kept.
        """
        if self._closed:
            raise RuntimeError("ManifestWriter.close() called twice")
        self._closed = True
        self._bar.close()
        for split, fh in self._files.items():
            fh.close()
            os.replace(self.out_dir / f"{split}.jsonl.tmp", self.out_dir / f"{split}.jsonl")
        qtmp = self.out_dir / (QUARANTINE_FILE + ".tmp")
        with qtmp.open("w", encoding="utf-8") as fh:
            for row in self._old_quarantine + self._quarantine:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(qtmp, self.out_dir / QUARANTINE_FILE)
        splits_info = dict(self._other_splits)
        splits_info.update({s: {"count": n, "source": self.source} for s, n in self._kept.items()})
        write_dataset_info(self.out_dir, self.audio_root, splits={s: splits_info[s] for s in SPLITS if s in splits_info})
        summary = Summary(self.source, self.out_dir, dict(self._kept), len(self._quarantine), self._reasons)
        if self.verbose:
            print(summary.line())
            for line in summary.top_reasons():
                print(f"  quarantined: {line}")
        if summary.n_kept == 0:
            why = "; ".join(summary.top_reasons(3)) or "the input held no records"
            raise ConversionError(
                f"{self.source}: nothing kept out of {summary.n_in} source record(s) ({why}). "
                f"See {self.out_dir / QUARANTINE_FILE} for every reason; check --src and --audio-root."
            )
        return summary

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


# --------------------------------------------------------------------------- command line


def converter_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser with the options every converter shares (``--out``, ``--no-progress``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="manifest directory to write")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_cli(convert: Callable[[], Any]) -> int:
    """Run a converter; a ``ConversionError`` becomes ``error: ...`` on stderr and exit status 2."""
    try:
        convert()
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
