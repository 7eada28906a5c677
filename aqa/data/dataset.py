"""The training dataset over a manifest and the rank-sharded, resumable sampler that feeds it.

Every random choice an item makes (option order, SpecAugment bands) is drawn from a generator seeded
by ``(seed, epoch, index, stream)``, never from global state. A resumed run, a different number of
DataLoader workers or another prefetch depth therefore sees exactly the same stream of examples.
The ``stream`` number keeps the augmentations independent: turning SpecAugment on does not change
which option orders are drawn.

:class:`ShardedSampler` yields ``(epoch, index)`` pairs; :class:`QADataset` accepts them (and plain
indices, which use :meth:`QADataset.set_epoch`). Carrying the epoch with the index keeps persistent
DataLoader workers, which hold their own copy of the dataset, on the right epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from aqa.config import ConfigError
from aqa.data.augment import AugmentConfig, shuffle_options, spec_augment
from aqa.data.cache import FeatureCache
from aqa.data.example import Example
from aqa.data.manifest import Manifest

SHUFFLE_STREAM = 0
SPEC_AUGMENT_STREAM = 1


def item_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one augmentation of one item in one epoch."""
    return np.random.default_rng([seed, epoch, index, stream])


class QADataset(Dataset):
    """Questions of one manifest as :class:`~aqa.data.example.Example` s with cached features.

    ``cache``: the :class:`FeatureCache` built for this manifest with the backbone's extractor, or
    ``None`` for backbones without audio input (features stay empty). ``spec_augment_key``: the
    backbone's ``spec_augment_key``, the ``[n_mels, T]`` feature SpecAugment may mask.
    """

    def __init__(
        self,
        manifest: Manifest,
        cache: FeatureCache | None = None,
        *,
        augment: AugmentConfig | None = None,
        spec_augment_key: str | None = None,
        seed: int = 0,
    ):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.manifest = manifest
        self.cache = cache
        self.augment = augment or AugmentConfig()
        self.spec_augment_key = spec_augment_key
        self.seed = seed
        self.epoch = 0
        if self.augment.spec_augment.active and (spec_augment_key is None or cache is None):
            raise ValueError(
                "augment.spec_augment is on, but this backbone has no log-mel input to mask (or no feature "
                "cache was given). Set augment.spec_augment.p=0 for this backbone."
            )

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for plain integer indices."""
        self.epoch = epoch

    def lengths(self) -> list[float]:
        """How long each question's input is, for :class:`ShardedSampler`'s length grouping: the clip's
        seconds (from its header) for an audio model, else the characters of its question, options and meta
        (the text a text model reads)."""
        from aqa.data.audio import header_duration

        if self.cache is not None:
            return [header_duration(self.manifest.audio_path(r)) for r in self.manifest.records]
        return [float(len(r.question) + sum(map(len, r.choices)) + len(str(r.meta))) for r in self.manifest.records]

    def __len__(self) -> int:
        return len(self.manifest.records)

    def __getitem__(self, item: int | tuple[int, int]) -> Example:
        """``item``: an index, or an ``(epoch, index)`` pair as :class:`ShardedSampler` yields."""
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        record = self.manifest.records[index]
        choices, answer = list(record.choices), record.answer_index
        perm = list(range(len(choices)))

        shuffle = self.augment.shuffle_options
        if shuffle.active:
            rng = item_rng(self.seed, epoch, index, SHUFFLE_STREAM)
            if rng.random() < shuffle.p:
                choices, answer, perm = shuffle_options(choices, answer, rng)

        features: dict[str, np.ndarray] = {}
        if self.cache is not None:
            features = self.cache.get(self.manifest.audio_path(record))
        spec = self.augment.spec_augment
        if spec.active:
            if self.spec_augment_key not in features:
                raise KeyError(
                    f"spec_augment_key '{self.spec_augment_key}' is not among the cached features "
                    f"{sorted(features)}: the cache was built with another extractor than this backbone's."
                )
            rng = item_rng(self.seed, epoch, index, SPEC_AUGMENT_STREAM)
            if rng.random() < spec.p:
                key = self.spec_augment_key
                features[key] = spec_augment(features[key], spec.num_masks, spec.max_width, rng)

        meta: dict[str, Any] = {**record.meta, "part": record.part, "option_perm": perm}
        return Example(id=record.id, question=record.question, choices=choices, answer_index=answer,
                       features=features, meta=meta)


def qa_datasets(data_dir: str | Path, train_split: str, dev_split: str | None, cache_dir: str | Path,
                extract: Any, settings: dict, *, augment: AugmentConfig, spec_augment_key: str | None, seed: int,
                rank: int = 0, world_size: int = 1, barrier: Any = None,
                progress: bool = False) -> tuple[QADataset, QADataset | None]:
    """The train split (answered; augmented, seeded per (epoch, item)) and the dev split (canonical order, no
    augmentation) of ``data_dir``, over one feature cache that each rank fills its share of, once.

    ``extract``/``settings``: the backbone's feature extractor and its settings (empty settings: a backbone
    that reads no audio, and no clip is decoded)."""
    from aqa.data.cache import build_feature_cache
    from aqa.data.manifest import load_manifest

    data_dir = Path(data_dir)
    train_m = load_manifest(data_dir / f"{train_split}.jsonl")
    require_answers(train_m)
    dev_m = load_manifest(data_dir / f"{dev_split}.jsonl") if dev_split else None
    cache = build_feature_cache([m for m in (train_m, dev_m) if m is not None], cache_dir, extract, settings,
                                rank=rank, world_size=world_size, barrier=barrier, progress=progress)
    train_ds = QADataset(train_m, cache, augment=augment, spec_augment_key=spec_augment_key, seed=seed)
    return train_ds, (QADataset(dev_m, cache) if dev_m is not None else None)


def require_answers(manifest: Manifest) -> None:
    """Training needs answers: a split without them (eval) cannot be the train split."""
    missing = [r.id for r in manifest.records if r.answer is None]
    if missing:
        raise ConfigError(f"{manifest.path} has {len(missing)} questions without an answer (e.g. {missing[0]}); "
                            "train_split must name an answered split such as train.")


def collate_examples(batch: list[Example]) -> list[Example]:
    """DataLoader ``collate_fn`` that keeps Examples as a list; the backbone's ``collate`` makes tensors."""
    return list(batch)


class ShardedSampler(Sampler):
    """Each rank's share of an epoch's order, resumable at any position.

    The epoch order is a permutation of ``range(num_items)`` seeded by ``(seed, epoch)`` (or the
    identity when ``shuffle`` is off). It is padded by wrapping around to a multiple of
    ``world_size`` (or cut, with ``drop_last``) so every rank takes the same number of steps, and
    rank ``r`` takes positions ``r, r + world_size, ...``. Yields ``(epoch, index)``.

    With ``lengths`` (one per item) and ``group_size`` (the micro-batch), each micro-batch holds items of
    similar length, so a batch of 1 s clips is not padded to a 30 s one: the shuffled order is cut into
    windows of ``GROUP_WINDOW`` global micro-batches, each window sorted by length and cut into global
    micro-batches (``group_size * world_size`` items, rank r's micro-batch being its share), whose order
    is shuffled again. Still a permutation seeded by ``(seed, epoch)``, so resuming is exact.
    """

    GROUP_WINDOW = 64  # global micro-batches sorted together: long enough to find equals, short enough to mix

    def __init__(self, num_items: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, lengths: list[float] | None = None, group_size: int = 1):
        if num_items <= 0:
            raise ValueError("the sampler needs at least one item; the manifest is empty.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}.")
        if drop_last and num_items < world_size:
            raise ValueError(f"drop_last with {num_items} items over {world_size} ranks leaves nothing to train on.")
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        if lengths is not None and len(lengths) != num_items:
            raise ValueError(f"{len(lengths)} lengths for {num_items} items.")
        self.lengths, self.group_size = lengths, max(1, group_size)
        self.epoch = 0
        self.position = 0  # items of this epoch this rank has yielded (or, after a restore, consumed)

    @property
    def num_samples(self) -> int:
        """Items per rank per epoch."""
        if self.drop_last:
            return self.num_items // self.world_size
        return math.ceil(self.num_items / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; a new epoch starts at position 0, the current one keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, from the start."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.world_size
        while len(order) < total:  # wrap around: the few repeats keep every rank in step
            order += order[: total - len(order)]
        order = order[:total]
        if self.lengths is not None:
            order = self._grouped(order, np.random.default_rng([self.seed, epoch, 1]))
        return order[self.rank::self.world_size]

    def _grouped(self, order: list[int], rng: np.random.Generator) -> list[int]:
        """``order`` regrouped so each global micro-batch holds items of similar length (class docstring)."""
        per_step = self.group_size * self.world_size
        window = per_step * self.GROUP_WINDOW
        out: list[int] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            steps = [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
            full = [s for s in steps if len(s) == per_step]  # a short last step stays last: ranks stay in step
            for k in rng.permutation(len(full)):
                out += full[k]
            out += [i for s in steps if len(s) < per_step for i in s]
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.position >= self.num_samples:  # a finished epoch iterated again starts over
            self.position = 0
        order = self.epoch_order(self.epoch)
        while self.position < self.num_samples:
            index = order[self.position]
            self.position += 1
            yield self.epoch, index

    def __len__(self) -> int:
        return self.num_samples - (self.position if self.position < self.num_samples else 0)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this rank stands. DataLoader prefetching runs the sampler ahead of training, so pass
        ``consumed`` (items of this epoch the model has actually seen on this rank) for an exact resume."""
        return {"epoch": self.epoch, "position": self.position if consumed is None else consumed,
                "seed": self.seed, "num_items": self.num_items, "world_size": self.world_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last,
                "group_size": self.group_size if self.lengths is not None else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; the next iteration yields exactly what the saved run would have yielded next."""
        for name in ("seed", "num_items", "world_size", "shuffle", "drop_last"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the sampler: it was saved with {name}={state[name]!r}, this run has "
                    f"{name}={getattr(self, name)!r}. Resume with the same data, seed and number of ranks, "
                    "or start from a fresh epoch."
                )
        grouped = self.group_size if self.lengths is not None else 0
        if state.get("group_size", 0) != grouped:
            raise ValueError(f"cannot resume the sampler: it was saved with length grouping of micro-batches of "
                             f"{state.get('group_size', 0)} (0: off), this run has {grouped}. Resume with the same "
                             "group_by_length and batch.micro_size, or start from a fresh epoch.")
        if not 0 <= state["position"] <= self.num_samples:
            raise ValueError(f"saved sampler position {state['position']} is outside 0..{self.num_samples}.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
