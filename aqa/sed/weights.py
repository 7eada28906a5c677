"""SED model directories (``config.json`` + ``model.safetensors`` + ``labels.json``) and official ``.pt`` files.

A SED directory is what every cascade stage takes as ``--sed DIR``; it is written by
``python -m aqa.sed.convert`` (from an official checkpoint), ``python -m aqa.sed.tiny`` and ``train/sed.py``.
Weights are read from safetensors only. An official BEATs checkpoint (a ``torch.save`` dict with ``cfg``,
``model`` and ``label_dict``) is read with ``torch.load(weights_only=True)`` and nothing else: if that
refuses the file, we stop and say how to re-save it, rather than unpickling arbitrary objects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aqa.errors import UserError
from aqa.sed.beats import BeatsModel
from aqa.sed.config import BeatsConfig, load_beats_config, save_beats_config
from aqa.sed.labels import LabelMap

WEIGHTS_FILE = "model.safetensors"


class SedCheckpointError(UserError, ValueError):
    """A SED checkpoint that cannot be loaded; the message names the tensors or the fix."""


def save_sed_dir(model: BeatsModel, labels: LabelMap | None, out_dir: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config, weights (safetensors) and label map. ``state_dict`` overrides the model's own tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if labels is not None and model.predictor is not None:
        labels.check_classes(model.num_classes, "the model being saved")
    sd = state_dict if state_dict is not None else model.state_dict()
    # The shared relative-position table appears under every layer's key; safetensors refuses tensors that
    # share memory, so each key gets its own copy (they load back into the one shared table).
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model_type": "beats"})
    save_beats_config(model.cfg, out / "config.json")
    if labels is not None:
        labels.save(out / "labels.json")
    return out


def _predictor_rows(weights: Path) -> int | None:
    with safe_open(str(weights), framework="pt") as fh:
        if "predictor.weight" not in fh.keys():
            return None
        return int(fh.get_slice("predictor.weight").get_shape()[0])


def load_state_strict(model: BeatsModel, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and misshapen tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                       for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or misshapen:
        parts = []
        for title, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if names:
                parts.append(f"{len(names)} {title} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
        raise SedCheckpointError(f"{where} does not fit the BEATs built from its config: {'; '.join(parts)}. "
                                 "Check that config.json belongs to these weights.")
    model.load_state_dict(state, strict=True)


def load_sed_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[BeatsModel, LabelMap]:
    """Load a SED directory: ``(model in eval mode, label map)``. The class count must match the labels."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise SedCheckpointError(f"{directory} has no {WEIGHTS_FILE}. Convert an official checkpoint with "
                                 "python -m aqa.sed.convert CKPT.pt --out DIR, or train one with train/sed.py.")
    cfg = load_beats_config(directory)
    labels = LabelMap.load(directory)
    if not cfg.finetuned_model:
        raise SedCheckpointError(f"{directory} holds a BEATs without a class predictor (finetuned_model false): "
                                 "it cannot detect events. Fine-tune it first with train/sed.py.")
    labels.check_classes(cfg.predictor_class, f"{directory / 'config.json'}")
    rows = _predictor_rows(weights)
    if rows is not None:
        labels.check_classes(rows, f"{weights} (predictor.weight)")
    model = BeatsModel(cfg)
    load_state_strict(model, load_file(str(weights)), str(weights))
    return model.to(device).eval(), labels


# -- official checkpoints ----------------------------------------------------------------------------
RESAVE_HINT = (
    "Only if the file comes from a source you trust: re-save it once on a trusted machine as a dict of plain "
    "'cfg' (a dict), 'model' (name -> tensor) and 'label_dict' entries (README, 'Official BEATs checkpoints'), "
    "then convert that file."
)


def blocked_globals(path: str | Path, err: Exception) -> list[str]:
    """The Python globals (``module.name``) a checkpoint's pickle asks for that weights-only loading refuses,
    read from the pickle's opcodes without running them; else parsed from torch's message."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an older torch, or a file it cannot scan: torch's message names the first one
        names = []
    if not names:
        names = re.findall(r"GLOBAL ([A-Za-z_][\w.]*)", str(err))
    return list(dict.fromkeys(names))


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """An official BEATs ``.pt`` as ``{'cfg': dict, 'model': {name: tensor}, 'label_dict': {row: MID} | None}``.

    Only ``torch.load(weights_only=True)`` is used; a file that needs more is refused with :data:`RESAVE_HINT`.
    """
    path = Path(path)
    if not path.is_file():
        raise SedCheckpointError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message advises turning the check off: name the global instead
        if "weights_only" in str(err) or "Unsupported global" in str(err) or "Weights only load failed" in str(err):
            names = blocked_globals(path, err) or ["(not named by torch)"]
            raise SedCheckpointError(
                f"{path} asks to unpickle Python objects that are not tensors or plain containers: "
                f"{', '.join(names)}. Weights-only loading refuses them and this project never runs a "
                f"checkpoint's code. {RESAVE_HINT}"
            ) from None
        raise SedCheckpointError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "cfg" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SedCheckpointError(f"{path} is not an official BEATs checkpoint: expected a dict with 'cfg' and "
                                 f"'model' (and 'label_dict'), got {keys}.")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise SedCheckpointError(f"{path}: 'model' must map tensor names to tensors.")
    cfg = ckpt["cfg"]
    if not isinstance(cfg, dict):
        raise SedCheckpointError(f"{path}: 'cfg' must be a dict of BEATsConfig fields, got {type(cfg).__name__}.")
    label_dict = ckpt.get("label_dict")
    return {"cfg": dict(cfg), "model": dict(model), "label_dict": None if label_dict is None else dict(label_dict)}


def convert_official(path: str | Path, out_dir: str | Path, names: dict[str, str] | None = None) -> dict[str, Any]:
    """Official ``.pt`` -> SED directory. Returns a summary: classes, named classes, ignored cfg keys."""
    ckpt = read_official_checkpoint(path)
    cfg, ignored = BeatsConfig.from_dict(ckpt["cfg"], strict=False)
    model = BeatsModel(cfg)
    load_state_strict(model, ckpt["model"], str(path))
    labels = None
    if cfg.finetuned_model:
        if not ckpt["label_dict"]:
            raise SedCheckpointError(f"{path} has a {cfg.predictor_class}-class predictor but no 'label_dict': "
                                     "its rows cannot be named. Use a checkpoint that carries its label_dict.")
        labels = LabelMap.from_label_dict(ckpt["label_dict"], names)
        labels.check_classes(model.num_classes, str(path))
    save_sed_dir(model, labels, out_dir)
    named = 0 if labels is None else sum(1 for c in labels if c.name != c.mid)
    return {"classes": model.num_classes, "named": named, "ignored_cfg_keys": ignored,
            "tensors": len(ckpt["model"])}
