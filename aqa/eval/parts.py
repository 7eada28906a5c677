"""Part files: each rank's predictions as it writes them, what is done, and the merge into the outputs.

Layout of ``<output_dir>/<split>/``::

    parts/part-00000.jsonl   rank 0's prediction rows, appended and flushed batch by batch
    parts/part-00001.jsonl   rank 1's (any number of ranks; files of earlier launches stay and count)
    parts/merged.json        what the outputs below were merged from (a finished rank skips a merge done)
    parts/.finished-R-of-W   rank R of a W-rank launch has finished its shard
    predictions.jsonl        every question of the split once, in manifest order (written by the merge)
    submission.csv, metrics.json
    .lock                    serialises the start and the end of the ranks (flock; works on NFS)

A row counts as done once its line, newline included, is in any part file; a line cut off by a kill has no
newline and is ignored by every reader, and its own rank cuts it off before appending. So a rerun with the
same command (or another number of ranks) scores exactly the questions that no part file holds. The merge
checks that every question of the split has exactly one row, and names the ids when not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from aqa.data.manifest import iter_records
from aqa.errors import UserError
from aqa.eval.shards import SplitIndex, id_hash, name_some

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
SUBMISSION = "submission.csv"
PARTS = "parts"
MERGED = "merged.json"
LOCK = ".lock"
EARLIER = "earlier.jsonl"  # predictions.jsonl of a run from before part files, adopted as a part
POLL_S = 1.0  # how often rank 0's progress bar looks at the other ranks' part files
NAMED_MAX = 50  # ids read back from the manifest for an error message


class MergeError(UserError, ValueError):
    """The part files do not hold every question of the split exactly once."""


def part_path(out_dir: Path, rank: int) -> Path:
    return out_dir / PARTS / f"part-{rank:05d}.jsonl"


def part_files(out_dir: Path) -> list[Path]:
    return sorted((out_dir / PARTS).glob("*.jsonl"))


@contextlib.contextmanager
def split_lock(out_dir: Path) -> Iterator[None]:
    """One rank at a time (of this launch, or of another one) inside the block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def finished_marker(out_dir: Path, rank: int, world_size: int) -> Path:
    """Touched by a rank of a ``world_size``-rank launch when its shard is done (removed when it starts)."""
    return out_dir / PARTS / f".finished-{rank:05d}-of-{world_size:05d}"


def all_finished(out_dir: Path, world_size: int) -> bool:
    """Has every rank of this launch (or, after a kill, of an earlier launch of as many ranks) finished? Cheap;
    a stale marker only makes a rank look through the part files for nothing, never merges too early."""
    return all(finished_marker(out_dir, r, world_size).exists() for r in range(world_size))


def complete_lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for every newline-terminated line of ``path`` from ``start``; a torn last line (a
    write cut off by a kill) is not yielded."""
    with path.open("rb") as fh:
        fh.seek(start)
        offset = start
        for line in iter(fh.readline, b""):
            if not line.endswith(b"\n"):
                return
            yield offset, line
            offset += len(line)


def drop_torn_tail(path: Path) -> None:
    """Cut ``path`` after its last newline (what a kill in the middle of a write leaves); only the rank that
    appends to the file calls this, before it appends."""
    if not path.is_file():
        return
    size = path.stat().st_size
    with path.open("r+b") as fh:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            chunk = fh.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end != size:
            fh.truncate(end)


def adopt_earlier_predictions(out_dir: Path) -> None:
    """An output dir written before part files existed: its predictions.jsonl becomes a part, so a rerun
    keeps those rows instead of scoring them again."""
    earlier = out_dir / PREDICTIONS
    if (out_dir / PARTS).exists() or not earlier.is_file():
        return
    (out_dir / PARTS).mkdir(parents=True)
    tmp = out_dir / PARTS / f".{EARLIER}.tmp"
    with tmp.open("wb") as fh:
        for _, line in complete_lines(earlier):
            fh.write(line)
    os.replace(tmp, out_dir / PARTS / EARLIER)


@dataclass
class PartRows:
    """Every complete row of the part files, as arrays of ``[R]`` (R rows in all)."""

    files: list[Path]
    sizes: list[int]  # bytes of each file when it was read
    position: np.ndarray  # [R] int64: the row's question in the split, -1 for an id outside it
    file: np.ndarray  # [R] int32: index into files
    offset: np.ndarray  # [R] int64
    length: np.ndarray  # [R] int64

    def done(self, n: int) -> np.ndarray:
        """``[n]`` bool: the questions some part file holds a row for."""
        mask = np.zeros(n, dtype=bool)
        mask[self.position[self.position >= 0]] = True
        return mask

    @property
    def outside(self) -> int:
        """Rows for questions outside the split (an earlier run with a larger ``limit``, or an older manifest)."""
        return int((self.position < 0).sum())


def scan_parts(out_dir: Path, index: SplitIndex, progress: bool = False) -> PartRows:
    """Read every part file of ``out_dir`` (only ids and where each row lies are kept)."""
    files = part_files(out_dir)
    sizes: list[int] = []
    hashes, file, offset, length = array("Q"), array("i"), array("q"), array("q")  # 8 bytes a row, not 32
    for f, path in enumerate(files):
        sizes.append(path.stat().st_size)
        lines = complete_lines(path)
        for lineno, (start, line) in enumerate(tqdm(lines, desc=f"reading {path.name}", unit="row",
                                                    disable=not progress), 1):
            try:
                row_id = json.loads(line)["id"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise MergeError(f"{path}:{lineno} is not a prediction row ({err}); the file was edited. Delete "
                                 "that line (its question is then scored again) or the file.") from None
            hashes.append(id_hash(str(row_id)))
            file.append(f)
            offset.append(start)
            length.append(len(line))
    return PartRows(files, sizes, index.positions(np.asarray(hashes, dtype=np.uint64)),
                    np.asarray(file, dtype=np.int32), np.asarray(offset, dtype=np.int64),
                    np.asarray(length, dtype=np.int64))


def merge_stamp(parts: PartRows, index: SplitIndex) -> dict[str, Any]:
    """What a merge is made from: the part files' sizes and the manifest (a changed one merges again)."""
    st = index.path.stat()
    return {"parts": {p.name: s for p, s in zip(parts.files, parts.sizes)}, "questions": len(index),
            "manifest": [str(index.path.resolve()), st.st_size, st.st_mtime_ns]}


def already_merged(out_dir: Path, parts: PartRows, index: SplitIndex, metrics: bool) -> bool:
    """The outputs were merged from exactly these part files and are all still there (``metrics``: a split with
    answers also has metrics.json); a user who deleted one gets them written again, without scoring."""
    stamp = out_dir / PARTS / MERGED
    outputs = [PREDICTIONS, SUBMISSION, *([METRICS] if metrics else [])]
    return (stamp.is_file() and all((out_dir / name).is_file() for name in outputs)
            and json.loads(stamp.read_text(encoding="utf-8")) == merge_stamp(parts, index))


def check_complete(out_dir: Path, parts: PartRows, index: SplitIndex) -> np.ndarray:
    """``[N]`` int64: the row (into ``parts``) of each question. A question with two rows fails, naming the
    ids; a question with none is -1."""
    counts = np.bincount(parts.position[parts.position >= 0], minlength=len(index))
    repeated = np.flatnonzero(counts > 1)
    if repeated.size:
        ids = index.ids_at(repeated[:NAMED_MAX])
        where = sorted({parts.files[f].name for f in parts.file[np.isin(parts.position, repeated)]})
        raise MergeError(
            f"{repeated.size} question(s) have more than one prediction in {out_dir / PARTS} "
            f"({', '.join(where)}): {name_some(ids, int(repeated.size))}. Two runs wrote into this output_dir at "
            "once; delete one run's rows (or the parts folder, to score the split again), then merge with --merge."
        )
    row_of = np.full(len(index), -1, dtype=np.int64)
    inside = np.flatnonzero(parts.position >= 0)
    row_of[parts.position[inside]] = inside
    return row_of


def missing_error(out_dir: Path, index: SplitIndex, row_of: np.ndarray) -> MergeError:
    missing = np.flatnonzero(row_of < 0)
    ids = index.ids_at(missing[:NAMED_MAX])
    return MergeError(
        f"{missing.size} of {len(index)} question(s) have no prediction in {out_dir / PARTS}: "
        f"{name_some(ids, int(missing.size))}. Run the same command again (it scores only what is missing); "
        "after a multi-node run without a shared output_dir, first copy every node's parts/ files here."
    )


def write_merged(out_dir: Path, parts: PartRows, index: SplitIndex, row_of: np.ndarray, target: Path,
                 progress: bool = False) -> None:
    """Every question's row, in manifest order, byte for byte as its rank wrote it, to ``target`` (atomically).
    Each row's id is checked against the manifest's text (the index matched them by hash)."""
    tmp = target.with_name(f".{target.name}.tmp")
    handles = [path.open("rb") for path in parts.files]
    try:
        with tmp.open("wb") as out:
            manifest = iter_records(index.path, len(index))
            for pos, (_, rec) in enumerate(tqdm(manifest, total=len(index), desc="merging", unit="q",
                                                disable=not progress)):
                row = int(row_of[pos])
                fh = handles[parts.file[row]]
                fh.seek(int(parts.offset[row]))
                line = fh.read(int(parts.length[row]))
                if json.loads(line)["id"] != rec.id:
                    raise MergeError(f"the row for {rec.id!r} in {parts.files[parts.file[row]]} holds another id "
                                     "with the same 64-bit hash; rename one of the two ids.")
                out.write(line)
    finally:
        for fh in handles:
            fh.close()
    os.replace(tmp, target)


def write_stamp(out_dir: Path, parts: PartRows, index: SplitIndex) -> None:
    path = out_dir / PARTS / MERGED
    path.write_text(json.dumps(merge_stamp(parts, index), indent=2) + "\n", encoding="utf-8")


class JobProgress:
    """Rank 0's progress bar over the whole job: its own rows, plus the rows the other ranks of this launch
    append to their part files (counted by newline, looked at every ``POLL_S`` seconds)."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, total: int, sizes: dict[str, int], desc: str,
                 enabled: bool):
        self.enabled = enabled and rank == 0
        self.bar = tqdm(total=total, desc=desc, unit="q", disable=not self.enabled, smoothing=0.05)
        self.others = [part_path(out_dir, r) for r in range(world_size) if r != rank] if self.enabled else []
        self.seen = {p: sizes.get(p.name, 0) for p in self.others}  # bytes already counted
        self.last = time.monotonic()

    def update(self, own: int) -> None:
        """``own`` rows this rank has just written."""
        if not self.enabled:
            return
        more = own
        if time.monotonic() - self.last >= POLL_S:
            self.last = time.monotonic()
            more += sum(self._new_rows(p) for p in self.others)
        self.bar.update(more)

    def _new_rows(self, path: Path) -> int:
        size = path.stat().st_size if path.is_file() else 0
        start = self.seen[path]
        if size <= start:
            self.seen[path] = min(start, size)  # its rank cut a torn line off
            return 0
        with path.open("rb") as fh:
            fh.seek(start)
            chunk = fh.read(size - start)
        self.seen[path] = size
        return chunk.count(b"\n")

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
