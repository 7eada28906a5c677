"""Process-group setup and the few collectives the recipes need.

The rank comes from the environment, whichever way the script was started:

- ``deepspeed train/sft.py``: the launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and
  appends ``--local_rank=N`` to the arguments (see :func:`add_launcher_args`);
- ``torchrun``: the same variables, no extra argument;
- ``python train/sft.py``: nothing is set, and :func:`init` makes a world of one on a free local port.

Collectives here move small tensors only (flags, counts, ids). Strings travel as byte tensors, so no
object is ever pickled between processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; unset it or fix the launcher.") from err


def env_ranks() -> tuple[int, int, int, int]:
    """``(rank, local_rank, world_size, local_world_size)`` as the launcher set them (``0, 0, 1, 1`` if unset)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in a world of WORLD_SIZE={world}; check the launcher's environment.")
    return rank, local_rank, world, local_world


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept the ``--local_rank=N`` the deepspeed launcher appends (the rank itself is read from the environment)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def free_port() -> int:
    """A TCP port nobody listens on right now (for a one-process world)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; launch at most that "
                "many processes per node (deepspeed --num_gpus N)."
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launch_info() -> DistInfo:
    """Where this process stands, from the launcher's environment alone, joining no process group: for a job
    whose ranks never talk (inference: each scores its shard and they meet in files). A plain ``python``
    start is rank 0 of 1."""
    rank, local_rank, world, local_world = env_ranks()
    device = choose_device(local_rank)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                    device=device, backend="nccl" if device.type == "cuda" else "gloo")


def init(timeout_minutes: float = 30.0, use_deepspeed: bool = True) -> DistInfo:
    """Join (or create) the process group: nccl on GPU, gloo on CPU. Safe to call twice.

    A plain ``python`` start gets the variables of a one-process world, so DeepSpeed does not go looking
    for MPI. With ``use_deepspeed`` the group is created through ``deepspeed.init_distributed`` so that
    DeepSpeed's own communication layer knows it too.
    """
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rank, local_rank, world, local_world = env_ranks()
    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed requires it even where torchrun omits it
    device = choose_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if use_deepspeed:
            import deepspeed

            if device.type == "cpu":
                _without_shm_allreduce_op()
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                       verbose=False)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                    device=device, backend=backend)


def _without_shm_allreduce_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op when it joins a CPU group.

    That op serves only DeepSpeed's tensor-parallel ``inference_all_reduce``, which no recipe calls; every
    all-reduce here goes through gloo. Building it costs a C++ compile at the first launch on a machine,
    leaves a ~69 MB buffer per rank in /dev/shm that DeepSpeed never removes, and a launch killed during the
    compile leaves the build's lock file behind, after which every later launch waits on that lock forever.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def cleanup() -> None:
    """Leave the process group (end of a run), so the launcher sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a one-process run without a group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writing a file), the others after it has finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _comm_device() -> torch.device:
    """gloo moves CPU tensors, nccl GPU tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``[*shape]`` on each rank -> ``[world_size, *shape]`` on every rank (same shape and dtype everywhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.detach().unsqueeze(0).clone()
    local = tensor.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks of a small tensor; returns a new tensor on the input's device."""
    out = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        moved = out.to(_comm_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out = moved.to(tensor.device)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a non-finite loss anywhere)."""
    return bool(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.long)).item() > 0)


def all_gather_strings(items: list[str]) -> list[list[str]]:
    """Each rank's list of strings, gathered on every rank: ``[world_size][n_r]``.

    Lists may differ in length; they travel as UTF-8 byte tensors padded to the longest.
    """
    data = "\n".join(items).encode("utf-8") if items else b""
    if any("\n" in s for s in items):
        raise ValueError("all_gather_strings joins items with newlines; an item holds one.")
    lengths = all_gather_tensor(torch.tensor([len(data), len(items)], dtype=torch.long))  # [W, 2]
    width = max(int(lengths[:, 0].max()), 1)
    buf = torch.zeros(width, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = all_gather_tensor(buf)  # [W, width]
    out = []
    for row, (n_bytes, n_items) in zip(gathered, lengths.tolist()):
        text = bytes(row[:n_bytes].tolist()).decode("utf-8")
        out.append(text.split("\n") if n_items else [])
    return out


def broadcast_string(text: str | None, src: int = 0) -> str:
    """Rank ``src``'s string on every rank (e.g. the checkpoint tag rank 0 chose)."""
    return all_gather_strings([text or ""])[src][0] if dist.is_initialized() else (text or "")


def set_cpu_threads(info: DistInfo) -> int:
    """On CPU, split the cores between the ranks of this node (``OMP_NUM_THREADS`` wins when set).

    Left alone, every rank starts one thread per core, and N ranks on N cores run N x N threads that
    mostly wait for each other.
    """
    if info.device.type != "cpu":
        return torch.get_num_threads()
    threads = _env_int("OMP_NUM_THREADS", 0) or max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
    torch.set_num_threads(threads)
    return threads
