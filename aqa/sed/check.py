"""BEATs' checkpoint check (registered by name in ``aqa.check_checkpoint``: BEATs is not a backbone).

    python -m aqa.check_checkpoint --backbone beats --index beats_params.json [--config config.json]

The index is a names/shapes listing (``{"shapes": {name: shape}, "cfg": {...}}``, as in
``tests/fixtures/beats_params.json``), a ``model.safetensors`` file, or a SED directory (shapes read from
the safetensors header, nothing loaded). The model is built on the meta device from ``--config`` (a BEATs
``config.json``, or a SED directory), else from the listing's own ``cfg`` or the directory's config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from aqa.backbones.checkpoint_check import CheckpointChecker, PartCheck, Shapes, module_shapes
from aqa.sed.beats import BeatsModel
from aqa.sed.config import CONFIG_FILE, BeatsConfig, BeatsConfigError, load_beats_config
from aqa.sed.weights import WEIGHTS_FILE


def _index_shapes(index: Path) -> tuple[Shapes, dict | None]:
    """(names -> shapes, the listing's cfg if it has one)."""
    if index.is_dir():
        index = index / WEIGHTS_FILE
    if index.suffix == ".safetensors":
        with safe_open(str(index), framework="pt") as fh:
            return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}, None
    data = json.loads(index.read_text(encoding="utf-8"))
    shapes = data.get("shapes", data.get("model"))
    if not isinstance(shapes, dict):
        raise BeatsConfigError(f"{index} has no 'shapes' mapping of tensor names to shapes.")
    return shapes, data.get("cfg")


def check_beats(config_path: Path | None, index_path: Path) -> list[PartCheck]:
    shapes, listed_cfg = _index_shapes(Path(index_path))
    if config_path is not None:
        cfg = load_beats_config(config_path)
    elif listed_cfg is not None:
        cfg = BeatsConfig.from_dict(listed_cfg, strict=False)[0]
    elif Path(index_path).is_dir() and (Path(index_path) / CONFIG_FILE).is_file():
        cfg = load_beats_config(index_path)
    else:
        raise BeatsConfigError(f"{index_path} carries no BEATs cfg; pass --config with the model's config.json.")
    with torch.device("meta"):
        model = BeatsModel(cfg)
    return [PartCheck("beats", module_shapes(model), shapes)]


# --config may be left out: a listing's cfg or a SED directory's config.json stands in for it
CHECKER = CheckpointChecker(check_beats, config_optional=True)
