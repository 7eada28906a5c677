"""LoRA on a backbone with peft: apply from a small config, load an adapter safely, merge for export.

The adapter files are plain PEFT (``adapter_config.json`` + ``adapter_model.safetensors``), loadable by
``PeftModel.from_pretrained``. Loading checks the adapter against the base first, because peft loads
a mismatched adapter with only a warning (missing keys) and then scores garbage.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from aqa.backbones.base import Backbone
from aqa.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(UserError, ValueError):
    """An adapter that does not belong to this base model, or is incomplete; the message says why."""


@dataclass
class LoraConfig:
    """What LoRA trains. ``targets`` narrows the backbone's default language-model layers by leaf name."""

    r: int = 8  # LoRA rank
    alpha: int = 16  # scaling: the update is (alpha / r) * B A
    dropout: float = 0.05  # dropout on the LoRA input
    targets: list[str] | None = None  # e.g. [q_proj, v_proj]; None: every LM linear layer
    include_audio: bool = False  # also adapt the audio tower and projector
    # Modules trained in full and saved inside the adapter (peft's modules_to_save), by module name, e.g.
    # [audio_tower, multi_modal_projector]. For a random-init tiny model whose audio side has learned nothing yet.
    modules_to_save: list[str] | None = None


def _base_module(backbone_or_model: Backbone | nn.Module) -> nn.Module:
    model = backbone_or_model.model if isinstance(backbone_or_model, Backbone) else backbone_or_model
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def apply_lora(backbone: Backbone, cfg: LoraConfig) -> nn.Module:
    """Wrap ``backbone.model`` in a PEFT LoRA model; only LoRA tensors require grad afterwards.

    Sets ``backbone.model`` to the PEFT model and returns it.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if cfg.r < 1:
        raise ValueError(f"lora.r must be >= 1, got {cfg.r}.")
    targets = backbone.lora_target_modules(include_audio=cfg.include_audio, names=cfg.targets)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none", modules_to_save=cfg.modules_to_save or None)
    backbone.model = get_peft_model(backbone.model, peft_cfg)
    return backbone.model


def check_adapter(base: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Check that ``adapter_dir`` holds a complete adapter that fits ``base``; returns its config.

    Every tensor must name a linear layer of ``base`` and have the shape LoRA of that layer has
    (``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``). Raises ``AdapterError`` naming the mismatch.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(
            f"{adapter_dir} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(as train/sft.py writes them under <output_dir>/adapter)."
        )
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    modules = dict(base.named_modules())
    trained_on = config.get("base_model_name_or_path")
    where = f" (trained on {trained_on})" if trained_on else ""
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as fh:
        keys = list(fh.keys())
        if not keys:
            raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no tensors.")
        for key in keys:
            m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                             r"(?:\.[^.]+)?\.weight", key)
            if m is None:
                continue  # modules_to_save and the like: peft checks those itself
            layer = modules.get(m.group(1))
            if not isinstance(layer, nn.Linear):
                raise AdapterError(
                    f"adapter tensor {key} targets '{m.group(1)}', which is not a linear layer of this base model"
                    f"{where}: the adapter was trained on another base. Pass the model_path it was trained with."
                )
            shape = tuple(fh.get_slice(key).get_shape())
            r = shape[0] if m.group(2) == "lora_A" else shape[1]
            expected = (r, layer.in_features) if m.group(2) == "lora_A" else (layer.out_features, r)
            if shape != expected:
                raise AdapterError(
                    f"adapter tensor {key} has shape {shape} but this base model's '{m.group(1)}' needs {expected}"
                    f"{where}: the adapter was trained on another base. Pass the model_path it was trained with."
                )
    return config


def load_adapter(backbone: Backbone, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Load a PEFT adapter onto ``backbone.model`` after :func:`check_adapter`; sets and returns the PEFT model."""
    from peft import PeftModel

    check_adapter(_base_module(backbone), adapter_dir)
    backbone.model = PeftModel.from_pretrained(backbone.model, str(adapter_dir), is_trainable=trainable)
    return backbone.model


def merge_lora(backbone: Backbone) -> nn.Module:
    """Fold the LoRA weights into the base linear layers; ``backbone.model`` becomes the plain HF model."""
    model = backbone.model
    if not hasattr(model, "merge_and_unload"):
        raise AdapterError("the backbone's model carries no LoRA adapter to merge; load one with load_adapter.")
    backbone.model = model.merge_and_unload()
    return backbone.model
