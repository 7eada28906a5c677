"""Checkpoints for exact resume, and the PEFT adapter a run hands to inference.

Layout under a run dir::

    <output_dir>/checkpoints/step_00000040/       DeepSpeed's files (model, ZeRO optimizer partitions, scheduler)
        train_state_rank0.json ...                 this package's state per rank: step, epoch, sampler position,
                                                   non-finite count, python/numpy/torch RNG states
        adapter/                                   the adapter as of this step (adapter_model.safetensors + config)
        COMPLETE                                   written last: a checkpoint without it is ignored
    <output_dir>/adapter/                          the final adapter

The training state is JSON, not DeepSpeed's pickled ``client_state``, and DeepSpeed's own files are
read back with ``torch.load(weights_only=True)`` plus an explicit allowlist of the three DeepSpeed
classes its ZeRO files hold (see :class:`SafeTorchCheckpointEngine`): loading a checkpoint never runs
arbitrary code.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aqa.config import ConfigError
from aqa.errors import UserError
from aqa.runtime import distributed

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
ADAPTER = "adapter"
TAG_RE = re.compile(r"step_(\d+)")

# Non-tensor classes inside DeepSpeed's ZeRO-1/2 optimizer files, and nothing else.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what to do."""


# -- RNG state --------------------------------------------------------------------------------------
def _tensor_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch (CPU and every CUDA device) generator states, as JSON-able data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": _tensor_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`: the next random draws equal those the saved run made next."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_s = state["numpy"]
    np.random.set_state({"bit_generator": np_s["bit_generator"],
                         "state": {"key": np.asarray(np_s["key"], dtype=np.uint32), "pos": np_s["pos"]},
                         "has_gauss": np_s["has_gauss"], "gauss": np_s["gauss"]})
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_text_to_tensor(s) for s in state["cuda"]]
        if len(saved) != torch.cuda.device_count():
            raise CheckpointError(f"the checkpoint saved {len(saved)} CUDA generator states but "
                                  f"{torch.cuda.device_count()} GPUs are visible; resume with the same GPU count.")
        torch.cuda.set_rng_state_all(saved)


# -- training state ---------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a resumed rank needs besides DeepSpeed's weights, optimizer and scheduler."""

    global_step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0
    consumed: int = 0  # items of ``epoch`` this rank has trained on (the sampler position)
    nonfinite_steps: int = 0  # micro-batches whose loss was NaN/inf anywhere and whose step was skipped
    noop_rounds: int = 0  # GRPO rounds in which every group's rewards were equal (no advantage signal)
    world_size: int = 1
    rng: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    m = TAG_RE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))


def find_latest(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint (a run killed while saving leaves one without ``COMPLETE``)."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def incomplete_after(ckpt_root: str | Path, latest: Path | None) -> list[Path]:
    """Checkpoint directories newer than ``latest`` that lack ``COMPLETE``: saves a kill cut off."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    newest = step_of(latest) if latest is not None else -1
    cut = [p for p in root.iterdir() if p.is_dir() and (step_of(p) or -1) > newest and not is_complete(p)]
    return sorted(cut, key=lambda p: step_of(p))


def check_run_dir(run_dir: str | Path, resume_dir: Path | None, resume: str) -> None:
    """Refuse a fresh start (``resume=none``) in a run dir that holds checkpoints of an earlier run: a later
    ``resume=auto`` would mix the two runs."""
    existing = list_checkpoints(Path(run_dir) / CHECKPOINTS)
    if resume_dir is None and existing and resume != "auto":
        raise ConfigError(f"{run_dir} holds checkpoints of an earlier run ({existing[-1].name}); resume it with "
                          "checkpoint.resume=auto, or pick another output_dir.")


def resolve_resume(resume: str | None, ckpt_root: str | Path) -> Path | None:
    """``resume``: ``auto`` (the latest complete checkpoint, or a fresh start when there is none), ``none``
    (always fresh), or a checkpoint directory (must be complete). Returns the directory or None."""
    if resume is None or resume.lower() in ("", "none", "false", "no"):
        return None
    if resume == "auto":
        latest = find_latest(ckpt_root)
        cut = incomplete_after(ckpt_root, latest)
        if cut and distributed.is_main():
            print(f"resume: skipped {', '.join(p.name for p in cut)}: cut off while being written (no {COMPLETE} "
                  f"marker); resuming from {latest.name if latest else 'the start'}", file=sys.stderr, flush=True)
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume} is not a directory. Use resume=auto, resume=none, or a "
                              f"{CHECKPOINTS}/step_N directory of an earlier run.")
    if not is_complete(path):
        raise CheckpointError(f"{path} has no {COMPLETE} marker: the run was killed while saving it. Resume from an "
                              "older checkpoint, or use resume=auto, which skips incomplete ones.")
    return path


# -- DeepSpeed ---------------------------------------------------------------------------------------
def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True``; DeepSpeed's three plain-data classes are allowed, nothing else."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler's message names the global it refused
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds objects outside the allowlist ({err.__class__.__name__}); it was not written by "
                "this project's DeepSpeed version or was tampered with. It is not loaded: start fresh (resume=none)."
            ) from err
        raise


def install_safe_loading(engine: Any) -> None:
    """Make ``engine`` read its checkpoint files through :func:`safe_torch_load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        weights_only = True

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    if getattr(engine.checkpoint_engine, "weights_only", False):
        return  # installed already
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(
            f"the DeepSpeed config selects {type(engine.checkpoint_engine).__name__}; only the plain torch "
            "checkpoint engine is supported (remove the nebula/decoupled checkpoint settings)."
        )
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)


def save_checkpoint(engine: Any, ckpt_root: str | Path, state: TrainState,
                    adapter_state: dict[str, torch.Tensor] | None = None, peft_model: Any = None,
                    keep_last: int | None = None) -> Path:
    """Save DeepSpeed state, this rank's :class:`TrainState` and (rank 0) the adapter; every rank must call it.

    ``COMPLETE`` is written by rank 0 after all ranks have finished writing, so a killed save is never
    resumed from. ``keep_last`` then removes older complete checkpoints beyond that many.
    """
    root = Path(ckpt_root)
    tag = tag_for(state.global_step)
    tag_dir = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=True, exclude_frozen_parameters=True)
    rank = distributed.rank()
    (tag_dir / f"train_state_rank{rank}.json").write_text(state.to_json(), encoding="utf-8")
    if rank == 0 and peft_model is not None:
        save_adapter(peft_model, tag_dir / ADAPTER, adapter_state)
    distributed.barrier()
    if rank == 0:
        (tag_dir / COMPLETE).write_text(f"{state.global_step}\n", encoding="utf-8")
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return tag_dir


def load_checkpoint(engine: Any, tag_dir: str | Path) -> TrainState:
    """Restore DeepSpeed state from ``tag_dir`` and return this rank's :class:`TrainState` (RNG not yet restored)."""
    tag_dir = Path(tag_dir)
    rank, world = distributed.rank(), distributed.world_size()
    state_file = tag_dir / f"train_state_rank{rank}.json"
    if not state_file.is_file():
        raise CheckpointError(f"{tag_dir} has no {state_file.name}: it was saved by fewer ranks. Resume with the "
                              "same number of processes it was trained with.")
    state = TrainState.from_json(state_file.read_text(encoding="utf-8"))
    if state.world_size != world:
        raise CheckpointError(f"{tag_dir} was saved by {state.world_size} ranks, this run has {world}: the sampler "
                              "positions would not line up. Resume with the same number of processes.")
    install_safe_loading(engine)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {tag_dir}; resume from another one or start fresh.")
    return state


# -- the adapter --------------------------------------------------------------------------------------
def trainable_state(engine: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-precision copies of the trainable parameters, by name. Every rank must call it.

    Under ZeRO the fp32 master weights live in the optimizer's partitions (the module may hold bf16
    copies), so they are gathered from there; the LoRA weights are small.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param) if engine is not None else None
        out[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return out


def save_adapter(peft_model: Any, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (plain PEFT, loadable by
    ``PeftModel.from_pretrained``). ``state``: the trainable tensors by parameter name (fp32 masters)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True, state_dict=state)
    return out
