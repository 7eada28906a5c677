"""The non-finite-loss policy shared by every trainer: agree across ranks, skip and count, or stop
naming the batch.
"""

from __future__ import annotations

from typing import Any

import torch

from aqa.errors import UserError
from aqa.runtime import distributed


# -- non-finite losses -----------------------------------------------------------------------------------
class NonFiniteLoss(UserError, RuntimeError):
    """A NaN/inf loss with ``nonfinite_loss: stop`` (or too many of them); names the batch's question ids."""


def check_loss(loss: torch.Tensor, ids: list[str], policy: str, seen: int, limit: int | None,
               step: int) -> bool:
    """Agree across ranks whether this micro-batch's loss is non-finite anywhere; every rank must call it.

    Returns True when it is (the caller counts it and lets the step be skipped). Raises
    :class:`NonFiniteLoss` with the ids of the batch on every rank when ``policy`` is ``stop``, or when
    ``seen`` + 1 exceeds ``limit``.
    """
    local_bad = not bool(torch.isfinite(loss.detach()).all())
    if not distributed.any_rank(local_bad):
        return False
    flags = distributed.all_gather_tensor(torch.tensor([int(local_bad)]))[:, 0].tolist()
    gathered = distributed.all_gather_strings(ids)
    bad_ids = [i for flag, rank_ids in zip(flags, gathered) if flag for i in rank_ids]
    if policy == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {step + 1} on the batch {bad_ids}. Check these questions' "
                            "audio and features, or set nonfinite_loss=skip to skip such steps.")
    if limit is not None and seen + 1 > limit:
        raise NonFiniteLoss(f"{seen + 1} micro-batches had a non-finite loss (max_nonfinite={limit}); the last one "
                            f"at step {step + 1} held {bad_ids}. The run has diverged: lower optim.lr.")
    return True


def confirm_skipped(engine: Any, skipped_before: int, nonfinite: int) -> bool:
    """After an optimizer step whose window held ``nonfinite`` non-finite micro-batches: check that DeepSpeed
    really skipped it (its overflow check saw the NaN gradients), rather than trusting it. Returns whether
    the step was skipped."""
    skipped = engine.skipped_steps > skipped_before
    if nonfinite and not skipped:
        raise RuntimeError("DeepSpeed applied a step with non-finite gradients; enable its overflow check "
                           "(bf16.check_grad_overflow: true) in the DeepSpeed config.")
    return skipped
