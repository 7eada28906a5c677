"""aqa.runtime.distributed: environment parsing, the launcher argument, and the collectives over a real 2-process gloo group."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from aqa.runtime import distributed
from tests.helpers import ROOT


def test_env_ranks_defaults_and_launcher_values(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_ranks() == (0, 0, 1, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.env_ranks() == (3, 1, 4, 2)


def test_env_ranks_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.env_ranks()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.env_ranks()


def test_parser_accepts_the_deepspeed_local_rank_argument():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    distributed.add_launcher_args(parser)
    args = parser.parse_args(["--config", "c.yaml", "max_steps=3", "--local_rank=1"])
    assert args.local_rank == 1 and args.overrides == ["max_steps=3"]
    args = parser.parse_args(["--local-rank", "0", "--config", "c.yaml"])  # torch.distributed.launch spelling
    assert args.local_rank == 0


def test_collectives_without_a_process_group_are_identities():
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_gather_tensor(t).tolist() == [[1.0, 2.0]]
    assert distributed.all_reduce_sum(t).tolist() == [1.0, 2.0]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_gather_strings(["a", "bé"]) == [["a", "bé"]]
    assert distributed.all_gather_strings([]) == [[]]
    assert distributed.broadcast_string("x") == "x"
    with pytest.raises(ValueError, match="newline"):
        distributed.all_gather_strings(["a\nb"])


WORKER = r"""
import json, sys, time
from pathlib import Path
import torch
from aqa.runtime import distributed
info = distributed.init(use_deepspeed=False)
r = info.rank
out = {"rank": r, "world": info.world_size, "backend": info.backend, "main": info.is_main}
out["gather"] = distributed.all_gather_tensor(torch.tensor([r, 10 * r])).tolist()
out["sum"] = distributed.all_reduce_sum(torch.tensor([1.0, float(r)])).tolist()
out["any_one"] = distributed.any_rank(r == 1)
out["any_none"] = distributed.any_rank(False)
out["strings"] = distributed.all_gather_strings(["q0", "q1", "long-id-é"] if r == 0 else ["x"])
out["empty"] = distributed.all_gather_strings([] if r == 0 else ["only"])
out["bcast"] = distributed.broadcast_string("from-zero" if r == 0 else None)
marker = Path(sys.argv[1])
with distributed.main_first():
    if r == 0:
        time.sleep(0.5)
        marker.write_text("rank0")
    else:
        out["saw_marker"] = marker.read_text()
distributed.barrier()
distributed.cleanup()
print("RESULT " + json.dumps(out))
"""


def test_collectives_over_two_gloo_processes(tmp_path):
    port = str(distributed.free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "marker")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        line = next(li for li in stdout.splitlines() if li.startswith("RESULT "))
        row = json.loads(line[len("RESULT "):])
        results[row["rank"]] = row
    for rank in range(2):
        row = results[rank]
        assert row["world"] == 2 and row["backend"] == "gloo" and row["main"] == (rank == 0)
        assert row["gather"] == [[0, 0], [1, 10]]
        assert row["sum"] == [2.0, 1.0]
        assert row["any_one"] is True and row["any_none"] is False
        assert row["strings"] == [["q0", "q1", "long-id-é"], ["x"]]
        assert row["empty"] == [[], ["only"]]
        assert row["bcast"] == "from-zero"
    assert results[1]["saw_marker"] == "rank0"  # rank 1 entered main_first only after rank 0 left it


def test_plain_python_start_makes_a_world_of_one():
    """`python train/sft.py` sets no launcher variables: init() creates them, on a free port, and DeepSpeed joins."""
    code = ("import os; from aqa.runtime import distributed; info = distributed.init(); "
            "import deepspeed.comm as dc; "
            "print('RESULT', info.rank, info.world_size, info.backend, os.environ['WORLD_SIZE'], dc.get_world_size()); "
            "distributed.cleanup()")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(li for li in proc.stdout.splitlines() if li.startswith("RESULT"))
    assert line.split()[1:] == ["0", "1", "gloo", "1", "1"]


def test_deepspeed_cpu_group_builds_no_shm_op_and_ignores_a_stale_build_lock(tmp_path):
    """Two ranks join through deepspeed.init_distributed on the CPU with a build lock left in the extensions
    folder by a launch killed mid-compile. DeepSpeed's shared-memory all-reduce op is not built, so nothing waits
    on that lock (before, every later launch hung there) and no buffer is left in /dev/shm."""
    import glob

    ext = tmp_path / "torch_extensions"
    for sub in ("py311_cpu", ""):
        (ext / sub / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
        (ext / sub / "deepspeed_shm_comm" / "lock").touch()
    code = ("import torch; from aqa.runtime import distributed; info = distributed.init(); "
            "t = distributed.all_reduce_sum(torch.tensor([1.0 + info.rank])); "
            "import deepspeed.comm as dc; "
            "print('RESULT', info.rank, t.item(), dc.get_world_size()); distributed.cleanup()")
    port = str(distributed.free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(ROOT),
               "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
        assert "deepspeed_shm_comm" not in stdout + stderr
        line = next(li for li in stdout.splitlines() if li.startswith("RESULT"))
        assert line.split()[2:] == ["3.0", "2"]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
