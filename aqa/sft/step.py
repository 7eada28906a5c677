"""The SFT forward: a micro-batch of examples -> the mean cross-entropy over the answer tokens."""

from __future__ import annotations

from typing import Any

import torch

from aqa.data.example import Example
from aqa.runtime.loaders import move_batch


def sft_loss(backbone: Any, model: Any, examples: list[Example], device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """Collate ``examples`` with the backbone (``input_ids [B, T]``, audio features such as
    ``input_features [B, M, F]``), move them to ``device`` (floating tensors to ``dtype``) and return the
    scalar loss over the answer tokens only (the prompt and audio are not trained on)."""
    batch = move_batch(backbone.collate(examples), device, dtype)
    return backbone.loss(model, batch)


def enable_gradient_checkpointing(backbone: Any) -> None:
    """Recompute every decoder layer's activations in the backward instead of keeping them (call before
    LoRA is applied). Non-reentrant checkpointing: the frozen embeddings' outputs need no gradient hook."""
    backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
