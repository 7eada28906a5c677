"""Micro-batches for training: the loader, the stream that resumes mid-epoch, and moving a batch to
the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from aqa.data.dataset import ShardedSampler
from aqa.data.example import Example
from aqa.runtime.checkpoint import TrainState


# -- data ------------------------------------------------------------------------------------------------
def train_loader(dataset, sampler: ShardedSampler, micro_size: int, num_workers: int, collate_fn) -> DataLoader:
    """Micro-batches in sampler order. The loader gets its own generator: left to itself it draws a seed
    from the global torch RNG each time it starts an epoch, which a resumed run would draw at another
    moment than an uninterrupted one (and dropout would no longer match)."""
    return DataLoader(dataset, batch_size=micro_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(0),
                      persistent_workers=num_workers > 0)


def micro_batches(loader: DataLoader, sampler: ShardedSampler, state: TrainState) -> Iterator[list[Example]]:
    """Endless micro-batches from ``state.epoch`` / ``state.consumed`` on, epoch after epoch.

    ``state.epoch`` and ``state.consumed`` always describe what has been yielded, so a checkpoint taken
    between two micro-batches resumes exactly at the next one.
    """
    sampler.load_state_dict({**sampler.state_dict(), "epoch": state.epoch,
                             "position": min(state.consumed, sampler.num_samples)})
    while True:
        if state.consumed >= sampler.num_samples:  # saved exactly at an epoch's end
            state.epoch, state.consumed = state.epoch + 1, 0
            sampler.set_epoch(state.epoch)
        for examples in loader:
            state.consumed += len(examples)
            yield examples
        state.epoch, state.consumed = state.epoch + 1, 0
        sampler.set_epoch(state.epoch)


def micro_batches_per_epoch(sampler: ShardedSampler, micro_size: int) -> int:
    """Micro-batches each rank runs per epoch (the last one may be short)."""
    return math.ceil(sampler.num_samples / micro_size)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor to ``device``; floating ones (audio features) also to the model's ``dtype``."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
            for k, v in batch.items()}
