"""The ``train/grpo.py`` config, its round/step counts and the logging cadence of rounds.

Vocabulary: a *micro-batch* is ``batch.per_device`` questions on one rank, each with G sampled
completions (a *group*). A *round* is ``batch.gradient_accumulation`` micro-batches sampled with the
current policy; it is trained on ``grpo.num_iterations`` times, one optimizer step each, so a run
takes ``rounds * num_iterations`` steps. Shapes: B questions, G completions, T completion tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from aqa.backbones.base import SamplingConfig
from aqa.config import ConfigError, load_config
from aqa.rl.rewards import check_weights
from aqa.runtime.sections import (
    BatchConfig,
)
from aqa.sft.config import QATrainSettings, check_finetune

ROLLOUT_ENGINES = ("static", "eager")  # the engines of aqa/grpo/engines.py


@dataclass
class RolloutConfig:
    """Which engine samples the rollouts (``aqa/grpo/engines.py``)."""

    engine: str = "static"  # static: one cache row per question, one step for all G, sort-free sampling; eager: the reference loop
    cuda_graph: bool = True  # static engine on a CUDA device: capture the decode step as a CUDA graph (no effect on CPU)
    # static engine: sample through merged copies W + scaling*BA of the LoRA'd weights, refreshed in place before each
    # rollout (one matmul per LoRA'd linear instead of the base matmul and the LoRA branch's small kernels). The base
    # and LoRA weights are only read, so the loss's log-probs are unchanged; rollouts sample from the policy to within
    # the rounding of one addition. Costs one more copy of the LoRA'd weights: ~13 GB bf16 for Qwen2-Audio-7B's LM.
    # finetune=lora only
    merge_lora: bool = False


@dataclass
class GRPOSection:
    """The algorithm's own settings (the ``grpo:`` section)."""

    num_generations: int = 6  # G completions per question
    epsilon: float = 0.2  # clip range of the importance ratio
    beta: float = 0.1  # weight of the k3 KL to the reference (the SFT model; with finetune=full a frozen copy of it)
    num_iterations: int = 1  # optimizer steps per round of rollouts (>1 uses old-policy log-probs)
    advantage_eps: float = 1e-4  # (r - mean) / (std + eps)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})  # name -> weight
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class GRPOBatchConfig:
    """GRPO's batch: questions per rank per micro-batch, and micro-batches per optimizer step."""

    per_device: int = 8  # questions per rank per micro-batch (each sampled G times)
    gradient_accumulation: int = 5  # micro-batches per optimizer step
    # questions per forward/backward of the loss and of the reference scoring: a micro-batch is sampled at once,
    # then trained on in chunks of this many questions. The loss is a mean over questions, so the gradient is the
    # same; the memory of the policy pass (activations of the prompts, their KV expanded to G) is a chunk's.
    # Divides per_device; null: the whole micro-batch in one pass
    update_chunk: int | None = None


@dataclass(kw_only=True)
class GRPOConfig(QATrainSettings):
    """The ``train/grpo.py`` config. Sections shared with SFT have the same meaning there."""

    # <sft output_dir>/adapter: the starting policy and the reference, folded into model_path's weights. Needed for
    # finetune=lora; with finetune=full, null when model_path is already the SFT model (<sft output_dir>/model)
    sft_adapter: str | None = None
    grpo: GRPOSection = field(default_factory=GRPOSection)
    batch: GRPOBatchConfig = field(default_factory=GRPOBatchConfig)

    def __post_init__(self) -> None:
        check_finetune(self)
        if self.finetune == "lora" and not self.sft_adapter:
            raise ConfigError("finetune=lora starts GRPO from an SFT adapter: set sft_adapter=<sft output_dir>/adapter "
                              "(or finetune=full with model_path=<sft output_dir>/model).")
        g = self.grpo
        checks = {
            "grpo.num_generations": (g.num_generations >= 2, "at least 2: advantages compare completions"),
            "grpo.num_iterations": (g.num_iterations >= 1, ">= 1"),
            "grpo.epsilon": (0 < g.epsilon < 1, "in (0, 1)"),
            "grpo.beta": (g.beta >= 0, ">= 0"),
            "grpo.advantage_eps": (g.advantage_eps >= 0, ">= 0"),
            "grpo.sampling.temperature": (g.sampling.temperature > 0, "> 0"),
            "grpo.sampling.top_p": (0 < g.sampling.top_p <= 1, "in (0, 1]"),
            "grpo.sampling.top_k": (g.sampling.top_k >= 0, ">= 0 (0: off)"),
            "grpo.sampling.max_new_tokens": (g.sampling.max_new_tokens >= 1, ">= 1"),
            "grpo.rollout.engine": (g.rollout.engine in ROLLOUT_ENGINES, f"one of {', '.join(ROLLOUT_ENGINES)}"),
            "grpo.rollout.merge_lora": (not g.rollout.merge_lora or (g.rollout.engine == "static"
                                                                     and self.finetune == "lora"),
                                        "false unless grpo.rollout.engine=static and finetune=lora (it merges the "
                                        "LoRA adapter for the static engine's rollouts; a full fine-tune has none)"),
            "batch.per_device": (self.batch.per_device >= 1, ">= 1"),
            "batch.gradient_accumulation": (self.batch.gradient_accumulation >= 1, ">= 1"),
            "batch.update_chunk": (self.batch.update_chunk is None or (
                self.batch.update_chunk >= 1 and self.batch.per_device % self.batch.update_chunk == 0),
                f"null or a divisor of batch.per_device ({self.batch.per_device}): every chunk must hold as many "
                "questions, so that the chunks' mean loss is the micro-batch's"),
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


def update_chunk(cfg: GRPOConfig) -> int:
    """Questions per forward/backward of the loss: ``batch.update_chunk``, or the whole micro-batch."""
    return cfg.batch.update_chunk or cfg.batch.per_device


def chunks_per_micro_batch(cfg: GRPOConfig) -> int:
    """DeepSpeed micro-batches per micro-batch of questions: ``per_device / update_chunk`` (1 unchunked)."""
    return cfg.batch.per_device // update_chunk(cfg)


def engine_batch(cfg: GRPOConfig, world_size: int) -> BatchConfig:
    """GRPO's batch geometry as the engine's ``BatchConfig``: DeepSpeed accumulates ``gradient_accumulation``
    micro-batches of ``per_device`` questions per step, each trained on in chunks of :func:`update_chunk`
    questions (each chunk is one of DeepSpeed's micro-batches, its loss scaled by their count)."""
    per_device, accumulation = cfg.batch.per_device, cfg.batch.gradient_accumulation
    return BatchConfig(global_size=per_device * accumulation * world_size, micro_size=update_chunk(cfg))


def total_steps(cfg: GRPOConfig, micro_per_epoch: int) -> int:
    """Optimizer steps the run takes: exactly ``max_steps`` when set (the last round then trains on fewer
    than ``num_iterations`` passes), else ``num_iterations`` per round for ``epochs``."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return total_rounds(cfg, micro_per_epoch) * cfg.grpo.num_iterations


def total_rounds(cfg: GRPOConfig, micro_per_epoch: int) -> int:
    """Rounds of rollouts the run samples: from ``max_steps`` (optimizer steps), else from ``epochs``."""
    if cfg.max_steps is not None:
        return math.ceil(cfg.max_steps / cfg.grpo.num_iterations)
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.batch.gradient_accumulation))
