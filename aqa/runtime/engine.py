"""The training engine every trainer shares: seeding, precision, the DeepSpeed JSON filled from the
recipe config, AdamW with a warmup + cosine schedule, and the DeepSpeed engine over them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from aqa.config import ConfigError
from aqa.runtime.sections import BatchConfig, OptimConfig


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


def total_steps(cfg: Any, micro_per_epoch: int, accumulation: int) -> int:
    """``cfg.max_steps`` if set, else enough optimizer steps for ``epochs`` passes over the data
    (any recipe config with ``max_steps`` and ``epochs``)."""
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
    # fused: one kernel for every tensor's update on CUDA (the same math); CPU keeps the default loop
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=all(p.is_cuda for p in params) or None)
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


def deepspeed_config(path: str | Path, batch: BatchConfig, optim: OptimConfig, world_size: int,
                     precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON with every ``"auto"`` filled from the recipe config (batch sizes, clipping, bf16)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config {path} does not exist; use configs/deepspeed/zero2.json.")
    ds = json.loads(path.read_text(encoding="utf-8"))
    accumulation = accumulation_steps(batch.global_size, batch.micro_size, world_size)
    fill = {
        "train_batch_size": batch.global_size,
        "train_micro_batch_size_per_gpu": batch.micro_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optim.grad_clip,
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


def build_engine(model: nn.Module, ds_path: str | Path, batch: BatchConfig, optim: OptimConfig, world_size: int,
                 precision: str, total: int):
    """The DeepSpeed engine over ``model`` with AdamW and the warmup + cosine schedule.

    Returns ``(engine, scheduler, ds_config)``; the engine reads checkpoints with weights-only loading.
    """
    import deepspeed

    from aqa.runtime.checkpoint import install_safe_loading

    ds_config = deepspeed_config(ds_path, batch, optim, world_size, precision)
    optimizer, scheduler = build_optimizer(model, optim, total)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    install_safe_loading(engine)
    return engine, scheduler, ds_config


# -- run setup ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (LoRA init, dropout); data order and augmentation have their own seeds."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
