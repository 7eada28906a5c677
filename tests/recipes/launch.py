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


# -- killing a run for real ----------------------------------------------------------------------------------
def _newer_than(path: Path, t0: float) -> bool:
    return any(f.stat().st_mtime >= t0 for f in path.rglob("*") if f.is_file())


def _reached(run_dir: Path, kind: str, step: int, t0: float) -> bool:
    """Has the run launched at ``t0`` reached the kill point? ``step``: a metrics row of that step is written
    (the run is inside the next step or the checkpoint after it); ``writing``: the checkpoint of that step is
    being written by this launch (or already done: the window can be shorter than a poll); ``after``: the
    checkpoint of that step is complete."""
    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    if kind == "step":
        rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
        return any(f'"step": {s},' in line for line in rows for s in range(step, step + 100))
    if kind == "writing":
        return tag.is_dir() and _newer_than(tag, t0)
    return (tag / "COMPLETE").is_file() and (tag / "COMPLETE").stat().st_mtime >= t0


def run_with_kills(script: str, args: list[str], run_dir: Path, points: list[tuple[str, int]], timeout: int = 600,
                   before_final=None) -> tuple[list[str], subprocess.CompletedProcess]:
    """Launch ``deepspeed --num_gpus 2 SCRIPT ARGS`` (a new process group), SIGKILL the whole group when each kill
    point is reached, relaunch the same command, and after the last point let it finish (``before_final()``
    runs just before that launch). Returns what happened at each point and the final run."""
    import signal
    import time

    happened = []
    for kind, step in points:
        t0 = time.time()
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script, *args]  # a fresh port each
        proc = subprocess.Popen(cmd, cwd=ROOT, env=recipe_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        while proc.poll() is None and time.time() - t0 < timeout:
            if _reached(run_dir, kind, step, t0):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                happened.append(f"{kind}@{step}")
                break
            time.sleep(0.01)
        else:
            happened.append(f"finished before {kind}@{step} (exit {proc.returncode})")
    if before_final is not None:
        before_final()
    return happened, deepspeed(script, *args, timeout=timeout)


def kill_points(seed: int, steps: int = 5) -> list[tuple[str, int]]:
    """One kill per step 1..steps: inside a step, while its checkpoint is written, right after it; each kind at
    least once, the rest drawn with a fixed seed."""
    import random

    rng = random.Random(seed)
    kinds = ["step", "writing", "after"] + [rng.choice(["step", "writing", "after"]) for _ in range(steps - 3)]
    rng.shuffle(kinds)
    return list(zip(kinds, range(1, steps + 1)))


def cut_off_a_save(run_dir: Path) -> str:
    """What a kill in the middle of a save leaves: the next step's directory with part of the files and no
    COMPLETE marker. Returns its name."""
    import shutil

    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    cut = done[-1].with_name(f"step_{int(done[-1].name[5:]) + 1:08d}")
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(done[-1], cut)
    (cut / "COMPLETE").unlink()
    for f in sorted(cut.rglob("*.pt"))[1:]:
        f.unlink()  # torn: some shards never made it
    return cut.name
