"""The GLM-4-Voice speech tokenizer (THUDM/glm-4-voice-tokenizer): semantic tokens at 12.5 Hz.

A Whisper-style encoder cut at its vector-quantisation layer ("WhisperVQEncoder"):
causal conv (k3) + GELU, causal conv (k3, stride 2) + GELU -> 50 Hz, + learned positions;
``quantize_position`` (16) Whisper encoder layers under block-causal attention (a frame sees every
earlier block and its own block of ``quantize_causal_block_size`` = 200 frames = 4 s); average pool
by ``pooling_kernel_size`` (4) -> 12.5 Hz; nearest codebook row (L2) of ``quantize_vocab_size``
(16,384) -> token ids. ``embed_positions2`` acts only after quantisation (in the GLM decoder side),
so it is loaded but unused. The released ``model.safetensors`` holds 247 tensors (+ the EMA
codebook training buffers ``ema_count``/``ema_weight``, dropped on load).

Audio is processed in windows of the encoder's span (30 s), each padded only to a multiple of
1280 samples; a window of L samples yields ``ceil(L / 1280)`` tokens, the same count as Kimi's
Whisper vectors for that window.

Shapes: T mel frames, T2 = T / 2 encoder frames, D width, N tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from aqa.backbones.kimi_audio.weights import load_into

SPEECH_TOKENIZER_SUBDIR = "glm-4-voice-tokenizer"
SAMPLE_RATE = 16000
HOP_LENGTH = 160
EMA_BUFFERS = r"^(ema_count|ema_weight)$"


@dataclass
class GlmTokenizerConfig:
    """The fields of the tokenizer's ``config.json`` that shape the encoder (7B release values)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    quantize_position: int = 16  # encoder layers kept
    pooling_position: int = 16  # pool after this many layers
    pooling_kernel_size: int = 4
    pooling_type: str = "avg"
    quantize_vocab_size: int = 16384
    quantize_causal_block_size: int = 200
    encoder_causal_convolution: bool = True
    activation_function: str = "gelu"
    # The official code registers the EMA codebook buffers (ema_count, ema_weight), which the released file
    # holds, only when this is set; written so its loader meets them as expected keys. Unused here (no VQ
    # training); the release's exact value is not confirmed, 0.99 is chosen.
    quantize_ema_decay: float | None = 0.99

    @classmethod
    def from_dir(cls, directory: str | Path) -> GlmTokenizerConfig:
        file = Path(directory) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing. Kimi-Audio's semantic tokens come from THUDM/glm-4-voice-tokenizer: download "
                f"it into <model dir>/{SPEECH_TOKENIZER_SUBDIR}/ (config.json, model.safetensors, "
                "preprocessor_config.json)."
            )
        raw = json.loads(file.read_text(encoding="utf-8"))
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        config = cls(**known)
        if config.pooling_type != "avg" or not config.encoder_causal_convolution:
            raise ValueError(f"{file}: only average pooling with causal convolutions (the GLM-4-Voice tokenizer) is "
                             f"supported, got pooling_type={config.pooling_type!r}, "
                             f"encoder_causal_convolution={config.encoder_causal_convolution}.")
        if config.pooling_position != config.quantize_position:
            raise ValueError(f"{file}: pooling_position must equal quantize_position (pool, then quantise).")
        return config

    def layer_config(self) -> WhisperConfig:
        """A ``WhisperConfig`` for transformers' ``WhisperEncoderLayer`` (no dropout: inference only)."""
        cfg = WhisperConfig(d_model=self.d_model, encoder_attention_heads=self.encoder_attention_heads,
                            encoder_ffn_dim=self.encoder_ffn_dim, activation_function=self.activation_function,
                            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        cfg._attn_implementation = "sdpa"
        return cfg


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads only on the left, so frame t never sees later frames."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.left_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_padding, 0)))


def block_causal_mask(valid: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, T, T]``: query i sees key j iff ``j // block <= i // block`` and j is valid."""
    t = valid.shape[1]
    pos = torch.arange(t, device=valid.device) // block
    allowed = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :].bool()  # [B, T, T]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class GlmSpeechTokenizer(nn.Module):
    """WhisperVQEncoder up to the codebook lookup; state_dict names equal the release's 247 tensors."""

    def __init__(self, config: GlmTokenizerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = CausalConv1d(config.num_mel_bins, d, 3)
        self.conv2 = CausalConv1d(d, d, 3, stride=2)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        layer_cfg = config.layer_config()
        self.layers = nn.ModuleList(WhisperEncoderLayer(layer_cfg) for _ in range(config.quantize_position))
        self.codebook = nn.Embedding(config.quantize_vocab_size, d)
        self.embed_positions2 = nn.Embedding(-(-config.max_source_positions // config.pooling_kernel_size), d)
        self.requires_grad_(False)
        self.feature_extractor: WhisperFeatureExtractor | None = None

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> GlmSpeechTokenizer:
        """Load ``config.json`` + ``model.safetensors`` (fp32, EMA buffers dropped) and the feature extractor."""
        directory = Path(directory)
        config = GlmTokenizerConfig.from_dir(directory)
        with torch.device("meta"):
            model = cls(config)
        # layers past quantize_position (a full 32-layer checkpoint) are not part of the tokenizer
        keep = lambda n: None if n.startswith("layers.") and int(n.split(".")[1]) >= config.quantize_position else n  # noqa: E731
        load_into(model, directory, rename=keep, drop=EMA_BUFFERS, dtype=torch.float32, device=device)
        model.feature_extractor = _feature_extractor(directory, config)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        raw = {"architectures": ["WhisperVQEncoder"], "model_type": "whisper", "quantize_encoder_only": True,
               **asdict(self.config)}
        (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (self.feature_extractor or _feature_extractor(out, self.config)).save_pretrained(out)

    @property
    def window_samples(self) -> int:
        """Samples per window: the encoder span (480000 = 30 s)."""
        return self.config.max_source_positions * 2 * HOP_LENGTH

    @property
    def samples_per_token(self) -> int:
        return HOP_LENGTH * 2 * self.config.pooling_kernel_size  # 1280

    def fingerprint(self) -> str:
        """A digest of the codebook: part of the feature-cache key, so other tokenizer weights recompute tokens."""
        return hashlib.sha256(self.codebook.weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]

    def forward(self, mel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Log-mel ``[B, n_mels, T]`` (T a multiple of 8) and its frame mask ``[B, T]`` -> codes ``[B, T / 8]``."""
        h = F.gelu(self.conv1(mel))
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # [B, T2, D]
        if h.shape[1] > self.embed_positions.num_embeddings:
            raise ValueError(f"{h.shape[1]} frames exceed the tokenizer's {self.embed_positions.num_embeddings} positions.")
        h = h + self.embed_positions.weight[: h.shape[1]]
        valid = valid[:, ::2]  # conv2 stride
        mask = block_causal_mask(valid, self.config.quantize_causal_block_size, h.dtype)
        for layer in self.layers:
            h = layer(h, mask)
        k = self.config.pooling_kernel_size
        if h.shape[1] % k:
            h = F.pad(h.transpose(1, 2), (0, k - h.shape[1] % k)).transpose(1, 2)
        pooled = F.avg_pool1d(h.transpose(1, 2), k).transpose(1, 2)  # [B, N, D]
        flat = pooled.reshape(-1, pooled.shape[-1])
        book = self.codebook.weight
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)[None] - 2 * flat @ book.t()  # [B*N, K]
        return dist.argmin(dim=1).reshape(pooled.shape[:2])

    @torch.no_grad()
    def tokenize(self, wave: np.ndarray) -> np.ndarray:
        """16 kHz mono ``[L]`` -> codes ``[N]`` int64, ``N = sum over windows of ceil(L_w / 1280)``. Deterministic."""
        fe = self.feature_extractor or _feature_extractor(None, self.config)
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"expected a non-empty mono wave [S], got shape {wave.shape}.")
        device = self.codebook.weight.device
        out = []
        for start in range(0, wave.size, self.window_samples):
            piece = wave[start : start + self.window_samples]
            feats = fe(piece, sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="pt",
                       padding="longest", pad_to_multiple_of=self.samples_per_token)
            mel = feats["input_features"].to(device=device, dtype=torch.float32)
            valid = feats["attention_mask"].to(device)
            codes = self(mel, valid)  # [1, T/8]
            keep = valid[:, :: 2 * self.config.pooling_kernel_size].bool()
            out.append(codes[keep].cpu())
        return torch.cat(out).numpy().astype(np.int64)


def _feature_extractor(directory: Path | None, config: GlmTokenizerConfig) -> WhisperFeatureExtractor:
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(directory)
    else:
        span = config.max_source_positions * 2 * HOP_LENGTH
        fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE,
                                     hop_length=HOP_LENGTH, chunk_length=span // SAMPLE_RATE)
    if fe.feature_size != config.num_mel_bins or fe.hop_length != HOP_LENGTH:
        raise ValueError(f"the speech tokenizer's preprocessor_config.json ({fe.feature_size} mel, hop {fe.hop_length}) "
                         f"does not fit its encoder ({config.num_mel_bins} mel, hop {HOP_LENGTH}).")
    return fe
