"""The ``train/sft.py`` config and its step count.

Steps: one *step* is one optimizer step over ``batch.global_size`` examples, i.e. ``accumulation``
micro-batches of ``batch.micro_size`` on each of ``world_size`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aqa.backbones.full import FINETUNE_MODES, FullConfig
from aqa.backbones.lora import LoraConfig
from aqa.config import ConfigError, load_config
from aqa.data.augment import AugmentConfig
from aqa.data.prompts import PromptConfig
from aqa.runtime.sections import (
    BatchConfig,
    EvalConfig,
    RunSettings,
)


@dataclass(kw_only=True)
class QATrainSettings(RunSettings):
    """What SFT and GRPO both train on: the model, the question data and the run dir, LoRA, augmentation,
    prompts and dev evaluation."""

    model_path: str  # HF model directory (tiny or 7B)
    data_dir: str  # manifest directory with <split>.jsonl and dataset.json
    output_dir: str  # the run dir
    backbone: str = "qwen2_audio"  # a registered backbone (aqa/backbones/; python -m aqa.tiny -h lists them)
    train_split: str = "train"  # <data_dir>/<train_split>.jsonl is trained on (must have answers)
    dev_split: str | None = "dev"  # dev accuracy is scored on it; None: no evaluation
    cache_dir: str | None = None  # feature cache (None: <output_dir>/feature_cache)
    finetune: str = "lora"  # lora: train LoRA adapters (the lora section; writes adapter/); full: train the weights (the full section; writes model/)
    lora: LoraConfig = field(default_factory=LoraConfig)
    full: FullConfig = field(default_factory=FullConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def check_finetune(cfg: QATrainSettings) -> None:
    """``finetune`` is one of the modes; a run that trains in full sets no LoRA-only key."""
    if cfg.finetune not in FINETUNE_MODES:
        raise ConfigError(f"'finetune' must be one of {', '.join(FINETUNE_MODES)}, got '{cfg.finetune}'.")
    if cfg.finetune == "full" and (cfg.lora.modules_to_save or cfg.lora.include_audio or cfg.lora.targets):
        raise ConfigError("finetune=full trains weights, not LoRA adapters: lora.targets, lora.include_audio and "
                          "lora.modules_to_save do not apply. Use full.include_audio to train the audio side too.")


@dataclass(kw_only=True)
class SFTConfig(QATrainSettings):
    """The ``train/sft.py`` config: top-level run settings plus one section per concern."""

    batch: BatchConfig = field(default_factory=BatchConfig)
    group_by_length: bool = False  # micro-batches of clips of similar length (DCASE: 1-30 s), so short ones are not padded to long ones
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward: less memory for a larger micro-batch, ~1/3 more compute

    def __post_init__(self) -> None:
        check_finetune(self)
        positive = {"batch.global_size": self.batch.global_size, "batch.micro_size": self.batch.micro_size,
                    "eval.batch_size": self.eval.batch_size, "logging.every_steps": self.logging.every_steps}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {value}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"'max_steps' must be >= 1 (or null to use epochs), got {self.max_steps}.")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"'epochs' must be > 0 when max_steps is null, got {self.epochs}.")
        if self.optim.lr <= 0:
            raise ConfigError(f"'optim.lr' must be > 0, got {self.optim.lr}.")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"'optim.betas' must hold two numbers, got {self.optim.betas}.")
        if not 0 <= self.optim.warmup_ratio < 1:
            raise ConfigError(f"'optim.warmup_ratio' must lie in [0, 1), got {self.optim.warmup_ratio}.")
        if self.num_workers < 0:
            raise ConfigError(f"'num_workers' must be >= 0, got {self.num_workers}.")


def load_sft_config(path: str | Path | None, overrides: list[str] | None = None) -> SFTConfig:
    """The YAML at ``path`` with ``key=value`` overrides, checked (unknown keys and bad values fail here)."""
    return load_config(SFTConfig, path, overrides)
