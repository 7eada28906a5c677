"""GRPO rollouts: G completions per question from the policy, their rewards and group advantages,
and the reference / old-policy log-probs scored once per round.

Shapes: B questions, G completions, T completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from aqa.backbones.base import Backbone, Rollout
from aqa.data.example import Example
from aqa.grpo.config import GRPOSection
from aqa.grpo.engines import RolloutEngine
from aqa.grpo.policy import reference
from aqa.rl.advantages import Advantages, group_advantages
from aqa.rl.rewards import compute_rewards
from aqa.runtime import distributed


# -- rollouts -----------------------------------------------------------------------------------------
@dataclass
class Group:
    """One micro-batch's rollouts with everything its loss needs."""

    rollout: Rollout
    rewards: torch.Tensor  # [B, G] weighted total
    parts: dict[str, torch.Tensor]  # reward name -> [B, G] unweighted
    adv: Advantages  # [B, G] values + global statistics
    ref_logp: torch.Tensor | None = None  # [B, G, T] reference (None when beta == 0)
    old_logp: torch.Tensor | None = None  # [B, G, T] the sampling policy (num_iterations > 1)

    def rows(self, start: int, end: int) -> Group:
        """Questions ``[start, end)`` with their rewards, advantages and scored log-probs (the statistics over
        every rank stay whole: they are the round's, not the chunk's)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:end]

        return Group(self.rollout.rows(start, end), self.rewards[start:end],
                     {k: v[start:end] for k, v in self.parts.items()},
                     replace(self.adv, values=self.adv.values[start:end], zero_std=self.adv.zero_std[start:end]),
                     cut(self.ref_logp), cut(self.old_logp))

    def split(self, parts: int) -> list[tuple[Group, float]]:
        """The group as exactly ``parts`` consecutive chunks (one DeepSpeed micro-batch each), each with the
        weight that makes the mean over the parts of weight x chunk loss the group's loss: its share of the
        questions times ``parts`` (1 for equal chunks). The count never changes, so DeepSpeed's accumulation
        boundary stays where the recipe puts it even for an epoch's short last micro-batch: its chunks are
        uneven, and a chunk left without a question repeats the first one with weight 0."""
        n = len(self.rollout.examples)
        if parts == 1:
            return [(self, 1.0)]
        bounds = [(i * n) // parts for i in range(parts + 1)]
        return [(self.rows(a, b), (b - a) * parts / n) if b > a else (self.rows(0, 1), 0.0)
                for a, b in zip(bounds, bounds[1:])]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[B, G]`` along dim 0 -> ``[W*B, G]`` (the gather ``group_advantages`` takes)."""
    gathered = distributed.all_gather_tensor(tensor)  # [W, B, G]
    return gathered.reshape(-1, *tensor.shape[1:])


def sample_group(backbone: Backbone, model: nn.Module, examples: list[Example], cfg: GRPOSection,
                 engine: RolloutEngine) -> Group:
    """G completions per question from ``engine``, their rewards and group advantages (rewards gathered over
    ranks). Every rank must call it (the advantages' gather is a collective)."""
    rollout = engine.generate(backbone, model, examples, cfg.num_generations, cfg.sampling)
    rewards, parts = compute_rewards(rollout.texts, examples, cfg.rewards)
    adv = group_advantages(rewards, cfg.advantage_eps, gather=gather_rows, rank=distributed.rank())
    return Group(rollout, rewards, parts, adv)


@torch.no_grad()
def score_groups(backbone: Backbone, model: nn.Module, groups: list[Group], cfg: GRPOSection,
                 frozen_ref: nn.Module | None = None, parts: int = 1) -> None:
    """Fill each group's reference log-probs (adapter off, or ``frozen_ref`` for a full fine-tune) and, for
    ``num_iterations > 1``, the sampling policy's, both computed once per round before any update, one forward
    pass per chunk of :meth:`Group.split` into ``parts`` (the chunks the update trains on)."""

    def scored(scorer: nn.Module, group: Group) -> torch.Tensor:  # [B, G, T]
        return torch.cat([backbone.completion_logprobs(scorer, part.rollout)
                          for part, weight in group.split(parts) if weight > 0])

    for group in groups:
        if cfg.beta > 0:
            with reference(model, frozen_ref) as ref:
                group.ref_logp = scored(ref, group)
        if cfg.num_iterations > 1:
            group.old_logp = scored(model, group)


def is_noop_round(groups: list[Group]) -> bool:
    """True when every group of every micro-batch on every rank has equal rewards: nothing to learn.

    ``zero_std_frac`` is computed over the gathered rewards, so every rank reaches the same answer.
    """
    return all(g.adv.zero_std_frac == 1.0 for g in groups)
