"""Safetensors IO for release directories: sharded index, header-only shapes, strict loading.

Only safetensors are read (never the release's ``*.pt`` detokenizer/vocoder pickles). Loading is
strict: every tensor the module needs must be present with its shape, and every tensor present
must be needed or explicitly dropped; errors name the tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from aqa.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the module; the message names the tensors."""


def weight_map(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        entries = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(entries, dict) or not entries:
            raise CheckpointError(f"{index} has no weight_map; the index is damaged.")
        files = {name: directory / shard for name, shard in entries.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing[:5])}.")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), single)
    raise FileNotFoundError(
        f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}; only safetensors weights are loaded "
        "(never pickle)."
    )


def tensor_shapes(directory: str | Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a directory's safetensors, read from the headers only."""
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_map(directory).items():
        by_file.setdefault(file, []).append(name)
    shapes: dict[str, list[int]] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as fh:
            present = set(fh.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"the index puts {name} in {file.name}, which does not hold it.")
                shapes[name] = list(fh.get_slice(name).get_shape())
    return shapes


def load_into(
    module: nn.Module, directory: str | Path, *, rename: Callable[[str], str | None] = lambda n: n,
    drop: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
) -> list[str]:
    """Load a directory's safetensors into ``module`` strictly; returns the names dropped.

    ``rename`` maps a checkpoint name to the module's name, or None to skip it (a part we do not
    use, e.g. Whisper's decoder). ``drop`` is a regex of checkpoint names to discard (e.g. the
    ``rotary_emb.inv_freq`` buffers). ``module`` may live on the meta device: tensors are assigned.
    """
    expected = module.state_dict()
    drop_re = re.compile(drop) if drop else None
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_map(directory).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            present = set(fh.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"the index puts {name} in {file.name}, which does not hold it.")
                if drop_re is not None and drop_re.search(name):
                    dropped.append(name)
                    continue
                target = rename(name)
                if target is None:
                    continue
                if target not in expected:
                    unexpected.append(name)
                    continue
                tensor = fh.get_tensor(name)
                if list(tensor.shape) != list(expected[target].shape):
                    raise CheckpointError(
                        f"{name} has shape {list(tensor.shape)} in {file.name} but the model built from config.json "
                        f"needs {list(expected[target].shape)}: config.json and the weights disagree."
                    )
                want = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
                state[target] = tensor.to(device=device, dtype=want)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory} does not fit the model: missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}. Check that config.json "
            "belongs to these weights."
        )
    module.load_state_dict(state, strict=True, assign=True)
    return dropped


def save_shards(state: dict[str, torch.Tensor], directory: str | Path, num_shards: int = 1,
                name: Callable[[int, int], str] = lambda i, n: f"model-{i}-of-{n}.safetensors") -> Path:
    """Write ``state`` as ``num_shards`` safetensors files plus ``model.safetensors.index.json``.

    Tensors are spread in order, balancing bytes; shard file names follow the release
    (``model-{i}-of-{n}.safetensors``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    per_shard = max(1, -(-total // max(1, num_shards)))
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = state[n].numel() * state[n].element_size()
        if shards[-1] and size + nbytes > per_shard and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    mapping: dict[str, str] = {}
    for i, members in enumerate(shards, 1):
        file = name(i, len(shards))
        save_file({n: state[n].detach().contiguous().cpu() for n in members}, str(directory / file),
                  metadata={"format": "pt"})
        mapping.update(dict.fromkeys(members, file))
    index = {"metadata": {"total_size": total}, "weight_map": mapping}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return directory
