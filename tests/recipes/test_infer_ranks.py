"""``inference/run.py`` under the launchers users have: ``deepspeed --num_gpus 2`` and ``torchrun
--nproc_per_node 2`` on CPU, over the demo's synthetic dev split, against the one-process run; and one rank
killed in the middle of its shard, then the same command again.

Every run has one CPU thread per rank (``OMP_NUM_THREADS=1``), so the one-process and two-rank runs do the
same arithmetic and their files can be compared byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from aqa.eval.parts import complete_lines, part_files, part_path
from aqa.eval.shards import SplitIndex
from aqa.runtime.distributed import free_port
from inference.run import main
from tests.recipes.launch import ROOT, deepspeed, recipe_env, synth_data

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = "configs/demo/qwen2_audio_infer.yaml"
BATCH = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny) -> dict:
    root = tmp_path_factory.mktemp("infer_ranks")
    data = synth_data(root / "data", train=2, dev=24, eval_=2)
    model = tiny.shared("qwen2_audio", seed=4, chunk_seconds=1)
    return {"root": root, "data": data, "model": model}


def _args(assets: dict, out: Path) -> list[str]:
    return ["--config", CONFIG, "--split", "dev", f"model_path={assets['model']}", "adapter=null",
            f"data_dir={assets['data']}", f"output_dir={out}", f"cache_dir={assets['root'] / 'cache'}",
            f"batch_size={BATCH}", "permutations=2", "progress=false"]


def _files(out: Path) -> dict[str, object]:
    metrics = json.loads((out / "dev" / "metrics.json").read_text())
    run = metrics.pop("run")
    return {"predictions": (out / "dev" / "predictions.jsonl").read_text(), "metrics": metrics, "run": run,
            "submission": (out / "dev" / "submission.csv").read_text()}


@pytest.fixture(scope="module")
def one_process(assets) -> dict[str, object]:
    """The one-process run, in this process (what ``python inference/run.py`` runs), on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = assets["root"] / "one"
        args = main(_args(assets, out))
        assert args["run"]["ranks"] == 1
    finally:
        torch.set_num_threads(threads)
    return _files(out)


def _same(files: dict, reference: dict, ranks: int) -> None:
    assert files["predictions"] == reference["predictions"]  # every row, in manifest order, byte for byte
    assert files["submission"] == reference["submission"] and files["metrics"] == reference["metrics"]
    assert files["run"]["ranks"] == ranks and files["run"]["questions_per_s"] > 0


def test_deepspeed_two_ranks_write_the_one_process_files_for_each_split(assets, one_process):
    out = assets["root"] / "ds"
    args = _args(assets, out)
    args[args.index("--split") + 1] = "dev,eval"  # and the eval split after it, by the same two ranks
    deepspeed("inference/run.py", *args, OMP_NUM_THREADS="1")
    eval_rows = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(eval_rows) == 2 and not (out / "eval" / "metrics.json").exists()  # eval: no metrics.json
    assert (out / "eval" / "submission.csv").read_text().count("\n") == 3
    files = _files(out)
    _same(files, one_process, ranks=2)
    ids = [json.loads(x)["id"] for p in part_files(out / "dev") for _, x in complete_lines(p)]
    assert len(ids) == len(set(ids)) == 24  # each rank wrote its own shard, every id once
    assert [p.name for p in part_files(out / "dev")] == ["part-00000.jsonl", "part-00001.jsonl"]


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker the launcher started as ``rank``."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "inference/run.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_torchrun_rank_killed_mid_shard_then_the_same_command_finishes_the_same_files(assets, one_process):
    out = assets["root"] / "killed"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "inference/run.py",
           *_args(assets, out)]
    env = recipe_env(OMP_NUM_THREADS="1")
    index = SplitIndex.scan(assets["data"] / "dev.jsonl")
    shard = sum(len(b) for b in index.schedule(BATCH, 2, 1))  # rank 1's questions
    part = part_path(out / "dev", 1)
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        killed_at = None
        t0 = time.time()
        while launcher.poll() is None and time.time() - t0 < 300:
            if part.is_file() and part.stat().st_size:  # rank 1 has written its first batch
                pid = _rank_pid(launcher, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = sum(1 for _ in complete_lines(part))
                    break
            time.sleep(0.005)
        assert killed_at is not None, "rank 1 finished (or never started) before it could be killed"
        assert launcher.wait(timeout=120) != 0  # the launcher stops the other rank and fails
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    written = sum(1 for _ in complete_lines(part))
    assert 0 < written < shard, f"killed after {written} of rank 1's {shard} questions: not in the middle"
    assert not (out / "dev" / "predictions.jsonl").exists()

    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
    _same(_files(out), one_process, ranks=2)
    ids = [json.loads(x)["id"] for p in part_files(out / "dev") for _, x in complete_lines(p)]
    assert len(ids) == len(set(ids)) == 24  # no question scored twice
