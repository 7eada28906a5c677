"""Merge a LoRA adapter into its base model and write a plain HF model directory.

    python -m aqa.export --adapter runs/qwen2_audio/sft/adapter --out runs/qwen2_audio/merged [--base DIR]

The base is the adapter's ``base_model_name_or_path`` unless ``--base`` is given; the backbone is
the one that declares the base's ``config.json`` ``model_type`` (``Backbone.model_types``) unless
``--backbone`` is given. The result holds safetensors weights plus the processor files, in the base's
own layout, and loads with the model class's plain ``from_pretrained`` (a transformers model's, or the
release loader of a backbone implemented here), no peft needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from aqa.backbones.lora import ADAPTER_CONFIG, AdapterError, load_adapter, merge_lora


def adapter_base(adapter_dir: str | Path) -> Path:
    """The base model directory an adapter records (``base_model_name_or_path``)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} has no {ADAPTER_CONFIG}: pass the adapter directory of an SFT/GRPO run.")
    base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{path} does not name its base model; pass --base DIR.")
    return Path(base)


def backbone_name_for(model_dir: str | Path) -> str:
    """The name of the registered backbone that declares the directory's ``model_type``."""
    from aqa.backbones import backbone_for_model_type

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"base model directory {model_dir} has no config.json; pass --base DIR.")
    model_type = str(json.loads(config.read_text(encoding="utf-8")).get("model_type"))
    try:
        return backbone_for_model_type(model_type).name
    except ValueError as err:
        raise ValueError(f"{err} Pass --backbone NAME for a {model_type} checkpoint.") from err


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
                  backbone: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Load base + adapter (checked to match), merge LoRA into the weights, save model + processor."""
    from aqa.backbones import get_backbone

    base = Path(base) if base else adapter_base(adapter_dir)
    name = backbone or backbone_name_for(base)
    bb = get_backbone(name).from_pretrained(base, dtype=dtype)
    load_adapter(bb, adapter_dir)
    model = merge_lora(bb)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors
    bb.save_processor(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--base", default=None, help="base model dir (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--backbone", default=None, help="backbone name (default: the base's model_type)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    out = export_merged(args.adapter, args.out, args.base, args.backbone, getattr(torch, args.dtype))
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
