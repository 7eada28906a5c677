"""The SFT loss with the LM head run only where a target is: the answer tokens, not every position.

A 7B chat LM's head is a 4096 x 152k-168k matrix: over every position of an 800-token audio prompt its
logits are ~0.25 GB per question in bf16 (twice that in the fp32 loss) and ~1 TFLOP forward and backward,
for a loss that reads a handful of positions. Selecting the positions first gives the same loss and
gradients (``tests/sft/test_sft.py``).

Shapes: B rows, T positions, H hidden, n target positions in the batch, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


def target_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE: hidden ``[B, T, H]``, input-aligned labels ``[B, T]`` (``-100``: no target) -> scalar.

    Position t predicts ``labels[t + 1]``; the head runs on the ``n`` positions with a target only.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    if not bool(keep.any()):
        raise ValueError("the batch has no targets (all labels are -100); nothing to train on.")
    logits = head(hidden[:, :-1][keep])  # [n, V]
    return F.cross_entropy(logits.float(), targets[keep])
