"""Config sections every trainer shares (SFT, GRPO, the SED detector): optimizer, batch, dev
evaluation, checkpoints and logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule after a linear warmup."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.0  # share of the total steps spent warming up
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # global gradient-norm clipping (0: off)


@dataclass
class BatchConfig:
    global_size: int = 32  # examples per optimizer step, all ranks together
    micro_size: int = 1  # examples per rank per forward pass


@dataclass
class EvalConfig:
    every_steps: int = 0  # dev option-logit accuracy every N steps (0: only at the end)
    batch_size: int = 8  # questions per forward pass, per rank
    limit: int | None = None  # score only the first N dev questions (None: all)
    at_end: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # DeepSpeed checkpoint + adapter every N steps (0: only at the end)
    keep_last: int | None = 2  # complete checkpoints kept (None: all)
    resume: str = "auto"  # auto (the latest, or fresh), none, or a checkpoints/step_N directory
    stop_at_step: int | None = None  # end this invocation after this step, as a preempted job would


@dataclass
class LogConfig:
    report_to: list[str] = field(default_factory=list)  # [] or [wandb]
    project: str = "aqa"
    run_name: str | None = None
    every_steps: int = 10
