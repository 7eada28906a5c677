"""Training dataset and sampler: determinism per (seed, epoch, index), rank sharding, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from aqa.data.augment import AugmentConfig, OptionShuffleConfig, SpecAugmentConfig
from aqa.data.cache import build_feature_cache
from aqa.data.dataset import QADataset, ShardedSampler, collate_examples
from aqa.data.manifest import Manifest, Record
from tests.helpers import write_wave

N_MELS = 12


def extractor(wave: np.ndarray) -> dict[str, np.ndarray]:
    frames = wave.size // 160
    mel = wave[: frames * 160].reshape(frames, 160)[:, :N_MELS].T.astype(np.float32)  # [N_MELS, frames]
    return {"mel": mel, "energy": np.square(wave).sum(keepdims=True).astype(np.float64)}


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_wave(audio / f"c{i}.wav", rng.uniform(-0.5, 0.5, 1600 * (i + 2)).astype(np.float32))
    options = ["dog", "cat", "bird", "frog"]
    records = [
        Record(id=f"q{i}", part="bqa", split="train", audio=f"c{i % 3}.wav", question=f"Which animal {i}?",
               choices=options, answer=options[i % 4], meta={"source": "test"})
        for i in range(8)
    ]
    return Manifest(path=tmp_path / "train.jsonl", audio_root=audio, records=records)


@pytest.fixture
def cache(manifest, tmp_path):
    return build_feature_cache(manifest, tmp_path / "cache", extractor, {"n": N_MELS}, progress=False)


AUG = AugmentConfig(spec_augment=SpecAugmentConfig(num_masks=2, max_width=4, p=1.0),
                    shuffle_options=OptionShuffleConfig(p=1.0))


def same(a, b) -> bool:
    return (a.id, a.choices, a.answer_index, a.meta) == (b.id, b.choices, b.answer_index, b.meta) and \
        sorted(a.features) == sorted(b.features) and all(np.array_equal(a.features[k], b.features[k])
                                                         for k in a.features)


def test_items_are_deterministic_per_seed_epoch_index(manifest, cache):
    ds = QADataset(manifest, cache, augment=AUG, spec_augment_key="mel", seed=3)
    again = QADataset(manifest, cache, augment=AUG, spec_augment_key="mel", seed=3)
    for i in range(len(ds)):
        assert same(ds[(2, i)], ds[(2, i)])
        assert same(ds[(2, i)], again[(2, i)])
    epoch0 = [ds[(0, i)] for i in range(len(ds))]
    epoch1 = [ds[(1, i)] for i in range(len(ds))]
    assert any(a.choices != b.choices for a, b in zip(epoch0, epoch1))  # a new epoch reshuffles
    other = QADataset(manifest, cache, augment=AUG, spec_augment_key="mel", seed=4)
    assert any(not same(other[(0, i)], epoch0[i]) for i in range(len(ds)))
    ds.set_epoch(1)
    assert all(same(ds[i], epoch1[i]) for i in range(len(ds)))  # plain indices use set_epoch


def test_shuffled_answer_and_features(manifest, cache):
    ds = QADataset(manifest, cache, augment=AUG, spec_augment_key="mel", seed=0)
    orders, masked_rows = set(), 0
    for i, rec in enumerate(manifest.records):
        ex = ds[(0, i)]
        perm = ex.meta["option_perm"]
        assert ex.choices == [rec.choices[j] for j in perm]
        assert ex.choices[ex.answer_index] == rec.answer
        assert ex.meta["part"] == "bqa" and ex.meta["source"] == "test"
        orders.add(tuple(perm))
        clean = cache.get(manifest.audio_path(rec))
        np.testing.assert_array_equal(ex.features["energy"], clean["energy"])  # only the named key is masked
        assert ex.features["mel"].shape == clean["mel"].shape
        changed = ~np.all(ex.features["mel"] == clean["mel"], axis=1)  # [N_MELS] rows that were masked
        assert np.all(ex.features["mel"][changed] == clean["mel"].min())
        masked_rows += int(changed.sum())
    assert len(orders) > 1 and masked_rows > 0


def test_no_augmentation_keeps_the_record(manifest, cache):
    ds = QADataset(manifest, cache)
    for i, rec in enumerate(manifest.records):
        ex = ds[(5, i)]
        assert ex.choices == rec.choices and ex.answer_index == rec.answer_index
        assert ex.meta["option_perm"] == [0, 1, 2, 3]
        np.testing.assert_array_equal(ex.features["mel"], cache.get(manifest.audio_path(rec))["mel"])


def test_text_backbone_has_no_features_and_rejects_spec_augment(manifest):
    ds = QADataset(manifest, None, augment=AugmentConfig(shuffle_options=OptionShuffleConfig(p=1.0)))
    assert ds[0].features == {}
    with pytest.raises(ValueError, match="spec_augment.p=0"):
        QADataset(manifest, None, augment=AUG, spec_augment_key=None)


def test_wrong_spec_augment_key_names_the_cache(manifest, cache):
    ds = QADataset(manifest, cache, augment=AUG, spec_augment_key="input_features")
    with pytest.raises(KeyError, match="another extractor"):
        ds[0]


@pytest.mark.parametrize("n,world,drop_last", [(12, 4, False), (10, 4, False), (10, 4, True), (7, 1, False)])
def test_sharding_covers_every_index(n, world, drop_last):
    shards = []
    for rank in range(world):
        s = ShardedSampler(n, rank=rank, world_size=world, seed=1, drop_last=drop_last)
        s.set_epoch(3)
        draws = list(s)
        assert all(epoch == 3 for epoch, _ in draws)
        shards.append([i for _, i in draws])
    assert len({len(x) for x in shards}) == 1  # every rank takes the same number of steps
    flat = [i for x in shards for i in x]
    if drop_last:
        assert len(flat) == len(set(flat)) == (n // world) * world
    else:
        assert set(flat) == set(range(n))
        assert len(flat) == -(-n // world) * world
        if n % world == 0:
            assert sorted(flat) == list(range(n))  # each index exactly once


def test_epoch_orders_differ_and_repeat():
    s = ShardedSampler(20, seed=0)
    assert s.epoch_order(0) == s.epoch_order(0)
    assert s.epoch_order(0) != s.epoch_order(1)
    assert sorted(s.epoch_order(1)) == list(range(20))
    assert ShardedSampler(5, shuffle=False).epoch_order(9) == [0, 1, 2, 3, 4]


def test_restore_position_continues_exactly():
    full = list(ShardedSampler(17, rank=1, world_size=2, seed=5))
    s = ShardedSampler(17, rank=1, world_size=2, seed=5)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    resumed = ShardedSampler(17, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - 4
    assert head + list(resumed) == full
    assert list(resumed) == full  # the finished epoch iterated again starts over


def test_state_dict_counts_consumed_items_and_new_epoch_resets():
    s = ShardedSampler(10, seed=2)
    s.set_epoch(1)
    list(s)  # a prefetching loader drains the sampler ahead of training...
    state = s.state_dict(consumed=3)  # ...so the recipe says how much it really trained on
    r = ShardedSampler(10, seed=2)
    r.load_state_dict(state)
    r.set_epoch(1)  # the same epoch keeps the restored position
    assert list(r) == [(1, i) for i in s.epoch_order(1)[3:]]
    r.set_epoch(2)
    assert [i for _, i in r] == s.epoch_order(2)


def test_restore_rejects_a_different_run():
    state = ShardedSampler(10, world_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ShardedSampler(10, world_size=4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShardedSampler(10, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not in a world"):
        ShardedSampler(10, rank=2, world_size=2)


def test_resumed_loader_sees_the_same_stream(manifest, cache):
    def loader(sampler):
        ds = QADataset(manifest, cache, augment=AUG, spec_augment_key="mel", seed=9)
        return DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate_examples)

    def run(epochs, sampler):
        out = []
        for epoch in epochs:
            sampler.set_epoch(epoch)
            out += [ex for batch in loader(sampler) for ex in batch]
        return out

    reference = run([0, 1], ShardedSampler(len(manifest.records), seed=9))

    first = ShardedSampler(len(manifest.records), seed=9)
    first.set_epoch(1)
    head = [ex for batch in loader(first) for ex in batch][:3]
    state = first.state_dict(consumed=3)  # stopped after one batch of epoch 1
    second = ShardedSampler(len(manifest.records), seed=9)
    second.load_state_dict(state)
    tail = run([1], second)
    resumed = run([0], ShardedSampler(len(manifest.records), seed=9)) + head + tail
    assert len(resumed) == len(reference) == 16
    assert all(same(a, b) for a, b in zip(resumed, reference))
