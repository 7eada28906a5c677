"""The GRPO policy on top of the SFT model, its reference, and the adapter a GRPO run hands on.

The SFT adapter is folded into the base weights, and a fresh LoRA adapter (the GRPO one) goes on the
same layers. The reference policy is then this very model with the GRPO adapter disabled: exactly
the SFT model, with no second copy in memory. With ``finetune=full`` there is no adapter to disable: the
reference is a frozen copy of the starting weights (``aqa.backbones.full.frozen_reference``), passed to
:func:`reference` as ``frozen``.

What a run exports must load onto the *base* model with plain ``PeftModel.from_pretrained``, so the
two low-rank updates are stacked into one adapter of rank ``r_sft + r_grpo``:
``s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1 ; A2]`` with scaling 1 (``lora_alpha == r``). This is
exact, not an approximation. Modules the SFT adapter trained in full (``modules_to_save``) stay frozen
during GRPO and are copied into the export unchanged.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aqa.backbones.base import Backbone
from aqa.backbones.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraConfig,
    load_adapter,
    merge_lora,
)

_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight")


def _lora_scaling(config: dict[str, Any], where: str) -> float:
    """``alpha / r`` of a plain LoRA adapter config; the variants this export cannot stack are refused."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where} is a {config.get('peft_type')} adapter; GRPO starts from a LoRA adapter.")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{where} sets {key}; GRPO supports one rank and alpha for every layer.")
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            raise AdapterError(f"{where} uses {key}; GRPO supports plain LoRA adapters only.")
    return float(config["lora_alpha"]) / float(config["r"])


def fold_sft_adapter(backbone: Backbone, sft_adapter: str | Path) -> dict[str, Any]:
    """Load and check the SFT adapter and fold it into ``backbone.model``'s weights; returns its config."""
    sft_adapter = Path(sft_adapter)
    if not sft_adapter.is_dir():
        raise AdapterError(f"sft_adapter {sft_adapter} does not exist. Train SFT first (train/sft.py) and point "
                           "sft_adapter at its <output_dir>/adapter directory.")
    load_adapter(backbone, sft_adapter)  # checks every tensor against this base first
    config = json.loads((sft_adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    _lora_scaling(config, str(sft_adapter))
    merge_lora(backbone)
    return config


def policy_from_sft(backbone: Backbone, sft_adapter: str | Path, lora: LoraConfig) -> nn.Module:
    """Load and check the SFT adapter, fold it into the weights, and add a fresh trainable GRPO adapter on
    the same target modules. Sets and returns ``backbone.model`` (a PEFT model).

    A missing or mismatched SFT adapter raises :class:`AdapterError` naming the fix.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if lora.targets is not None or lora.include_audio or lora.modules_to_save:
        raise AdapterError("lora.targets / lora.include_audio / lora.modules_to_save do not apply to GRPO: its "
                           "adapter goes on the SFT adapter's layers, so the two stack into one exported "
                           "adapter (modules the SFT adapter trained in full are folded in and stay frozen). "
                           "Set them to null/false.")
    config = fold_sft_adapter(backbone, sft_adapter)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                              target_modules=config["target_modules"])
    backbone.model = get_peft_model(backbone.model, peft_cfg)
    return backbone.model


def peft_model(model: nn.Module) -> nn.Module:
    """The PEFT model under a DeepSpeed/DDP wrapper (the object that can disable its adapter)."""
    while not hasattr(model, "disable_adapter"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} carries no PEFT adapter; build the policy with policy_from_sft.")
        model = inner
    return model


@contextlib.contextmanager
def reference(model: nn.Module, frozen: nn.Module | None = None) -> Iterator[nn.Module]:
    """The reference policy for the block, without gradients: ``frozen`` (a full fine-tune's frozen copy)
    when given, else ``model`` with its GRPO adapter off. Yields the module to score with."""
    if frozen is not None:
        with torch.no_grad():
            yield frozen
        return
    with torch.no_grad(), peft_model(model).disable_adapter():
        yield model


def _adapter_tensors(state: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """``{(module, lora_A|lora_B): tensor}`` from PEFT parameter or file names (adapter name dropped)."""
    out = {}
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        if m:
            out[(m.group("module"), m.group("kind"))] = value
    return out


def stacked_adapter(sft_adapter: str | Path, grpo_state: dict[str, torch.Tensor],
                    grpo_config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The SFT and GRPO adapters as one LoRA adapter on the base model: ``(tensors, adapter_config)``.

    ``grpo_state``: the GRPO adapter's parameters by PEFT name (fp32 masters, see
    ``checkpoint.trainable_state``); ``grpo_config``: its ``r`` and ``lora_alpha``.
    Per layer, ``lora_A`` ``[r1 + r2, in]`` and ``lora_B`` ``[out, r1 + r2]`` with the scalings folded into B;
    the SFT file's other tensors (``modules_to_save``) are copied as they are.
    """
    from safetensors.torch import load_file

    sft_adapter = Path(sft_adapter)
    config = json.loads((sft_adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    s1 = _lora_scaling(config, str(sft_adapter))
    s2 = float(grpo_config["lora_alpha"]) / float(grpo_config["r"])
    sft_file = load_file(str(sft_adapter / ADAPTER_WEIGHTS))
    sft = _adapter_tensors(sft_file)
    grpo = _adapter_tensors(grpo_state)
    if {m for m, _ in sft} != {m for m, _ in grpo}:
        raise AdapterError("the GRPO adapter's layers differ from the SFT adapter's; they cannot be stacked.")
    rank = int(config["r"]) + int(grpo_config["r"])
    tensors = {k: v.contiguous() for k, v in sft_file.items() if not _KEY.fullmatch(k)}  # modules_to_save
    for module in sorted({m for m, _ in sft}):
        a = torch.cat([sft[(module, "lora_A")].float(), grpo[(module, "lora_A")].float()], dim=0)
        b = torch.cat([s1 * sft[(module, "lora_B")].float(), s2 * grpo[(module, "lora_B")].float()], dim=1)
        tensors[f"{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{module}.lora_B.weight"] = b.contiguous()
    out_config = {**config, "r": rank, "lora_alpha": rank, "lora_dropout": float(grpo_config.get("lora_dropout", 0.0))}
    return tensors, out_config


def save_stacked_adapter(sft_adapter: str | Path, grpo_state: dict[str, torch.Tensor], grpo_config: dict[str, Any],
                         out_dir: str | Path) -> Path:
    """Write :func:`stacked_adapter` as a plain PEFT adapter directory (safetensors + config)."""
    from safetensors.torch import save_file

    tensors, config = stacked_adapter(sft_adapter, grpo_state, grpo_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def grpo_adapter_config(model: nn.Module) -> dict[str, Any]:
    """``r``, ``lora_alpha`` and ``lora_dropout`` of the policy's (default) GRPO adapter."""
    cfg = peft_model(model).peft_config["default"]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout}
