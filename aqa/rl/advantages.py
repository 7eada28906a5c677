"""Group-relative advantages: each completion's reward against the other completions of its question.

Pure tensor functions. Distributed training passes its all-gather in, so this module never touches
``torch.distributed`` and is tested on hand-worked values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Advantages:
    """This rank's advantages plus statistics over the whole (gathered) batch, for logging."""

    values: torch.Tensor  # [B, G] this rank's questions
    zero_std: torch.Tensor  # [B] bool: this rank's groups whose rewards are all equal
    gathered: torch.Tensor  # [W*B, G] float: every rank's rewards, gathered once and kept for the statistics
    zero_std_frac: float  # fraction of groups, over every rank, with all rewards equal

    @property
    def reward_mean(self) -> float:
        """Over every completion of every rank."""
        return float(self.gathered.mean())

    @property
    def reward_std(self) -> float:
        """Std of all completions' rewards (not per group)."""
        return float(self.gathered.std()) if self.gathered.numel() > 1 else 0.0


def group_advantages(
    rewards: torch.Tensor, eps: float, gather: Gather | None = None, rank: int = 0
) -> Advantages:
    """``(r - mean_g) / (std_g + eps)`` per question, with rewards gathered across ranks first.

    ``rewards``: ``[B, G]``, G completions of each of this rank's B questions. ``gather`` concatenates
    a ``[B, G]`` tensor from every rank along dim 0 (rank order, same B on every rank), giving
    ``[W*B, G]``; this rank's rows are ``rank*B:(rank+1)*B``. Groups never span ranks here, but the
    gather makes the logged statistics global and keeps the contract if they ever do.

    The group std is the unbiased one (as in TRL's and r1-aqa's GRPO). A group whose rewards are all
    equal carries no signal: its advantage is exactly 0, never NaN (also for eps = 0).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}.")
    if rewards.shape[1] < 2:
        raise ValueError("GRPO needs at least 2 completions per question (num_generations >= 2).")
    local_b = rewards.shape[0]
    everything = gather(rewards) if gather is not None else rewards
    everything = everything.float()
    mean = everything.mean(dim=1, keepdim=True)  # [W*B, 1]
    std = everything.std(dim=1, keepdim=True)  # [W*B, 1]
    # Exact equality, not std < tol: equal rewards are a property of the group, not of rounding.
    zero = everything.amax(dim=1) == everything.amin(dim=1)  # [W*B]
    adv = (everything - mean) / (std + eps)
    adv = torch.where(zero.unsqueeze(1), torch.zeros_like(adv), adv)
    rows = slice(rank * local_b, (rank + 1) * local_b)
    return Advantages(
        values=adv[rows].to(rewards.dtype if rewards.is_floating_point() else torch.float32),
        zero_std=zero[rows],
        gathered=everything,
        zero_std_frac=float(zero.float().mean()),
    )
