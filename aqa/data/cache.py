"""Feature cache: each audio file's extracted features (or its decoded 16 kHz wave) in memory-mapped Arrow.

Layout::

    <cache_dir>/<settings hash>/settings.json     what the hash stands for (for people, never read back)
    <cache_dir>/<settings hash>/shard-*.arrow     rows written with ``datasets``' ArrowWriter
    <cache_dir>/<settings hash>/.lock             serialises writers on one host

One row per audio *file* (several questions often share a clip), keyed by the file's identity:
its resolved path, size and ``mtime_ns``. Identity by ``stat`` rather than by content hash because it
costs one system call instead of reading every file again at each start; a copied or touched file is
merely recomputed, and an in-place rewrite that keeps both size and mtime (which ordinary tools never
do) is the only case it misses. The directory is named by a hash of the extractor settings, so changing
them starts a fresh directory; a changed file gets a new key. Either way only what changed is computed,
into a new shard beside the old ones.

Every array keeps its dtype and shape, whatever its rank (log-mel ``[n_mels, frames]``, token ids
``[n]``, a wave ``[S]``): the row stores names, dtypes, shapes and raw bytes. Shards are opened with
``datasets.Dataset.from_file``, i.e. memory-mapped, so reading a clip after the first epoch decodes,
resamples and extracts nothing.

The data layer knows no model: features come from an ``extractor`` callable (a backbone's
``extract_features``) plus its ``settings`` dict (the backbone's ``feature_settings()``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from aqa.data.audio import RESAMPLE_TYPE, SAMPLE_RATE, AudioError, load_audio
from aqa.data.manifest import Manifest
from aqa.errors import UserError

FORMAT_VERSION = 1  # bump when the row layout changes: old caches then land in a different directory
WAVE_KEY = "wave"  # the feature name used when no extractor is given: the decoded 16 kHz wave [S]

Extractor = Callable[[np.ndarray], dict[str, np.ndarray]]

_FEATURES = datasets.Features(
    {
        "key": datasets.Value("string"),
        "path": datasets.Value("string"),
        "names": datasets.List(datasets.Value("string")),
        "dtypes": datasets.List(datasets.Value("string")),
        "shapes": datasets.List(datasets.List(datasets.Value("int64"))),
        # large_binary: 64-bit offsets, so a shard may exceed 2 GiB (hours of 16 kHz audio do)
        "blobs": datasets.List(datasets.Value("large_binary")),
    }
)


class CacheError(UserError, RuntimeError):
    """The feature cache cannot give what was asked; the message says how to fix it."""


def _canonical(value: Any) -> Any:
    """Settings as plain JSON data; arrays (e.g. a mel filterbank) are reduced to a digest of their bytes."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.ndarray):
        # tobytes() is C order whatever the layout; ascontiguousarray would turn a 0-d array into [1]
        return {"ndarray": hashlib.sha256(value.tobytes()).hexdigest(), "dtype": value.dtype.str,
                "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CacheError(
        f"feature setting {value!r} ({type(value).__name__}) cannot be hashed: feature_settings() must hold "
        "numbers, strings, lists, dicts or numpy arrays."
    )


def cache_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The full settings the cache directory is named by; ``None`` means "cache the decoded wave"."""
    source = {"features": WAVE_KEY} if settings is None else {"extractor": settings}
    # the loader's rate and resampler are in the key too: a different resampler gives different waves
    return _canonical({"format": FORMAT_VERSION, "sample_rate": SAMPLE_RATE, "resample": RESAMPLE_TYPE, **source})


def settings_hash(settings: dict[str, Any] | None) -> str:
    """Short stable hash of :func:`cache_settings`; the name of the cache's subdirectory."""
    text = json.dumps(cache_settings(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_key(path: str | Path) -> str:
    """Identity of an audio file: a hash of its resolved path, size and modification time (ns)."""
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except FileNotFoundError as err:
        raise CacheError(
            f"audio file {path} does not exist. The manifest is stale: re-run its data_prep converter."
        ) from err
    ident = f"{resolved}\n{st.st_size}\n{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]


def _row(key: str, path: Path, feats: dict[str, np.ndarray]) -> dict[str, Any]:
    if not isinstance(feats, dict) or not feats:
        raise CacheError(f"the extractor returned {type(feats).__name__} for {path}; it must return a non-empty "
                         "dict of name -> numpy array.")
    names, dtypes, shapes, blobs = [], [], [], []
    for name, value in feats.items():
        arr = np.asarray(value)  # not ascontiguousarray: it turns a 0-d array into [1]
        if arr.dtype.hasobject:
            raise CacheError(f"feature '{name}' of {path} has dtype object; return numeric numpy arrays.")
        names.append(str(name))
        dtypes.append(arr.dtype.str)  # e.g. "<f4": byte order included, so bytes read back unambiguously
        shapes.append(list(arr.shape))
        blobs.append(arr.tobytes())  # C order whatever the memory layout
    return {"key": key, "path": str(path), "names": names, "dtypes": dtypes, "shapes": shapes, "blobs": blobs}


class FeatureCache:
    """Memory-mapped features of audio files for one extractor configuration.

    ``FeatureCache(dir, settings)`` opens (or creates) the directory for ``settings``; :meth:`ensure`
    computes what is missing; :meth:`get` returns a file's arrays.
    """

    def __init__(self, cache_dir: str | Path, settings: dict[str, Any] | None = None):
        self.settings = settings
        self.root = Path(cache_dir) / settings_hash(settings)
        self.root.mkdir(parents=True, exist_ok=True)
        info = self.root / "settings.json"
        if not info.exists():
            info.write_text(json.dumps(cache_settings(settings), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self._shards: dict[str, datasets.Dataset] = {}  # file name -> memory-mapped dataset
        self._index: dict[str, tuple[str, int]] = {}  # file key -> (shard name, row)
        self._keys: dict[str, str] = {}  # path as given -> file key, memoised so reads never stat
        self.refresh()

    # -- reading ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Open shards written since the last look (by this or another process)."""
        for shard in sorted(self.root.glob("shard-*.arrow")):
            if shard.name in self._shards:
                continue
            ds = datasets.Dataset.from_file(str(shard))  # memory-mapped, nothing is read into RAM
            self._shards[shard.name] = ds
            for row, key in enumerate(ds.data.table.column("key").to_pylist()):
                self._index[key] = (shard.name, row)

    def key_of(self, path: str | Path) -> str:
        """The file key of ``path``, stat-ed once per process and remembered."""
        name = str(path)
        if name not in self._keys:
            self._keys[name] = file_key(path)
        return self._keys[name]

    def __contains__(self, path: str | Path) -> bool:
        return self.key_of(path) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, path: str | Path, copy: bool = True) -> dict[str, np.ndarray]:
        """The cached arrays of one audio file, with their original dtypes and shapes.

        ``copy=False`` returns read-only views straight into the memory map (zero copy); the default
        returns ordinary writable arrays, which is what torch and in-place augmentation expect.
        """
        loc = self._index.get(self.key_of(path))
        if loc is None:
            raise CacheError(
                f"{path} is not in the feature cache {self.root}: it is new or changed since the cache was "
                "built. Build the cache for this manifest first (build_feature_cache / FeatureCache.ensure)."
            )
        shard, row = loc
        table = self._shards[shard].data.table
        names = table.column("names")[row].as_py()
        dtypes = table.column("dtypes")[row].as_py()
        shapes = table.column("shapes")[row].as_py()
        blobs = table.column("blobs")[row].values
        out = {}
        for i, name in enumerate(names):
            arr = np.frombuffer(blobs[i].as_buffer(), dtype=np.dtype(dtypes[i])).reshape(shapes[i])
            if copy:
                arr = arr.copy()
            else:
                arr.setflags(write=False)  # the map is shared by every reader: never write through it
            out[name] = arr
        return out

    # -- building --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # blocks while another process on this host is writing
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _missing(self, paths: list[Path]) -> list[Path]:
        for p in paths:  # stat afresh: a file may have changed since it was last looked at
            self._keys[str(p)] = file_key(p)
        return [p for p in paths if self._keys[str(p)] not in self._index]

    def ensure(
        self,
        paths: Iterable[str | Path],
        extractor: Extractor | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        progress: bool = True,
        disjoint: bool = False,
    ) -> int:
        """Compute and store every file in ``paths`` that is not cached yet; returns how many this process did.

        One process, or several without a ``barrier``: an exclusive file lock makes the first one do the
        work and the others find it done. Several ranks with a ``barrier`` (e.g. ``dist.barrier``): each
        computes its ``rank::world_size`` slice of the missing files, so a big cache builds in parallel.
        ``disjoint``: no other process asks for these files (inference shards never share a clip), so no lock
        is taken and every process fills its share at once (each writes its own shard file).
        """
        if (extractor is None) != (self.settings is None):
            raise CacheError("give the extractor together with its settings (a backbone's extract_features and "
                             "feature_settings()), or neither to cache the decoded 16 kHz wave.")
        unique = list(dict.fromkeys(Path(p) for p in paths))
        if barrier is not None and world_size > 1:
            self.refresh()
            missing = self._missing(unique)
            barrier()  # every rank holds the same missing list before any rank writes a shard
            failures, done = self._write_shard(missing[rank::world_size], extractor, progress and rank == 0)
            barrier()
        elif disjoint:
            self.refresh()
            failures, done = self._write_shard(self._missing(unique), extractor, progress)
        else:
            with self._lock():
                self.refresh()
                failures, done = self._write_shard(self._missing(unique), extractor, progress)
        self.refresh()
        if failures:
            listed = "; ".join(f"{p}: {why}" for p, why in failures[:3])
            raise CacheError(
                f"{len(failures)} audio file(s) could not be cached ({listed}). The manifest no longer matches "
                "the audio: re-run its data_prep converter, which quarantines bad audio with a reason."
            )
        return done

    def _write_shard(
        self, paths: list[Path], extractor: Extractor | None, progress: bool
    ) -> tuple[list[tuple[Path, str]], int]:
        """Extract ``paths`` into one new shard, published by an atomic rename."""
        failures: list[tuple[Path, str]] = []
        if not paths:
            return failures, 0
        name = uuid.uuid4().hex
        tmp = self.root / f".tmp-{name}.arrow"
        writer = ArrowWriter(features=_FEATURES, path=str(tmp), writer_batch_size=64)
        written = 0
        try:
            for path in tqdm(paths, desc=f"caching features ({self.root.name})", unit="clip", disable=not progress):
                key = file_key(path)
                try:
                    wave = load_audio(path)  # [S] float32, 16 kHz mono
                except AudioError as err:
                    failures.append((path, str(err)))
                    continue
                feats = {WAVE_KEY: wave} if extractor is None else extractor(wave)
                if file_key(path) != key:  # rewritten while we read it: caching it would pair old key, new data
                    failures.append((path, "the file changed while it was being read"))
                    continue
                writer.write(_row(key, path.resolve(), feats))
                written += 1
        finally:
            writer.finalize()
            if written:
                os.replace(tmp, self.root / f"shard-{name}.arrow")  # readers see a whole shard or none
            else:
                tmp.unlink(missing_ok=True)
        return failures, written


def manifest_audio_paths(manifests: Manifest | Iterable[Manifest]) -> list[Path]:
    """Every distinct audio file of one or more manifests, in first-seen order."""
    if isinstance(manifests, Manifest):
        manifests = [manifests]
    return list(dict.fromkeys(m.audio_path(r) for m in manifests for r in m.records))


def build_feature_cache(
    manifests: Manifest | Iterable[Manifest],
    cache_dir: str | Path,
    extractor: Extractor | None = None,
    settings: dict[str, Any] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> FeatureCache | None:
    """Open the cache for ``settings`` and fill in every audio file of ``manifests`` that is missing.

    ``extractor``: 16 kHz mono float32 ``[S]`` -> ``dict[name, array of any rank]``; with ``settings``
    (its hashable configuration). Both ``None``: the decoded wave is cached under ``"wave"`` as ``[S]``.
    An extractor with empty settings ``{}`` is a backbone that reads no audio (a text LLM over sound
    events): no clip is decoded and ``None`` comes back, which ``QADataset`` reads as "no features".
    """
    if extractor is not None and settings is None:
        raise CacheError("an extractor needs its settings (the backbone's feature_settings()) so that a change "
                         "to them recomputes the cache; settings={} means the backbone reads no audio.")
    if extractor is not None and not settings:
        return None  # nothing to extract: not even the audio files need to exist
    cache = FeatureCache(cache_dir, settings)
    cache.ensure(manifest_audio_paths(manifests), extractor, rank=rank, world_size=world_size,
                 barrier=barrier, progress=progress)
    return cache
