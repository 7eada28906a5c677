"""Helpers shared by the recipe tests: the users' launch commands, run on CPU with the sizes of a test.

Recipe tests run the real scripts as subprocesses (``deepspeed --num_gpus 2 train/sft.py ...``,
``python inference/run.py ...``) over a tiny synthetic data set, so these helpers only build command
lines and an environment; they never reach into a script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aqa.runtime.distributed import free_port
from tests.helpers import ROOT

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def recipe_env(**extra: str) -> dict[str, str]:
    """The environment of a recipe subprocess: the repo importable, CPU even where a GPU exists, W&B offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def synth_data(out: Path, train: int = 24, dev: int = 8, eval_: int = 4) -> Path:
    """A small synthetic data set (``python -m data_prep.synth``), in-process; returns its manifest directory."""
    from data_prep.synth import main as synth

    assert synth(["--out", str(out), "--train", str(train), "--dev", str(dev), "--eval", str(eval_),
                  "--no-progress"]) == 0
    return out


def run_checked(cmd: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repo root; a non-zero exit fails the test with the command and both output tails."""
    proc = subprocess.run(cmd, cwd=ROOT, env=recipe_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def deepspeed(script: str, *args: str, ranks: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --master_port FREE SCRIPT ARGS...``: ranks on CPU (gloo), checked."""
    return run_checked([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args],
                       timeout=timeout)


def python(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS...`` with this interpreter, checked."""
    return run_checked([sys.executable, script, *args], timeout=timeout)
