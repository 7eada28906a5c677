"""Full fine-tuning, the config choice beside LoRA (``finetune: full``): which weights train, the frozen
reference GRPO needs, and the model directory a run hands on.

The backbone names what full fine-tuning trains (``Backbone.full_finetune_prefixes``: the language model
and its head, the audio side when ``full.include_audio``); every other parameter is frozen. A run saves
``<output_dir>/model/``: the backbone's own ``save_pretrained`` (safetensors) plus its processor files, a
directory that loads with the model class's plain ``from_pretrained`` and is the next stage's
``model_path``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aqa.backbones.base import Backbone
from aqa.backbones.chat_lm import unwrap

FINETUNE_MODES = ("lora", "full")
MODEL = "model"  # <output_dir>/model: the fully fine-tuned model directory


@dataclass
class FullConfig:
    """What full fine-tuning (``finetune: full``) trains besides the language model and its head."""

    include_audio: bool = False  # also train the audio encoder (and its projector); a vision tower never trains


def trainable_names(backbone: Backbone, cfg: FullConfig) -> list[str]:
    """The names of the parameters full fine-tuning trains (on the unwrapped model)."""
    prefixes = tuple(backbone.full_finetune_prefixes(include_audio=cfg.include_audio))
    names = [n for n, _ in unwrap(backbone.model).named_parameters() if n.startswith(prefixes)]
    if not names:
        raise ValueError(f"{backbone.name}: full fine-tuning prefixes {list(prefixes)} match no parameter.")
    return names


def apply_full(backbone: Backbone, cfg: FullConfig) -> nn.Module:
    """Make exactly the parameters of :func:`trainable_names` require grad; returns ``backbone.model``."""
    model = unwrap(backbone.model)
    train = set(trainable_names(backbone, cfg))
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    backbone.model = model
    return model


def frozen_reference(model: nn.Module) -> tuple[nn.Module, int]:
    """A frozen copy of ``model`` (eval mode, no grad) for GRPO's KL term, and its size in bytes.

    With LoRA the reference is the policy with its adapter disabled; a fully fine-tuned policy has no adapter
    to disable, so the starting weights are kept once more: one extra model in the compute dtype.
    """
    ref = copy.deepcopy(unwrap(model))
    ref.requires_grad_(False)
    ref.eval()
    size = sum(p.numel() * p.element_size() for p in ref.parameters())
    size += sum(b.numel() * b.element_size() for b in ref.buffers())
    return ref, size


def save_model(backbone: Backbone, model: nn.Module, out_dir: str | Path) -> Path:
    """Write the (unwrapped) trained model and the backbone's processor files to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = unwrap(model)
    with torch.no_grad():
        hf.save_pretrained(out)  # safetensors
    backbone.save_processor(out)
    return out
