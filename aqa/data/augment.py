"""Training-time augmentations: SpecAugment frequency masking and option-order shuffling.

Both are pure functions of their inputs and a ``numpy.random.Generator``, so the dataset can make
them deterministic from (seed, epoch, index). The config dataclasses default to "off": the values
that are used live in ``configs/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SpecAugmentConfig:
    """Frequency masking of the backbone's log-mel input."""

    num_masks: int = 0  # bands masked per example
    max_width: int = 0  # each band is 0..max_width mel bins wide (uniform)
    p: float = 0.0  # probability that an example is masked at all

    def __post_init__(self) -> None:
        if self.num_masks < 0 or self.max_width < 0:
            raise ValueError("spec_augment.num_masks and spec_augment.max_width must be >= 0.")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"spec_augment.p must lie in [0, 1], got {self.p}.")

    @property
    def active(self) -> bool:
        return self.p > 0 and self.num_masks > 0 and self.max_width > 0


@dataclass
class OptionShuffleConfig:
    """Random option order per example and epoch, so the model cannot learn a favourite letter."""

    p: float = 0.0  # probability that an example's options are permuted

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"shuffle_options.p must lie in [0, 1], got {self.p}.")

    @property
    def active(self) -> bool:
        return self.p > 0


@dataclass
class AugmentConfig:
    """The ``augment:`` section of a training config."""

    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    shuffle_options: OptionShuffleConfig = field(default_factory=OptionShuffleConfig)


def frequency_masks(n_mels: int, num_masks: int, max_width: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``num_masks`` bands ``(start, width)`` with ``0 <= width <= min(max_width, n_mels)`` and
    ``0 <= start <= n_mels - width``: every band lies inside ``[0, n_mels)``. Bands may overlap."""
    widest = min(max_width, n_mels)
    bands = []
    for _ in range(num_masks):
        width = int(rng.integers(0, widest + 1))
        start = int(rng.integers(0, n_mels - width + 1))
        bands.append((start, width))
    return bands


def spec_augment(mel: np.ndarray, num_masks: int, max_width: int, rng: np.random.Generator) -> np.ndarray:
    """SpecAugment frequency masking. ``mel``: ``[n_mels, T]`` log-mel; returns a new ``[n_mels, T]`` array.

    Masked bands are set to the spectrogram's **minimum**, the log floor. A band at the floor reads as
    the same sound passed through a band-stop filter, an input the audio encoder can meet in real
    recordings; a band at the mean is a flat plateau no real sound produces. Whisper-style features
    are also padded to 30 s with floor frames, which would drag a mean towards the floor anyway.
    The input is never modified (cached features may be read-only views of a memory map).
    """
    if mel.ndim != 2:
        raise ValueError(f"spec_augment expects a log-mel of shape [n_mels, T], got shape {mel.shape}.")
    out = np.array(mel, copy=True)
    if out.size == 0:
        return out
    floor = out.min()
    for start, width in frequency_masks(out.shape[0], num_masks, max_width, rng):
        out[start:start + width, :] = floor
    return out


def shuffle_options(
    choices: list[str], answer_index: int | None, rng: np.random.Generator
) -> tuple[list[str], int | None, list[int]]:
    """Permute the options and remap the answer.

    Returns ``(new_choices, new_answer_index, perm)`` with ``new_choices[i] == choices[perm[i]]``, so
    ``new_choices[new_answer_index] == choices[answer_index]``. A ``None`` answer (eval) stays ``None``.
    """
    perm = [int(i) for i in rng.permutation(len(choices))]
    new_choices = [choices[i] for i in perm]
    new_answer = None if answer_index is None else perm.index(answer_index)
    return new_choices, new_answer, perm
