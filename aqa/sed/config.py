"""BEATs' model config (the official ``BEATsConfig`` fields) read from and written to JSON.

A SED model directory holds ``config.json`` (this), ``model.safetensors`` and ``labels.json`` (see
:mod:`aqa.sed.labels`). The defaults are those of the official ``BEATsConfig`` class; a checkpoint's
``cfg`` dict overrides them, exactly as the official loader does. The fbank normalisation constants
are part of the model (BEATs was pre-trained on features normalised with them), so they live here too.
Shipped variants: ``configs/cascade/beats/as2m_finetuned.json`` (527 AudioSet classes, the
``iter3+ AS2M cpt2`` structure) and ``configs/cascade/beats/strong_447.json`` (447 AudioSet-Strong classes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aqa.errors import UserError

CONFIG_FILE = "config.json"
MODEL_TYPE = "beats"


class BeatsConfigError(UserError, ValueError):
    """A BEATs config that cannot build the model; the message names the key and the fix."""


@dataclass
class BeatsConfig:
    """Structure and regularisation of a BEATs model (field names as in the official checkpoints' ``cfg``)."""

    input_patch_size: int = -1  # patch side in fbank frames and mel bins (16: 160 ms x 16 bins)
    embed_dim: int = 512  # patch embedding width
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0  # gradient into layer i is scaled by this (fine-tuning)
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128  # kernel of the convolutional positional embedding
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False  # True: a per-token class predictor (the SED head) exists
    predictor_dropout: float = 0.1
    predictor_class: int = 527
    # fbank normalisation of the official preprocess(): (fbank - mean) / (2 * std)
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    num_mel_bins: int = 128

    def __post_init__(self) -> None:
        if self.input_patch_size <= 0:
            raise BeatsConfigError("input_patch_size must be positive (16 for every released BEATs).")
        if self.num_mel_bins % self.input_patch_size:
            raise BeatsConfigError(f"num_mel_bins {self.num_mel_bins} is not a multiple of input_patch_size "
                                   f"{self.input_patch_size}.")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise BeatsConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                                   f"encoder_attention_heads {self.encoder_attention_heads}.")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise BeatsConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                                   f"conv_pos_groups {self.conv_pos_groups}.")
        if self.deep_norm and self.layer_norm_first:
            raise BeatsConfigError("deep_norm and layer_norm_first cannot both be true (as in the official model).")
        if self.activation_fn not in ("gelu", "relu"):
            raise BeatsConfigError(f"activation_fn {self.activation_fn!r} is not supported; use gelu or relu.")
        if self.gru_rel_pos and self.encoder_embed_dim // self.encoder_attention_heads < 1:
            raise BeatsConfigError("gru_rel_pos needs a head dimension of at least 1.")

    @property
    def freq_patches(self) -> int:
        """Tokens per 160 ms row: mel bins / patch side (8 for BEATs)."""
        return self.num_mel_bins // self.input_patch_size

    @property
    def frames_per_row(self) -> int:
        """fbank frames (10 ms hop) per token row (16 -> rows every 160 ms)."""
        return self.input_patch_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> tuple[BeatsConfig, list[str]]:
        """Build from a dict (``model_type`` allowed); returns ``(config, ignored keys)``.

        ``strict``: an unknown key is an error (our own ``config.json``). Official checkpoints' ``cfg``
        dicts are read with ``strict=False`` and their extra keys come back to be reported.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k != "model_type"}
        unknown = sorted(k for k in data if k not in fields)
        if unknown and strict:
            raise BeatsConfigError(f"unknown BEATs config keys {unknown}; known keys: {', '.join(sorted(fields))}.")
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                continue
            default = fields[key].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise BeatsConfigError(f"BEATs config '{key}' must be true or false, got {value!r}.")
            elif isinstance(default, int):
                if isinstance(value, bool) or not (isinstance(value, int) or
                                                   (isinstance(value, float) and value.is_integer())):
                    raise BeatsConfigError(f"BEATs config '{key}' must be an integer, got {value!r}.")
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise BeatsConfigError(f"BEATs config '{key}' must be a number, got {value!r}.")
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs), unknown

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}


def read_sed_json(path: str | Path, name: str, error: type[Exception], what: str, fix: str) -> tuple[Path, Any]:
    """``path`` (a file, or a SED directory holding ``name``) and its parsed JSON; a missing file raises
    ``error`` saying that a SED directory needs ``name`` and how to ``fix`` it."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise error(f"{what} {path} does not exist; a SED directory needs {name} ({fix}).")
    return path, json.loads(path.read_text(encoding="utf-8"))


def load_beats_config(path: str | Path) -> BeatsConfig:
    """Read a BEATs ``config.json`` (a file, or a directory holding one)."""
    path, data = read_sed_json(path, CONFIG_FILE, BeatsConfigError, "BEATs config",
                               "write one with python -m aqa.sed.convert or python -m aqa.sed.tiny")
    if not isinstance(data, dict):
        raise BeatsConfigError(f"{path} must hold a JSON object of BEATs config keys.")
    if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise BeatsConfigError(f"{path} is a {data['model_type']!r} config, not a BEATs one.")
    return BeatsConfig.from_dict(data, strict=True)[0]


def save_beats_config(cfg: BeatsConfig, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
