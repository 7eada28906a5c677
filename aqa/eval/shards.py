"""A split as compact arrays, and its shards: which rank scores which question, in which order.

:class:`SplitIndex` streams the manifest once and keeps, per question, four numbers (24 bytes): the byte
offset of its line, a 64-bit hash of its id, a hash of its clip and an estimate of its work. A
100k-question manifest is then 2.4 MB, whatever its records hold; a record is read again from its offset
when it is scored. The id hash is an index only: every merged row is checked against the manifest's id
text (see :mod:`aqa.eval.parts`).

Shards (:meth:`SplitIndex.schedule`): the split is sorted longest first, a clip's questions together, and
cut into batches at clip boundaries that do not depend on the number of ranks (so a batch holds questions
of like length, the longest batch, the one that runs out of memory, comes first, and every question is
scored beside the same others however many ranks run). A clip stays on one rank (it is decoded once, and
the ranks' clip sets are disjoint); batches are dealt longest first to the rank with the least estimated work so
far, so ranks finish together. The deal depends on the manifest, the batch size and the number of ranks,
never on what is done, so every rank computes the same one without talking to the others.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aqa.data.manifest import ManifestError, Record, iter_records, manifest_audio_root, read_record_at

# Work estimate in prompt tokens (integers, so every rank sums them exactly alike): Qwen2-Audio reads 25 audio
# tokens per second and 16-bit 16 kHz audio is 32,000 bytes per second, so one token per 1,280 bytes of file
# (compressed files are underestimated, alike for a whole data set); text is about 4 characters per token.
AUDIO_BYTES_PER_TOKEN = 1280
CHARS_PER_TOKEN = 4
NAMED = 10  # ids an error names before it counts the rest


def id_hash(text: str) -> int:
    """A 64-bit hash of an id (or a path), the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def name_some(ids: list[str], total: int) -> str:
    """``'a', 'b' and 3 more``: the first ids of a list an error is about."""
    named = ", ".join(repr(i) for i in ids[:NAMED])
    return named + (f" and {total - min(total, NAMED)} more" if total > NAMED else "")


@dataclass
class SplitIndex:
    """The questions of one split (the first ``limit`` of the manifest), as arrays of ``[N]``."""

    path: Path
    audio_root: Path
    offsets: np.ndarray  # [N] int64: byte offset of each record's line
    ids: np.ndarray  # [N] uint64: id_hash of each id
    clips: np.ndarray  # [N] uint64: id_hash of each audio path
    audio_cost: np.ndarray  # [N] int64: estimated audio tokens
    text_cost: np.ndarray  # [N] int64: estimated text tokens
    answered: int  # questions with an answer
    _sorted: np.ndarray = field(init=False, repr=False)  # [N] positions in id-hash order

    @classmethod
    def scan(cls, path: str | Path, limit: int | None = None, progress: bool = False) -> SplitIndex:
        """Stream ``path`` once; a repeated id fails, naming the ids."""
        path = Path(path)
        root = manifest_audio_root(path)
        offsets, ids, clips = array("q"), array("Q"), array("Q")  # 8 bytes a question (a list takes 32)
        audio, text = array("q"), array("q")
        sizes: dict[int, int] = {}  # clip hash -> file size: each clip is stat-ed once
        answered = 0
        records = iter_records(path, limit)
        for offset, rec in tqdm(records, desc=f"reading {path.name}", unit="q", disable=not progress):
            clip = id_hash(rec.audio)
            if clip not in sizes:
                file = root / rec.audio
                sizes[clip] = file.stat().st_size if file.is_file() else 0  # a text backbone needs no audio
            offsets.append(offset)
            ids.append(id_hash(rec.id))
            clips.append(clip)
            audio.append(sizes[clip] // AUDIO_BYTES_PER_TOKEN)
            text.append((len(rec.question) + sum(len(c) for c in rec.choices)) // CHARS_PER_TOKEN)
            answered += rec.answer is not None
        index = cls(path, root, np.asarray(offsets, dtype=np.int64), np.asarray(ids, dtype=np.uint64),
                    np.asarray(clips, dtype=np.uint64), np.asarray(audio, dtype=np.int64),
                    np.asarray(text, dtype=np.int64), answered)
        index._sorted = np.argsort(index.ids, kind="stable")
        index._check_unique()
        return index

    def __len__(self) -> int:
        return len(self.offsets)

    # -- ids ----------------------------------------------------------------------------------------------
    def positions(self, hashes: np.ndarray) -> np.ndarray:
        """Manifest position of each id hash in ``hashes`` (``[M]``), -1 where the split has no such id."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(self) == 0:
            return np.full(len(hashes), -1, dtype=np.int64)
        sorted_ids = self.ids[self._sorted]
        at = np.searchsorted(sorted_ids, hashes).clip(max=len(sorted_ids) - 1)
        return np.where(sorted_ids[at] == hashes, self._sorted[at], -1)

    def _check_unique(self) -> None:
        sorted_ids = self.ids[self._sorted]
        repeated = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
        if repeated.size:
            text = [r.id for r in self.records_where(np.isin(self.ids, repeated))]
            dup = sorted({i for i in text if text.count(i) > 1})
            if dup:  # else two ids share a hash: astronomically rare, and harmless as long as positions agree
                raise ManifestError(f"{self.path} repeats question id(s) {name_some(dup, len(dup))}; ids must be "
                                    "unique (re-run the converter).")
            raise ManifestError(f"ids {name_some(text, len(text))} of {self.path} share a 64-bit hash; rename one.")

    def records_where(self, mask: np.ndarray) -> Iterator[Record]:
        """The records where ``mask`` (``[N]`` bool) is true, in manifest order, read from their offsets."""
        with self.path.open("rb") as fh:
            for offset in self.offsets[mask]:
                yield read_record_at(fh, int(offset))

    def ids_at(self, positions: Iterable[int]) -> list[str]:
        """The id text of the questions at ``positions`` (for an error message)."""
        mask = np.zeros(len(self), dtype=bool)
        mask[list(positions)] = True
        return [r.id for r in self.records_where(mask)]

    # -- shards -------------------------------------------------------------------------------------------
    def order(self) -> np.ndarray:
        """``[N]`` positions in scoring order: longest audio first, a clip's questions together, then the
        longest text first."""
        pos = np.arange(len(self))
        return np.lexsort((pos, -self.text_cost, self.clips, -self.audio_cost))  # lexsort: last key first

    def batches(self, batch_size: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The whole split in batches of at most ``batch_size`` along :meth:`order`, and ``[B]`` the unit of
        each batch. A batch never splits a clip's questions unless they are more than a batch; then the clip's
        batches form one unit (every other batch is a unit of its own), so a clip is decoded by one rank.
        Batches do not depend on the number of ranks: every question is scored beside the same others however
        many ranks run (and a rerun scores a batch whole again), so the logits come out bit for bit the same."""
        order = self.order()
        clips = self.clips[order]
        starts = np.flatnonzero(np.r_[True, clips[1:] != clips[:-1]]) if len(order) else np.zeros(0, dtype=int)
        ends = np.r_[starts[1:], len(order)].astype(int)
        batches: list[np.ndarray] = []
        units: list[int] = []
        current: list[int] = []  # indices into order
        current_unit: int | None = None  # the unit of a clip that goes on in the current batch
        fresh = itertools.count()  # unit numbers
        for s, e in zip(starts.tolist(), ends.tolist()):
            if len(current) + e - s > batch_size:
                if current:
                    batches.append(order[current])
                    units.append(next(fresh) if current_unit is None else current_unit)
                current, current_unit = [], None
                if e - s > batch_size:  # a clip with more questions than a batch: its batches stay together
                    current_unit = next(fresh)
                    while e - s > batch_size:
                        batches.append(order[s : s + batch_size])
                        units.append(current_unit)
                        s += batch_size
            current.extend(range(s, e))
        if current:
            batches.append(order[current])
            units.append(next(fresh) if current_unit is None else current_unit)
        return batches, np.asarray(units, dtype=np.int64)

    def schedule(self, batch_size: int, world_size: int, rank: int) -> list[np.ndarray]:
        """This rank's batches, in scoring order. Units of batches (see :meth:`batches`) are dealt longest
        first to the rank with the least estimated work so far, so ranks finish together. Every rank computes
        the same deal from the manifest alone."""
        batches, units = self.batches(batch_size)
        work = self.audio_cost + self.text_cost + 1
        unit_work = np.zeros(int(units.max()) + 1 if len(units) else 0, dtype=np.int64)
        for batch, unit in zip(batches, units):
            unit_work[unit] += int(work[batch].sum())
        mine = np.zeros(len(unit_work), dtype=bool)
        loads = [(0, r) for r in range(world_size)]  # (estimated work, rank): a min-heap
        for u in np.argsort(-unit_work, kind="stable"):  # integers: every rank sums them exactly alike
            load, r = heapq.heappop(loads)
            mine[u] = r == rank
            heapq.heappush(loads, (load + int(unit_work[u]), r))
        return [batch for batch, unit in zip(batches, units) if mine[unit]]

    def open_records(self) -> RecordReader:
        return RecordReader(self.path)


class RecordReader:
    """Reads the records at given positions of an index (keeps the manifest open)."""

    def __init__(self, path: Path):
        self._fh = path.open("rb")

    def read(self, index: SplitIndex, positions: Iterable[int]) -> list[Record]:
        return [read_record_at(self._fh, int(index.offsets[p])) for p in positions]

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
