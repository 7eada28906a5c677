"""Supervised fine-tuning, the library half: the config, the DeepSpeed/optimizer/schedule setup, the
micro-batch stream that resumes mid-epoch, the non-finite-loss policy and dev evaluation.

``train/sft.py`` is the recipe that strings these together; anything here with a branch is tested
on its own. Nothing in this module asks which backbone it has: it talks to the protocol.

Steps: one *step* is one optimizer step over ``batch.global_size`` examples, i.e. ``accumulation``
micro-batches of ``batch.micro_size`` on each of ``world_size`` ranks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from aqa import distributed
from aqa.checkpoint import TrainState
from aqa.config import ConfigError, load_config
from aqa.data.augment import AugmentConfig
from aqa.data.dataset import ShardedSampler
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig
from aqa.lora import LoraConfig


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


@dataclass
class SFTConfig:
    """The ``train/sft.py`` config: top-level run settings plus one section per concern."""

    model_path: str  # HF model directory (tiny or 7B)
    data_dir: str  # manifest directory with <split>.jsonl and dataset.json
    output_dir: str  # the run dir
    backbone: str = "qwen2_audio"
    train_split: str = "train"
    dev_split: str | None = "dev"  # None: no evaluation
    cache_dir: str | None = None  # feature cache (None: <output_dir>/feature_cache)
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    num_workers: int = 0  # DataLoader workers per rank
    nonfinite_loss: Literal["skip", "stop"] = "skip"  # skip the step and count it, or stop with the batch's ids
    max_nonfinite: int | None = None  # stop anyway once this many micro-batches were non-finite
    progress: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
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


# -- batch geometry and schedule -----------------------------------------------------------------------
def accumulation_steps(global_size: int, micro_size: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step; the global batch must split evenly."""
    per_pass = micro_size * world_size
    if global_size % per_pass:
        raise ConfigError(
            f"batch.global_size={global_size} is not a multiple of batch.micro_size x ranks = {micro_size} x "
            f"{world_size} = {per_pass}. Choose a global size divisible by {per_pass} or change micro_size."
        )
    return global_size // per_pass


def micro_batches_per_epoch(sampler: ShardedSampler, micro_size: int) -> int:
    """Micro-batches each rank runs per epoch (the last one may be short)."""
    return math.ceil(sampler.num_samples / micro_size)


def total_steps(cfg: SFTConfig, micro_per_epoch: int, accumulation: int) -> int:
    """``max_steps`` if set, else enough optimizer steps for ``epochs`` passes over the data."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / accumulation))


def warmup_steps(cfg: OptimConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (steps already taken): linear from 1/(warmup+1) up to 1 over ``warmup``
    steps, then a half cosine from 1 down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, total: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW over the parameters that require grad, and its warmup + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: LoRA was not applied (check the lora section).")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    warm = warmup_steps(cfg, total)
    scheduler = LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warm, total, cfg.min_lr_ratio))
    return optimizer, scheduler


# -- precision and the DeepSpeed config --------------------------------------------------------------
def resolve_precision(name: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``; ``auto`` is bf16 on a GPU that supports it, fp32 on CPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type != "cuda":
        raise ConfigError("precision=bf16 needs a GPU; on CPU use precision=fp32 (or auto).")
    return name


def model_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def deepspeed_config(path: str | Path, cfg: SFTConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON with every ``"auto"`` filled from the recipe config (batch sizes, clipping, bf16)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config {path} does not exist; use configs/deepspeed/zero2.json.")
    ds = json.loads(path.read_text(encoding="utf-8"))
    accumulation = accumulation_steps(cfg.batch.global_size, cfg.batch.micro_size, world_size)
    fill = {
        "train_batch_size": cfg.batch.global_size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{path} sets {key}={ds[key]} but the recipe needs {value}; write \"auto\" there so "
                              "the recipe config decides.")
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = precision == "bf16"
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{path} defines an optimizer or scheduler; remove them: the recipe's optim section "
                          "builds both, so there is one place for the learning rate.")
    left = [k for k, v in ds.items() if v == "auto"]
    if left:
        raise ConfigError(f"{path} leaves {left} as \"auto\", which the recipe does not fill; give values.")
    return ds


def build_engine(model: nn.Module, cfg: SFTConfig, world_size: int, precision: str, total: int):
    """The DeepSpeed engine over ``model`` with AdamW and the warmup + cosine schedule.

    Returns ``(engine, scheduler, ds_config)``; the engine reads checkpoints with weights-only loading.
    """
    import deepspeed

    from aqa.checkpoint import install_safe_loading

    ds_config = deepspeed_config(cfg.deepspeed_config, cfg, world_size, precision)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    install_safe_loading(engine)
    return engine, scheduler, ds_config


# -- data ------------------------------------------------------------------------------------------------
def train_loader(dataset, sampler: ShardedSampler, micro_size: int, num_workers: int, collate_fn) -> DataLoader:
    """Micro-batches in sampler order. The loader gets its own generator: left to itself it draws a seed
    from the global torch RNG each time it starts an epoch, which a resumed run would draw at another
    moment than an uninterrupted one (and dropout would no longer match)."""
    return DataLoader(dataset, batch_size=micro_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(0),
                      persistent_workers=num_workers > 0)


def micro_batches(loader: DataLoader, sampler: ShardedSampler, state: TrainState) -> Iterator[list[Example]]:
    """Endless micro-batches from ``state.epoch`` / ``state.consumed`` on, epoch after epoch.

    ``state.epoch`` and ``state.consumed`` always describe what has been yielded, so a checkpoint taken
    between two micro-batches resumes exactly at the next one.
    """
    sampler.load_state_dict({**sampler.state_dict(), "epoch": state.epoch,
                             "position": min(state.consumed, sampler.num_samples)})
    while True:
        if state.consumed >= sampler.num_samples:  # saved exactly at an epoch's end
            state.epoch, state.consumed = state.epoch + 1, 0
            sampler.set_epoch(state.epoch)
        for examples in loader:
            state.consumed += len(examples)
            yield examples
        state.epoch, state.consumed = state.epoch + 1, 0
        sampler.set_epoch(state.epoch)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor to ``device``; floating ones (audio features) also to the model's ``dtype``."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, non_blocking=True)
            for k, v in batch.items()}


# -- non-finite losses -----------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
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


# -- one optimizer step --------------------------------------------------------------------------------------
@dataclass
class StepStats:
    loss_sum: float = 0.0  # sum of the finite micro-batch losses on this rank
    finite: int = 0  # how many micro-batches that is
    nonfinite: int = 0  # micro-batches whose loss was NaN/inf on some rank (the step was skipped)
    skipped: bool = False  # DeepSpeed did not apply this step


def optimizer_step(engine: Any, backbone: Any, stream: Iterator[list[Example]], accumulation: int,
                   state: TrainState, policy: str, max_nonfinite: int | None, device: torch.device,
                   dtype: torch.dtype) -> StepStats:
    """``accumulation`` micro-batches forward and backward, then DeepSpeed's optimizer step; every rank calls it.

    A micro-batch whose loss is non-finite on any rank is counted in ``state.nonfinite_steps`` (or stops
    the run, per ``policy``); its NaN gradients make DeepSpeed's overflow check skip the whole step (no
    weight, optimizer-moment or schedule update), which is verified here rather than trusted.
    """
    stats = StepStats()
    skipped_before = engine.skipped_steps
    for _ in range(accumulation):
        examples = next(stream)
        batch = move_batch(backbone.collate(examples), device, dtype)  # input_ids [B, T], input_features [B, M, F]
        loss = backbone.loss(engine, batch)  # mean cross-entropy over the answer tokens only
        if check_loss(loss, [e.id for e in examples], policy, state.nonfinite_steps, max_nonfinite,
                      engine.global_steps):
            state.nonfinite_steps += 1
            stats.nonfinite += 1
        else:
            stats.loss_sum += float(loss.item())
            stats.finite += 1
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update on the last micro-batch of the window
    stats.skipped = engine.skipped_steps > skipped_before
    if stats.nonfinite and not stats.skipped:
        raise RuntimeError("DeepSpeed applied a step with non-finite gradients; enable its overflow check "
                           "(bf16.check_grad_overflow: true) in the DeepSpeed config.")
    return stats


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(backbone: Any, model: nn.Module, dataset, batch_size: int, limit: int | None = None,
             progress: bool = False) -> dict[str, float]:
    """Option-logit accuracy on ``dataset`` (canonical option order), split over ranks and summed.

    Every rank must call it. Returns ``accuracy`` (question-weighted), ``arithmetic_mean`` over parts,
    ``acc_<part>`` per part and ``n``.
    """
    from tqdm.auto import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    parts = sorted({dataset.manifest.records[i].part for i in range(n)})
    mine = list(range(distributed.rank(), n, distributed.world_size()))
    hits = torch.zeros(len(parts), dtype=torch.float64)
    counts = torch.zeros(len(parts), dtype=torch.float64)
    for start in tqdm(range(0, len(mine), batch_size), desc="dev", unit="batch", leave=False,
                      disable=not (progress and distributed.is_main())):
        examples = [dataset[i] for i in mine[start : start + batch_size]]
        logits = backbone.option_logits(model, examples)  # per question [1, N], canonical order
        for ex, row in zip(examples, logits):
            p = parts.index(ex.meta["part"])
            counts[p] += 1
            hits[p] += float(int(row[0].argmax()) == ex.answer_index)
    hits, counts = distributed.all_reduce_sum(hits), distributed.all_reduce_sum(counts)
    per_part = {part: float(hits[i] / counts[i]) for i, part in enumerate(parts) if counts[i] > 0}
    out = {"accuracy": float(hits.sum() / counts.sum()) if counts.sum() else float("nan"),
           "arithmetic_mean": sum(per_part.values()) / len(per_part) if per_part else float("nan"),
           "n": int(counts.sum())}
    out.update({f"acc_{part}": acc for part, acc in per_part.items()})
    return out


# -- run setup ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (LoRA init, dropout); data order and augmentation have their own seeds."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_run_dir(run_dir: str | Path, resume_dir: Path | None, resume: str) -> None:
    """Refuse a fresh start (``resume=none``) in a run dir that holds checkpoints of an earlier run: a later
    ``resume=auto`` would mix the two runs."""
    from aqa.checkpoint import CHECKPOINTS, list_checkpoints

    existing = list_checkpoints(Path(run_dir) / CHECKPOINTS)
    if resume_dir is None and existing and resume != "auto":
        raise ConfigError(f"{run_dir} holds checkpoints of an earlier run ({existing[-1].name}); resume it with "
                          "checkpoint.resume=auto, or pick another output_dir.")


def require_answers(manifest: Any) -> None:
    """SFT trains on answers: a split without them (eval) cannot be the train split."""
    missing = [r.id for r in manifest.records if r.answer is None]
    if missing:
        raise ConfigError(f"{manifest.path} has {len(missing)} questions without an answer (e.g. {missing[0]}); "
                          "train_split must name an answered split such as train.")
