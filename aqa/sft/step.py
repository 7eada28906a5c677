"""One SFT optimizer step: ``accumulation`` micro-batches forward and backward, then DeepSpeed's step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from aqa.data.example import Example
from aqa.runtime.checkpoint import TrainState
from aqa.runtime.loaders import move_batch
from aqa.runtime.nonfinite import check_loss


# -- one optimizer step --------------------------------------------------------------------------------------
@dataclass
class StepStats:
    loss_sum: float = 0.0  # sum of the finite micro-batch losses on this rank
    finite: int = 0  # how many micro-batches that is
    nonfinite: int = 0  # micro-batches whose loss was NaN/inf on some rank (the step was skipped)
    skipped: bool = False  # DeepSpeed did not apply this step


def optimizer_step(engine: Any, backbone: Any, stream: Iterator[list[Example]], accumulation: int,
                   state: TrainState, policy: str, max_nonfinite: int | None, device: torch.device,
                   dtype: torch.dtype) -> StepStats:
    """``accumulation`` micro-batches forward and backward, then DeepSpeed's optimizer step; every rank calls it.

    A micro-batch whose loss is non-finite on any rank is counted in ``state.nonfinite_steps`` (or stops
    the run, per ``policy``); its NaN gradients make DeepSpeed's overflow check skip the whole step (no
    weight, optimizer-moment or schedule update), which is verified here rather than trusted.
    """
    stats = StepStats()
    skipped_before = engine.skipped_steps
    for _ in range(accumulation):
        examples = next(stream)
        batch = move_batch(backbone.collate(examples), device, dtype)  # input_ids [B, T], input_features [B, M, F]
        loss = backbone.loss(engine, batch)  # mean cross-entropy over the answer tokens only
        if check_loss(loss, [e.id for e in examples], policy, state.nonfinite_steps, max_nonfinite,
                      engine.global_steps):
            state.nonfinite_steps += 1
            stats.nonfinite += 1
        else:
            stats.loss_sum += float(loss.item())
            stats.finite += 1
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update on the last micro-batch of the window
    stats.skipped = engine.skipped_steps > skipped_before
    if stats.nonfinite and not stats.skipped:
        raise RuntimeError("DeepSpeed applied a step with non-finite gradients; enable its overflow check "
                           "(bf16.check_grad_overflow: true) in the DeepSpeed config.")
    return stats
