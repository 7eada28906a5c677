"""Config sections every trainer shares (SFT, GRPO, the SED detector): optimizer, batch, dev
evaluation, checkpoints and logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warmup."""

    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's moment decay rates
    eps: float = 1e-8  # Adam's denominator floor
    warmup_ratio: float = 0.0  # share of the total steps spent warming up
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # global gradient-norm clipping (0: off)


@dataclass
class BatchConfig:
    """The global batch and how each rank splits it into micro-batches (accumulation is derived)."""

    global_size: int = 32  # examples per optimizer step, all ranks together
    micro_size: int = 1  # examples per rank per forward pass


@dataclass
class EvalConfig:
    """Dev accuracy during training (option-letter logits, canonical order)."""

    every_steps: int = 0  # dev option-logit accuracy every N steps (0: only at the end)
    batch_size: int = 8  # questions per forward pass, per rank
    limit: int | None = None  # score only the first N dev questions (None: all)
    at_end: bool = True  # also evaluate after the last step


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints for exact resume."""

    every_steps: int = 0  # DeepSpeed checkpoint + adapter every N steps (0: only at the end)
    keep_last: int | None = 2  # complete checkpoints kept (None: all)
    resume: str = "auto"  # auto (the latest, or fresh), none, or a checkpoints/step_N directory
    stop_at_step: int | None = None  # end this invocation after this step, as a preempted job would


@dataclass
class LogConfig:
    """metrics.jsonl, the console and (optionally) W&B, offline unless WANDB_MODE says otherwise."""

    report_to: list[str] = field(default_factory=list)  # [] or [wandb]
    project: str = "aqa"  # W&B project
    run_name: str | None = None  # W&B run name (None: W&B picks one)
    every_steps: int = 10  # a metrics line every N optimizer steps


@dataclass(kw_only=True)
class RunSettings:
    """What every trainer's config holds besides its model and data: length, seeds, precision, the DeepSpeed
    JSON, loaders, the non-finite policy, the optimizer, checkpoints and logging. Keyword-only, so a recipe
    config declares its own required keys (model, data, output) in any order."""

    epochs: float = 1.0  # passes over the train data (when max_steps is null)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    seed: int = 0  # python/numpy/torch seeds (init, dropout); data order and augmentation derive from it
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # ZeRO JSON; batch sizes and clipping are filled in
    num_workers: int = 0  # DataLoader workers per rank
    nonfinite_loss: Literal["skip", "stop"] = "skip"  # skip the step and count it, or stop with the batch's ids
    max_nonfinite: int | None = 20  # stop once this many micro-batches were non-finite (null: never)
    progress: bool = True  # a progress bar on rank 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LogConfig = field(default_factory=LogConfig)
