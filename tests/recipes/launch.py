"""How every recipe test launches the users' commands: on CPU, with the sizes of a test.

Recipe tests run the real scripts as subprocesses (``deepspeed --num_gpus 2 train/sft.py ...``,
``python inference/run.py ...``) over a tiny synthetic data set, so these helpers only build command
lines and an environment; they never reach into a script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

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


def run_checked(cmd: list[str], timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repo root; a non-zero exit fails the test with the command and both output tails.

    ``check=False``: return whatever the command did, for a test that wants it to fail."""
    proc = subprocess.run(cmd, cwd=ROOT, env=recipe_env(**env), capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def deepspeed(script: str, *args: str, ranks: int = 2, timeout: int = 600, check: bool = True,
              **env: str) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS --master_port FREE SCRIPT ARGS...``: ranks on CPU (gloo), checked.

    A free port: the launcher's default (29500) may be taken by another job on the machine."""
    return run_checked([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args],
                       timeout=timeout, check=check, **env)


def python(script: str, *args: str, timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS...`` with this interpreter, checked."""
    return run_checked([sys.executable, script, *args], timeout=timeout, check=check, **env)


def run_once(launch: Callable[..., subprocess.CompletedProcess], name: str = "full"):
    """A module-scoped fixture: ``launch(assets, <assets root>/NAME)`` run once; its value is that run dir, which
    every test of the module reads."""

    @pytest.fixture(scope="module")
    def run(assets) -> Path:
        out = assets["root"] / name
        launch(assets, out)
        return out

    return run


def favour_letters(embed_tokens: torch.nn.Embedding, lm_head: torch.nn.Linear, tokenizer, tokens: list[str]) -> None:
    """Nudge a tiny random model to answer with option letters: hidden dimension 0 made always positive at every
    text position feeds the output rows of ``tokens``. A random model otherwise never names an option, every GRPO
    group scores 0, and each round is a no-op."""
    with torch.no_grad():
        embed_tokens.weight[:, 0] = 10.0
        for token in tokens:
            lm_head.weight[tokenizer.convert_tokens_to_ids(token), 0] = 1.0
