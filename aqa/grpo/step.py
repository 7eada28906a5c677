"""The GRPO loss of one micro-batch and the round statistics (over every rank).

Shapes: B questions, G completions, T completion tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from aqa.backbones.base import Backbone
from aqa.grpo.config import GRPOSection
from aqa.grpo.rollout import Group, gather_rows
from aqa.rl.loss import LossStats, grpo_loss
from aqa.runtime import distributed


def group_loss(backbone: Backbone, model: nn.Module, group: Group, cfg: GRPOSection) -> tuple[torch.Tensor, LossStats]:
    """The GRPO loss of one micro-batch under the current policy (with gradients)."""
    logp = backbone.completion_logprobs(model, group.rollout)  # [B, G, T]
    return grpo_loss(logp, group.old_logp, group.ref_logp, group.adv.values, group.rollout.completion_mask,
                     epsilon=cfg.epsilon, beta=cfg.beta)


# -- statistics -----------------------------------------------------------------------------------------
def _global_mean(values: list[float]) -> float:
    """Mean over this rank's values and every other rank's (each rank holds the same count)."""
    local = torch.tensor([sum(values), float(len(values))], dtype=torch.float64)
    total = distributed.all_reduce_sum(local)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    """Reward mean/std, zero-std group fraction, per-reward means and completion length, over all ranks.
    Every rank must call it."""
    rewards = torch.cat([g.adv.gathered for g in groups])  # [W*B*A, G], gathered once by the advantages
    lengths = [float(g.rollout.completion_mask.sum(-1).float().mean()) for g in groups]
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "zero_std_frac": sum(g.adv.zero_std_frac for g in groups) / len(groups),
        "completion_len": _global_mean(lengths),
    }
    for name in groups[0].parts:
        out[f"reward_{name}"] = float(torch.cat([gather_rows(g.parts[name]) for g in groups]).mean())
    return out


def loss_metrics(losses: list[float], stats: list[LossStats]) -> dict[str, float]:
    """Loss, KL and clip fraction averaged over this round's micro-batches and every rank."""
    return {
        "loss": _global_mean(losses),
        "kl": _global_mean([s.kl for s in stats]),
        "clip_frac": _global_mean([s.clip_frac for s in stats]),
    }
