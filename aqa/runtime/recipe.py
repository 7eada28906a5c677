"""What every recipe (``train/sft.py``, ``train/grpo.py``, ``train/sed.py``) does around its own loop:
the entry point, process and run-dir setup, resume, the run files and logger, the loss window of a
log line, the step cadence, and the closing summary. Each recipe reads top to bottom and calls these;
nothing here knows which model it trains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from aqa.config import help_text, load_config, save_config, to_dict
from aqa.errors import UserError
from aqa.runtime import checkpoint as ckpt
from aqa.runtime import distributed
from aqa.runtime.checkpoint import check_run_dir
from aqa.runtime.engine import model_dtype, resolve_precision, seed_everything
from aqa.runtime.logging import RunLogger

C = TypeVar("C")


# -- the entry point ------------------------------------------------------------------------------------------
def recipe_main(doc: str, config_cls: type[C], train: Callable[[C], Any], argv: list[str] | None = None) -> int:
    """Parse ``--config FILE [key=value ...]`` (``--help`` lists every config key), run ``train`` and turn a
    :class:`UserError` (or a missing file) into ``error: ...`` on rank 0 and its exit status."""
    parser = argparse.ArgumentParser(description=doc, epilog=help_text(config_cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML from configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (see the keys below)")
    distributed.add_launcher_args(parser)  # the deepspeed launcher appends --local_rank=N
    args = parser.parse_args(argv)
    try:
        train(load_config(config_cls, args.config, args.overrides))
    except (UserError, FileNotFoundError) as err:
        if distributed.is_main():
            print(f"error: {err}", file=sys.stderr, flush=True)
        distributed.cleanup()
        return getattr(err, "exit_code", 1)
    distributed.cleanup()
    return 0


# -- setup --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One invocation of a recipe: its processes, precision, run dir and the checkpoint it resumes."""

    info: distributed.DistInfo
    precision: str  # "bf16" or "fp32"
    dtype: torch.dtype
    run_dir: Path
    ckpt_root: Path
    resume_dir: Path | None  # None: a fresh start

    @property
    def device(self) -> torch.device:
        return self.info.device


def start_run(cfg: Any) -> Run:
    """Processes (rank and device from the launcher; gloo on CPU, nccl on GPU), CPU threads, seeds, precision,
    and which checkpoint of ``cfg.output_dir`` to resume (``cfg.checkpoint.resume``)."""
    info = distributed.init()
    distributed.set_cpu_threads(info)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision, info.device)
    run_dir = Path(cfg.output_dir)
    ckpt_root = run_dir / ckpt.CHECKPOINTS
    resume_dir = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_root)
    check_run_dir(run_dir, resume_dir, cfg.checkpoint.resume)
    return Run(info, precision, model_dtype(precision), run_dir, ckpt_root, resume_dir)


def resume_state(engine: Any, run: Run) -> ckpt.TrainState:
    """Weights, optimizer, schedule, sampler position and every RNG exactly as saved; or a fresh state."""
    if run.resume_dir is None:
        return ckpt.TrainState(world_size=run.info.world_size)
    state = ckpt.load_checkpoint(engine, run.resume_dir)
    ckpt.restore_rng(state.rng)
    return state


def open_run(cfg: Any, run: Run, state: ckpt.TrainState, ds_config: dict) -> RunLogger:
    """The run's logger (metrics.jsonl, console, W&B), and on rank 0 ``config.yaml`` (the resolved config)
    and ``ds_config.json`` (the DeepSpeed config as filled)."""
    logger = RunLogger(run.run_dir, enabled=run.info.is_main, report_to=cfg.logging.report_to,
                       config=to_dict(cfg), project=cfg.logging.project, run_name=cfg.logging.run_name,
                       resume_step=state.global_step if run.resume_dir is not None else None)
    if run.info.is_main:
        save_config(cfg, run.run_dir / "config.yaml")
        (run.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
    return logger


# -- the loop ----------------------------------------------------------------------------------------------
def crossed(step: int, advanced: int, every: int) -> bool:
    """True when the last ``advanced`` steps (ending at ``step``) passed a multiple of ``every`` (0: never).
    A GRPO round advances ``num_iterations`` steps at once, so ``step % every == 0`` could jump over it."""
    return every > 0 and (step - advanced) // every < step // every


class LossWindow:
    """The finite micro-batch losses since the last log line, and the time and steps they took."""

    def __init__(self, step: int) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)  # [sum of finite losses, their count] on this rank
        self.tick, self.step = time.perf_counter(), step

    def add(self, loss: float) -> None:
        self.sums += torch.tensor([loss, 1.0], dtype=torch.float64)

    def close(self, step: int) -> tuple[float, float]:
        """``(mean loss over every rank, optimizer steps per second)`` since the last close; every rank must
        call it (the sums are all-reduced). Starts the next window."""
        summed = distributed.all_reduce_sum(self.sums)
        rate = (step - self.step) / max(time.perf_counter() - self.tick, 1e-9)
        self.sums.zero_()
        self.tick, self.step = time.perf_counter(), step
        return (float(summed[0] / summed[1]) if summed[1] else float("nan")), rate


# -- the end -----------------------------------------------------------------------------------------------
def finish(logger: RunLogger, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the run's summary, close the logger and wait for every rank."""
    logger.summary(summary)
    logger.close()
    distributed.barrier()
    return summary
