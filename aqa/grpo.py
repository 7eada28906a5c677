"""GRPO, the library half: the config, rollout groups, the no-op rule, the per-micro-batch loss and the
round statistics. ``train/grpo.py`` strings them together; the math is in ``aqa/rl/`` and the
shared-prefix machinery behind ``backbone.generate`` / ``backbone.completion_logprobs``.

Vocabulary: a *micro-batch* is ``batch.per_device`` questions on one rank, each with G sampled
completions (a *group*). A *round* is ``batch.gradient_accumulation`` micro-batches sampled with the
current policy; it is trained on ``grpo.num_iterations`` times, one optimizer step each, so a run
takes ``rounds * num_iterations`` steps. Shapes: B questions, G completions, T completion tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

from aqa import distributed
from aqa.backbones.base import Backbone, Rollout, SamplingConfig
from aqa.config import ConfigError, load_config
from aqa.data.augment import AugmentConfig
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig
from aqa.grpo_policy import reference
from aqa.lora import LoraConfig
from aqa.rl.advantages import Advantages, group_advantages
from aqa.rl.loss import LossStats, grpo_loss
from aqa.rl.rewards import check_weights, compute_rewards
from aqa.sft import BatchConfig, CheckpointConfig, EvalConfig, LogConfig, OptimConfig


@dataclass
class GRPOSection:
    """The algorithm's own settings (the ``grpo:`` section)."""

    num_generations: int = 6  # G completions per question
    epsilon: float = 0.2  # clip range of the importance ratio
    beta: float = 0.1  # weight of the k3 KL to the reference (the SFT model)
    num_iterations: int = 1  # optimizer steps per round of rollouts (>1 uses old-policy log-probs)
    advantage_eps: float = 1e-4  # (r - mean) / (std + eps)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})  # name -> weight
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class GRPOBatchConfig:
    per_device: int = 8  # questions per rank per micro-batch (each sampled G times)
    gradient_accumulation: int = 5  # micro-batches per optimizer step


@dataclass
class GRPOConfig:
    """The ``train/grpo.py`` config. Sections shared with SFT have the same meaning there."""

    model_path: str  # the base model directory SFT was trained on
    sft_adapter: str  # <sft output_dir>/adapter: the starting policy and the reference
    data_dir: str
    output_dir: str
    backbone: str = "qwen2_audio"
    train_split: str = "train"
    dev_split: str | None = "dev"
    cache_dir: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    num_workers: int = 0
    nonfinite_loss: Literal["skip", "stop"] = "skip"  # as in SFT: skip the step and count it, or stop
    max_nonfinite: int | None = None
    progress: bool = True
    grpo: GRPOSection = field(default_factory=GRPOSection)
    batch: GRPOBatchConfig = field(default_factory=GRPOBatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        g = self.grpo
        checks = {
            "grpo.num_generations": (g.num_generations >= 2, "at least 2: advantages compare completions"),
            "grpo.num_iterations": (g.num_iterations >= 1, ">= 1"),
            "grpo.epsilon": (0 < g.epsilon < 1, "in (0, 1)"),
            "grpo.beta": (g.beta >= 0, ">= 0"),
            "grpo.advantage_eps": (g.advantage_eps >= 0, ">= 0"),
            "grpo.sampling.temperature": (g.sampling.temperature > 0, "> 0"),
            "grpo.sampling.top_p": (0 < g.sampling.top_p <= 1, "in (0, 1]"),
            "grpo.sampling.max_new_tokens": (g.sampling.max_new_tokens >= 1, ">= 1"),
            "batch.per_device": (self.batch.per_device >= 1, ">= 1"),
            "batch.gradient_accumulation": (self.batch.gradient_accumulation >= 1, ">= 1"),
            "optim.lr": (self.optim.lr > 0, "> 0"),
            "max_steps": (self.max_steps is None or self.max_steps >= 1, ">= 1 or null"),
            "epochs": (self.max_steps is not None or self.epochs > 0, "> 0 when max_steps is null"),
        }
        for key, (ok, need) in checks.items():
            if not ok:
                raise ConfigError(f"'{key}' must be {need}.")
        try:
            check_weights(g.rewards)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.augment.spec_augment.active:
            raise ConfigError("augment.spec_augment is for SFT; GRPO samples from the clean audio. Set its p to 0.")


def load_grpo_config(path: str | Path | None, overrides: list[str] | None = None) -> GRPOConfig:
    return load_config(GRPOConfig, path, overrides)


def deepspeed_view(cfg: GRPOConfig, world_size: int) -> Any:
    """What ``aqa.sft.deepspeed_config`` reads (``batch``, ``optim``), in GRPO's batch geometry: DeepSpeed
    accumulates ``gradient_accumulation`` micro-batches of ``per_device`` questions per step."""
    per_device, accumulation = cfg.batch.per_device, cfg.batch.gradient_accumulation
    return SimpleNamespace(batch=BatchConfig(global_size=per_device * accumulation * world_size,
                                             micro_size=per_device), optim=cfg.optim)


def total_rounds(cfg: GRPOConfig, micro_per_epoch: int) -> int:
    """Rounds of rollouts the run samples: from ``max_steps`` (optimizer steps), else from ``epochs``."""
    if cfg.max_steps is not None:
        return math.ceil(cfg.max_steps / cfg.grpo.num_iterations)
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.batch.gradient_accumulation))


def crossed(step: int, advanced: int, every: int) -> bool:
    """True when the last ``advanced`` steps (ending at ``step``) passed a multiple of ``every`` (0: never).
    A round advances ``num_iterations`` steps at once, so ``step % every == 0`` could jump over it."""
    return every > 0 and (step - advanced) // every < step // every


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


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[B, G]`` along dim 0 -> ``[W*B, G]`` (the gather ``group_advantages`` takes)."""
    gathered = distributed.all_gather_tensor(tensor)  # [W, B, G]
    return gathered.reshape(-1, *tensor.shape[1:])


def sample_group(backbone: Backbone, model: nn.Module, examples: list[Example], cfg: GRPOSection) -> Group:
    """G completions per question, their rewards and group advantages (rewards gathered over ranks).
    Every rank must call it (the advantages' gather is a collective)."""
    rollout = backbone.generate(model, examples, cfg.num_generations, cfg.sampling)
    rewards, parts = compute_rewards(rollout.texts, examples, cfg.rewards)
    adv = group_advantages(rewards, cfg.advantage_eps, gather=gather_rows, rank=distributed.rank())
    return Group(rollout, rewards, parts, adv)


def is_noop_round(groups: list[Group]) -> bool:
    """True when every group of every micro-batch on every rank has equal rewards: nothing to learn.

    ``zero_std_frac`` is computed over the gathered rewards, so every rank reaches the same answer.
    """
    return all(g.adv.zero_std_frac == 1.0 for g in groups)


@torch.no_grad()
def score_groups(backbone: Backbone, model: nn.Module, groups: list[Group], cfg: GRPOSection) -> None:
    """Fill each group's reference log-probs (adapter off) and, for ``num_iterations > 1``, the sampling
    policy's, both computed once per round before any update."""
    for group in groups:
        if cfg.beta > 0:
            with reference(model):
                group.ref_logp = backbone.completion_logprobs(model, group.rollout)
        if cfg.num_iterations > 1:
            group.old_logp = backbone.completion_logprobs(model, group.rollout)


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
    rewards = torch.cat([gather_rows(g.rewards) for g in groups])  # [W*B*A, G]
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
