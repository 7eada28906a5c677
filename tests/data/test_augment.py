"""SpecAugment frequency masks and option shuffling: bounds, counts, answer remapping, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from aqa.config import ConfigError, load_config
from aqa.data.augment import (
    AugmentConfig,
    OptionShuffleConfig,
    SpecAugmentConfig,
    frequency_masks,
    shuffle_options,
    spec_augment,
)


def random_mel(n_mels: int = 40, frames: int = 30, seed: int = 0) -> np.ndarray:
    # strictly above the minimum everywhere but one cell, so a masked row is visible
    mel = np.random.default_rng(seed).uniform(1.0, 2.0, size=(n_mels, frames)).astype(np.float32)
    mel[0, 0] = -3.0
    return mel


def test_frequency_masks_bounds_and_counts():
    rng = np.random.default_rng(0)
    widths = set()
    for _ in range(500):
        bands = frequency_masks(n_mels=40, num_masks=3, max_width=8, rng=rng)
        assert len(bands) == 3
        for start, width in bands:
            assert 0 <= width <= 8
            assert 0 <= start and start + width <= 40
            widths.add(width)
    assert widths == set(range(9))  # both ends of 0..max_width are drawn


def test_frequency_masks_clamp_to_the_spectrogram():
    rng = np.random.default_rng(1)
    for _ in range(200):
        for start, width in frequency_masks(n_mels=5, num_masks=2, max_width=50, rng=rng):
            assert 0 <= start and start + width <= 5


def test_spec_augment_masks_exactly_the_bands_with_the_minimum():
    mel = random_mel()
    before = mel.copy()
    out = spec_augment(mel, num_masks=2, max_width=10, rng=np.random.default_rng(7))
    bands = frequency_masks(40, 2, 10, np.random.default_rng(7))  # the same draws
    masked = np.zeros(40, dtype=bool)
    for start, width in bands:
        masked[start:start + width] = True
    assert masked.any()
    assert out.shape == mel.shape and out.dtype == mel.dtype
    np.testing.assert_array_equal(mel, before)  # the input is untouched
    np.testing.assert_array_equal(out[masked], np.full((masked.sum(), 30), -3.0, dtype=np.float32))
    np.testing.assert_array_equal(out[~masked], mel[~masked])


def test_spec_augment_accepts_read_only_views_and_is_deterministic():
    mel = random_mel()
    mel.setflags(write=False)
    a = spec_augment(mel, 3, 6, np.random.default_rng(3))
    b = spec_augment(mel, 3, 6, np.random.default_rng(3))
    c = spec_augment(mel, 3, 6, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match=r"\[n_mels, T\]"):
        spec_augment(np.zeros(10, dtype=np.float32), 1, 2, np.random.default_rng(0))


def test_zero_masks_change_nothing():
    mel = random_mel()
    np.testing.assert_array_equal(spec_augment(mel, 0, 10, np.random.default_rng(0)), mel)


def test_shuffle_options_remaps_the_answer():
    choices = ["dog", "cat", "bird", "frog"]
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(200):
        answer = trial % 4
        new, new_answer, perm = shuffle_options(choices, answer, rng)
        assert sorted(perm) == [0, 1, 2, 3]
        assert new == [choices[i] for i in perm]
        assert new[new_answer] == choices[answer]
        seen.add(tuple(perm))
    assert choices == ["dog", "cat", "bird", "frog"]  # the input list is untouched
    assert len(seen) == 24  # every order of four options occurs


def test_shuffle_options_deterministic_and_eval_answer():
    a = shuffle_options(list("abcde"), 2, np.random.default_rng(11))
    b = shuffle_options(list("abcde"), 2, np.random.default_rng(11))
    assert a == b
    new, answer, perm = shuffle_options(["yes", "no"], None, np.random.default_rng(0))
    assert answer is None and sorted(new) == ["no", "yes"]


def test_two_options_swap_about_half_the_time():
    rng = np.random.default_rng(5)
    swaps = sum(shuffle_options(["yes", "no"], 0, rng)[1] == 1 for _ in range(2000))
    assert 850 < swaps < 1150


def test_configs_load_from_yaml_and_reject_bad_values(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text("spec_augment: {num_masks: 2, max_width: 27, p: 0.5}\nshuffle_options: {p: 1.0}\n")
    cfg = load_config(AugmentConfig, path, ["spec_augment.p=0.8"])
    assert cfg.spec_augment == SpecAugmentConfig(num_masks=2, max_width=27, p=0.8)
    assert cfg.spec_augment.active and cfg.shuffle_options.active
    assert not AugmentConfig().spec_augment.active and not AugmentConfig().shuffle_options.active
    with pytest.raises(ValueError, match="p must lie in"):
        SpecAugmentConfig(num_masks=1, max_width=1, p=1.5)
    with pytest.raises(ValueError, match="p must lie in"):
        OptionShuffleConfig(p=-0.1)
    with pytest.raises(ConfigError, match="num_masks"):
        load_config(AugmentConfig, path, ["spec_augment.num_mask=3"])


@pytest.mark.parametrize("n", [2, 3, 26])
def test_perm_inverse_restores_canonical_order(n):
    choices = [f"opt{i}" for i in range(n)]
    for seed in range(5):
        new, _, perm = shuffle_options(choices, 0, np.random.default_rng(seed))
        canonical = [None] * n
        for pos, orig in enumerate(perm):
            canonical[orig] = new[pos]
        assert canonical == choices
