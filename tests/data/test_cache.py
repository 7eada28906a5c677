"""Feature cache: hits and misses, recompute on file or settings change, memory mapping, shapes and dtypes."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from functools import partial
from pathlib import Path

import librosa
import numpy as np
import pytest
from datasets.table import MemoryMappedTable

import aqa.data.cache as cache_mod
from aqa.data.audio import load_audio
from aqa.data.cache import WAVE_KEY, CacheError, FeatureCache, build_feature_cache, file_key, settings_hash
from aqa.data.manifest import Manifest, Record
from tests.helpers import write_sine

SETTINGS = {"n_mels": 16, "hop": 160, "n_fft": 400}


write_clip = partial(write_sine, amp=0.3)  # (path, seconds, sr, freq, channels=1, subtype=None)


def make_manifest(root: Path) -> Manifest:
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    write_clip(audio / "a.wav", 0.5, 16000, 440.0)
    write_clip(audio / "b.flac", 0.7, 44100, 660.0, channels=2)
    write_clip(audio / "c.wav", 0.3, 22050, 880.0, subtype="FLOAT")
    recs = [
        Record(id=f"q{i}", part="bqa", split="train", audio=name, question="Which?", choices=["x", "y"], answer="x")
        for i, name in enumerate(["a.wav", "b.flac", "c.wav", "a.wav"])  # two questions share a.wav
    ]
    return Manifest(path=root / "train.jsonl", audio_root=audio, records=recs)


class CountingExtractor:
    """Features of several ranks and dtypes, and a count of how often it ran."""

    def __init__(self, n_mels: int = 16):
        self.n_mels = n_mels
        self.calls = 0

    def __call__(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        mel = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=400, hop_length=160, n_mels=self.n_mels)
        ids = (np.abs(wave[::800]) * 1000).astype(np.int64)  # variable-length 1-D ids
        logmel = np.log10(mel + 1e-10).astype(np.float32)
        return {
            "mel": logmel,  # [n_mels, frames]
            "mel_t": logmel.T,  # [frames, n_mels], a non-contiguous view
            "ids": ids,  # [n]
            "cube": np.arange(24, dtype=np.float64).reshape(2, 3, 4) * wave.size,  # rank 3
            "scalar": np.asarray(wave.size, dtype=np.int32),  # rank 0
        }


def test_build_hits_and_misses(tmp_path):
    m = make_manifest(tmp_path)
    ext = CountingExtractor()
    cache = build_feature_cache(m, tmp_path / "cache", ext, SETTINGS, progress=False)
    assert ext.calls == 3  # one per distinct file, not per question
    assert len(cache) == 3

    ext2 = CountingExtractor()
    again = build_feature_cache(m, tmp_path / "cache", ext2, SETTINGS, progress=False)
    assert ext2.calls == 0  # every file hits
    for rec in m.records:
        path = m.audio_path(rec)
        assert path in again
        want = CountingExtractor()(load_audio(path))
        got = again.get(path)
        assert sorted(got) == sorted(want)
        for name in want:
            assert got[name].dtype == want[name].dtype, name
            assert got[name].shape == want[name].shape, name
            np.testing.assert_array_equal(got[name], want[name])


def test_shapes_differ_per_clip(tmp_path):
    m = make_manifest(tmp_path)
    cache = build_feature_cache(m, tmp_path / "cache", CountingExtractor(), SETTINGS, progress=False)
    frames = {cache.get(m.audio_path(r))["mel"].shape[1] for r in m.records}
    assert len(frames) == 3  # 0.5 s, 0.7 s and 0.3 s clips keep their own lengths
    assert cache.get(m.audio_path(m.records[0]))["scalar"].shape == ()


def test_recompute_only_changed_file(tmp_path):
    m = make_manifest(tmp_path)
    build_feature_cache(m, tmp_path / "cache", CountingExtractor(), SETTINGS, progress=False)
    changed = m.audio_root / "c.wav"
    old = FeatureCache(tmp_path / "cache", SETTINGS).get(changed)["mel"]
    write_clip(changed, 0.9, 48000, 300.0)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # coarse-mtime filesystems

    ext = CountingExtractor()
    cache = build_feature_cache(m, tmp_path / "cache", ext, SETTINGS, progress=False)
    assert ext.calls == 1
    new = cache.get(changed)["mel"]
    assert new.shape[1] > old.shape[1]
    np.testing.assert_array_equal(new, CountingExtractor()(load_audio(changed))["mel"])


def test_key_follows_size_and_mtime(tmp_path):
    p = tmp_path / "x.wav"
    write_clip(p, 0.2, 16000, 440.0)
    k1 = file_key(p)
    assert file_key(p) == k1
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert file_key(p) != k1
    with pytest.raises(CacheError, match="does not exist"):
        file_key(tmp_path / "missing.wav")


def test_settings_change_recomputes(tmp_path):
    m = make_manifest(tmp_path)
    build_feature_cache(m, tmp_path / "cache", CountingExtractor(16), SETTINGS, progress=False)
    ext = CountingExtractor(32)
    cache = build_feature_cache(m, tmp_path / "cache", ext, {**SETTINGS, "n_mels": 32}, progress=False)
    assert ext.calls == 3
    assert cache.get(m.audio_path(m.records[0]))["mel"].shape[0] == 32
    ext16 = CountingExtractor(16)  # the old settings still hit their own directory
    old = build_feature_cache(m, tmp_path / "cache", ext16, dict(reversed(list(SETTINGS.items()))), progress=False)
    assert ext16.calls == 0
    assert old.get(m.audio_path(m.records[0]))["mel"].shape[0] == 16


def test_settings_hash_is_by_value():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})
    fb = np.ones((4, 3), dtype=np.float32)
    assert settings_hash({"fb": fb}) == settings_hash({"fb": fb.copy()})
    fb2 = fb.copy()
    fb2[0, 0] = 2
    assert settings_hash({"fb": fb}) != settings_hash({"fb": fb2})
    assert settings_hash(None) != settings_hash({})  # the wave cache and an extractor never share rows
    with pytest.raises(CacheError, match="cannot be hashed"):
        settings_hash({"f": object()})


def test_memory_mapped_and_decodes_nothing_after_build(tmp_path, monkeypatch):
    m = make_manifest(tmp_path)
    build_feature_cache(m, tmp_path / "cache", CountingExtractor(), SETTINGS, progress=False)

    def no_decode(path):
        raise AssertionError(f"decoded {path} after the cache was built")

    monkeypatch.setattr(cache_mod, "load_audio", no_decode)
    ext = CountingExtractor()
    cache = build_feature_cache(m, tmp_path / "cache", ext, SETTINGS, progress=False)
    assert ext.calls == 0
    assert all(isinstance(ds.data, MemoryMappedTable) for ds in cache._shards.values())
    view = cache.get(m.audio_path(m.records[1]), copy=False)["mel"]
    assert not view.flags.writeable  # a view into the shared map
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    copy = cache.get(m.audio_path(m.records[1]))["mel"]
    assert copy.flags.writeable
    np.testing.assert_array_equal(copy, view)


def test_wave_cache_without_extractor(tmp_path):
    m = make_manifest(tmp_path)
    cache = build_feature_cache(m, tmp_path / "cache", progress=False)
    path = m.audio_path(m.records[1])
    wave = cache.get(path)[WAVE_KEY]
    assert wave.dtype == np.float32 and wave.ndim == 1
    np.testing.assert_array_equal(wave, load_audio(path))


def test_missing_entry_and_mismatched_arguments(tmp_path):
    m = make_manifest(tmp_path)
    cache = FeatureCache(tmp_path / "cache", SETTINGS)
    with pytest.raises(CacheError, match="not in the feature cache"):
        cache.get(m.audio_path(m.records[0]))
    with pytest.raises(CacheError, match="settings"):
        build_feature_cache(m, tmp_path / "cache", CountingExtractor(), None, progress=False)
    with pytest.raises(CacheError, match="extractor together with its settings"):
        cache.ensure([m.audio_path(m.records[0])], None, progress=False)


def test_bad_audio_names_the_file_and_keeps_the_rest(tmp_path):
    m = make_manifest(tmp_path)
    (m.audio_root / "c.wav").write_bytes(b"not audio at all")
    ext = CountingExtractor()
    with pytest.raises(CacheError, match=r"c\.wav.*data_prep"):
        build_feature_cache(m, tmp_path / "cache", ext, SETTINGS, progress=False)
    cache = FeatureCache(tmp_path / "cache", SETTINGS)
    assert m.audio_path(m.records[0]) in cache and m.audio_path(m.records[1]) in cache
    assert not list(cache.root.glob(".tmp-*"))  # no half-written shard is left behind


def _build_in_process(cache_dir: str, paths: list[str], log: str) -> None:
    def extractor(wave):
        with open(log, "a") as fh:  # O_APPEND: one line per extraction, whichever process ran it
            fh.write("x\n")
        time.sleep(0.05)  # long enough that both processes arrive while one is still building
        return {"mel": wave[None, :].copy()}

    FeatureCache(cache_dir, SETTINGS).ensure(paths, extractor, progress=False)


def test_two_processes_build_each_file_once(tmp_path):
    m = make_manifest(tmp_path)
    paths = [str(m.audio_path(r)) for r in m.records]
    log = str(tmp_path / "calls.log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "cache"), paths, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert Path(log).read_text().count("x") == 3
    assert len(FeatureCache(tmp_path / "cache", SETTINGS)) == 3


def test_ranks_with_a_barrier_split_the_work(tmp_path):
    m = make_manifest(tmp_path)
    barrier = threading.Barrier(2)
    counts, errors = [0, 0], []

    def rank_main(rank: int) -> None:
        try:
            ext = CountingExtractor()
            cache = build_feature_cache(m, tmp_path / "cache", ext, SETTINGS, rank=rank, world_size=2,
                                        barrier=barrier.wait, progress=False)
            counts[rank] = ext.calls
            for r in m.records:  # after the second barrier every rank sees every shard
                cache.get(m.audio_path(r))
        except Exception as err:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(counts) == [1, 2]  # three files split over two ranks, none done twice
