"""LoRA on a backbone with peft: apply from a small config, load an adapter safely, merge for export, and
merged copies of the LoRA'd weights for rollouts (:class:`MergedLora`, the base weights left untouched).

The adapter files are plain PEFT (``adapter_config.json`` + ``adapter_model.safetensors``), loadable by
``PeftModel.from_pretrained``. Loading checks the adapter against the base first, because peft loads
a mismatched adapter with only a warning (missing keys) and then scores garbage.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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


# -- merged weights for rollouts ------------------------------------------------------------------------------
def lora_linears(model: nn.Module) -> list[nn.Module]:
    """PEFT's LoRA linear layers in ``model`` (module order; embeddings and other LoRA kinds are left out)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # no peft: no LoRA
        return []
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def _active_adapters(layer: nn.Module) -> list[str]:
    """The adapters PEFT's forward adds to this layer's base output now: none when adapters are disabled or
    already merged into the base weight (then the base layer alone is the layer's output)."""
    if layer.disable_adapters or layer.merged:
        return []
    return [a for a in layer.active_adapters if a in layer.lora_A.keys()]


class MergedLora:
    """Persistent merged weights ``W + sum_a scaling_a * B_a A_a`` of every LoRA linear layer of a model, and a
    context in which those layers compute ``x @ merged.T + bias`` with the LoRA branch off.

    For rollouts (``grpo.rollout.merge_lora``): each LoRA'd linear then runs one matmul instead of the base
    matmul plus about four small kernels (``x @ A``, ``@ B``, scale, add). The base weights and the LoRA
    weights are only read, never written, so every forward outside :meth:`patched` (the loss's log-probs, the
    reference with the adapter off) computes exactly what it did before. That is the difference from PEFT's
    ``merge()``/``unmerge()``, which writes ``W + BA`` into the base weight and subtracts it again: in bf16
    ``W + BA - BA != W`` after rounding. What the merged layers compute is the LoRA'd layer up to the rounding
    of one addition, so a rollout's samples come from the policy to within bf16 rounding, as the unmerged
    kernels' own rounding does.

    Cost: one buffer per LoRA linear layer, the size, dtype and device of its base weight (one more copy of
    every LoRA'd weight: about 13 GB for Qwen2-Audio-7B's LM linear layers in bf16). :meth:`refresh` rewrites
    the buffers in place (``addmm``), so a CUDA graph captured over them stays valid as the adapter trains;
    when the model's LoRA layers change they are reallocated and :attr:`version` grows (a graph captured over
    the old buffers must not be replayed).

    Exactly what PEFT's forward adds is merged: the active adapters (``set_adapter``), none while adapters are
    disabled (``disable_adapter()``) or merged already, with each adapter's ``scaling`` and ``fan_in_fan_out``.
    LoRA dropout cannot be merged: a layer in training mode with dropout > 0 is refused (rollouts run in eval
    mode). DoRA and the other PEFT LoRA variants, and ``lora_bias``, are refused too. Modules trained in full
    (``modules_to_save``) are no LoRA layers: they run as they are. A model without LoRA layers has nothing
    to merge: the context changes nothing.
    """

    def __init__(self) -> None:
        self.layers: list[nn.Module] | None = None  # held: their ids cannot be reused while the buffers exist
        self.buffers: list[torch.Tensor] = []
        self.version = 0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> int:
        """Merge the LoRA layers of ``model`` as they are now into the buffers (in place when the layers are
        the ones of the last call); returns :attr:`version`."""
        layers = lora_linears(model)
        for layer in layers:
            _check_mergeable(layer)
        if not self._same(layers):
            self.layers, self.buffers = None, []  # free the old buffers before the new ones are allocated
            self.buffers = [torch.empty_like(layer.get_base_layer().weight) for layer in layers]
            self.layers = layers
            self.version += 1
        for layer, out in zip(layers, self.buffers):
            _merge_into(layer, out)
        return self.version

    def _same(self, layers: list[nn.Module]) -> bool:
        if self.layers is None or len(layers) != len(self.layers):
            return False
        for layer, old, buf in zip(layers, self.layers, self.buffers):
            weight = layer.get_base_layer().weight
            if layer is not old or (weight.shape, weight.dtype, weight.device) != (buf.shape, buf.dtype, buf.device):
                return False
        return True

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Within the block, every layer of the last :meth:`refresh` computes ``x @ merged.T + bias``."""
        saved = []  # (layer, the instance forward it had, if any)
        try:
            for layer, merged in zip(self.layers or [], self.buffers):
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = _merged_forward(layer, merged)
            yield
        finally:
            for layer, forward in saved:
                if forward is None:
                    del layer.forward  # back to the class's forward
                else:
                    layer.forward = forward


def _merged_forward(layer: nn.Module, merged: torch.Tensor):
    base = layer.get_base_layer()
    weight = merged.T if layer.fan_in_fan_out else merged  # Conv1D-style layers store [in, out]
    bias = getattr(base, "bias", None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    return forward


def _check_mergeable(layer: nn.Module) -> None:
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not (
            isinstance(base, nn.Linear) or layer.fan_in_fan_out):
        raise ValueError(f"merged LoRA rollouts need a plain linear base layer; {type(base).__name__} is not one "
                         "(a quantized base?). Set grpo.rollout.merge_lora=false.")
    for adapter in _active_adapters(layer):
        if adapter in layer.lora_variant:
            raise ValueError(f"LoRA adapter '{adapter}' is a {type(layer.lora_variant[adapter]).__name__} (DoRA or "
                             "another LoRA variant), which merged rollouts do not compute. Set "
                             "grpo.rollout.merge_lora=false.")
        if layer.lora_bias.get(adapter, False):
            raise ValueError(f"LoRA adapter '{adapter}' trains a bias (lora_bias), which merged rollouts do not "
                             "compute. Set grpo.rollout.merge_lora=false.")
        dropout = layer.lora_dropout[adapter]
        if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError(f"LoRA dropout ({dropout.p}) is on (the model is in training mode); merged weights "
                             "cannot apply it. Sample in eval mode (the backbones' generate does).")


def _merge_into(layer: nn.Module, out: torch.Tensor) -> None:
    """``out = W + sum_a scaling_a * B_a A_a`` (transposed for ``fan_in_fan_out``): one ``addmm`` into ``out`` per
    adapter when the adapter weights have ``out``'s dtype; else the updates summed in the wider dtype (PEFT keeps
    fp32 adapter weights on a bf16 model unless the engine casts them) and added to ``W``, rounded once."""
    weight = layer.get_base_layer().weight
    terms = []
    for adapter in _active_adapters(layer):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        terms.append(((a.T, b.T) if layer.fan_in_fan_out else (b, a), float(layer.scaling[adapter])))
    if not terms:
        out.copy_(weight)
        return
    dtype = out.dtype
    for (m1, m2), _ in terms:
        dtype = torch.promote_types(dtype, torch.promote_types(m1.dtype, m2.dtype))
    if dtype == out.dtype:
        (m1, m2), scale = terms[0]
        torch.addmm(weight, m1, m2, alpha=scale, out=out)
        for (m1, m2), scale in terms[1:]:
            out.addmm_(m1, m2, alpha=scale)
        return
    delta = None  # the sum of the scaled updates in the wider dtype (PEFT's fp32 adapter on a bf16 model)
    for (m1, m2), scale in terms:
        m1, m2 = m1.to(dtype), m2.to(dtype)
        delta = torch.mm(m1, m2).mul_(scale) if delta is None else delta.addmm_(m1, m2, alpha=scale)
    torch.add(weight, delta, out=out)  # computed in the wider dtype, rounded once into out
