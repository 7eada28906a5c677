"""Kimi-Audio as it trains: the language model (the 419 release tensors) plus the frozen Whisper encoder.

``KimiAudio.forward`` takes a batch from the backbone's ``collate``: the two streams, the log-mel
windows of every clip in the batch, and how many 12.5 Hz vectors each window contributes. It runs
the encoder (frozen, no gradient unless LoRA was put on it), stacks 4 frames per vector and hands
the vectors to the LM, which adds them at the continuous positions.

``save_pretrained`` writes the release layout (root shards + index + config.json, and
``whisper-large-v3/``), so a merged LoRA export loads with the same loader as the 7B.

Shapes: B rows, T positions, M windows in the batch, F mel frames per window, S vectors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from aqa.backbones.kimi_audio.config import KimiAudioConfig, load_kimi_config
from aqa.backbones.kimi_audio.model import KimiAudioForCausalLM, KimiAudioOutput
from aqa.backbones.kimi_audio.weights import load_into, save_shards
from aqa.backbones.kimi_audio.whisper import (
    WHISPER_SUBDIR,
    load_whisper_encoder,
    save_whisper_encoder,
    stack_frames,
)

# the release's per-layer RoPE buffers: present in its index, recomputed here
INV_FREQ = r"rotary_emb\.inv_freq$"


def load_language_model(directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", config: KimiAudioConfig | None = None) -> KimiAudioForCausalLM:
    """Build the LM on the meta device, assign the release's sharded safetensors, drop ``inv_freq``.

    The dropped ``inv_freq`` buffers are checked against the config's ``rope_theta`` first: a
    mismatch means config.json and the weights disagree on RoPE, which would corrupt every output.
    """
    directory = Path(directory)
    config = config or load_kimi_config(directory)
    with torch.device("meta"):
        lm = KimiAudioForCausalLM(config)
    dropped = load_into(lm, directory, drop=INV_FREQ, dtype=dtype, device=device)
    # non-persistent buffers were created on meta; rebuild RoPE on the real device
    rotary = type(lm.model.rotary_emb)(config)
    lm.model.rotary_emb = rotary.to(device)
    _check_rope(directory, dropped, rotary.inv_freq)
    lm.name_or_path = str(directory)
    return lm.eval()


def _check_rope(directory: Path, names: list[str], inv_freq: torch.Tensor) -> None:
    if not names:
        return
    from safetensors import safe_open

    from aqa.backbones.kimi_audio.weights import weight_map

    file = weight_map(directory)[names[0]]
    with safe_open(str(file), framework="pt") as fh:
        stored = fh.get_tensor(names[0]).float()
    if stored.shape != inv_freq.shape or not torch.allclose(stored, inv_freq.float().cpu(), rtol=1e-2, atol=0):
        dim = 2 * stored.numel()
        implied = float(stored[1] ** (-dim / 2.0)) if stored.numel() > 1 else float("nan")
        raise ValueError(
            f"{names[0]} in the checkpoint implies rope_theta ~ {implied:.6g}, but config.json gives a different "
            "RoPE: set rope_theta in config.json to the checkpoint's value."
        )


class KimiAudio(nn.Module):
    """LM + Whisper encoder; the module the backbone hands to recipes (PEFT wraps it)."""

    def __init__(self, lm: KimiAudioForCausalLM, whisper: nn.Module):
        super().__init__()
        self.lm = lm
        self.whisper = whisper
        self.whisper.requires_grad_(False)
        self.name_or_path = getattr(lm, "name_or_path", "")

    @property
    def config(self) -> KimiAudioConfig:
        return self.lm.config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Recompute the LM's layers in the backward (transformers' ``activation_checkpointing_enable``)."""
        self.lm.activation_checkpointing_enable(**kwargs)

    def encode_audio(self, whisper_mel: torch.Tensor, whisper_vectors: torch.Tensor) -> torch.Tensor:
        """Log-mel windows ``[M, n_mels, F]`` and vectors per window ``[M]`` -> stacked features ``[S, 4 * D]``."""
        trainable = any(p.requires_grad for p in self.whisper.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            encoded = self.whisper(whisper_mel.to(self.lm.dtype)).last_hidden_state  # [M, F/2, D]
        return stack_frames(encoded, whisper_vectors)

    def forward(
        self, input_ids: torch.Tensor, text_input_ids: torch.Tensor, is_continuous_mask: torch.Tensor,
        whisper_mel: torch.Tensor | None = None, whisper_vectors: torch.Tensor | None = None,
        whisper_features: torch.Tensor | None = None, **kwargs,
    ) -> KimiAudioOutput:
        """Collated batch -> :class:`KimiAudioOutput`. Pass ``whisper_mel`` + ``whisper_vectors`` or ready
        ``whisper_features`` ``[S, 4 * D]`` (shared across option orders); other kwargs go to the LM."""
        if whisper_features is None and whisper_mel is not None:
            if whisper_vectors is None:
                raise ValueError("whisper_mel needs whisper_vectors (12.5 Hz vectors per window).")
            whisper_features = self.encode_audio(whisper_mel, whisper_vectors)
        return self.lm(input_ids=input_ids, text_input_ids=text_input_ids, is_continuous_mask=is_continuous_mask,
                       whisper_features=whisper_features, **kwargs)

    def save_pretrained(self, out_dir: str | Path, num_shards: int = 1, **_: object) -> None:
        """Release layout: ``model-*-of-N.safetensors`` + index + config.json, and ``whisper-large-v3/``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lm.config.save_pretrained(out)
        save_shards(dict(self.lm.state_dict()), out, num_shards=num_shards)
        save_whisper_encoder(self.whisper, out / WHISPER_SUBDIR)


def load_kimi_audio(directory: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> KimiAudio:
    """The LM from the release root and the encoder from ``whisper-large-v3/``."""
    directory = Path(directory)
    lm = load_language_model(directory, dtype=dtype, device=device)
    whisper = load_whisper_encoder(directory / WHISPER_SUBDIR, dtype=dtype, device=device)
    return KimiAudio(lm, whisper)
