"""The Whisper-large-v3 front end of Kimi-Audio: log-mel per 30 s window and the frozen encoder.

The release's ``whisper-large-v3/`` subfolder is the stock HF layout (``config.json``,
``model.safetensors`` with ``model.encoder.*`` and ``model.decoder.*``); only the encoder is loaded,
into transformers' ``WhisperEncoder``. Audio is cut into windows of the encoder's span
(``max_source_positions`` x 2 mel frames x 160 samples: 30 s for the 7B); each window is zero-padded
to the span and turned into a 128-bin log-mel. The encoder gives 50 Hz frames; a window of L samples
keeps its first ``4 * ceil(L / 1280)`` frames, and 4 consecutive frames are concatenated into one
12.5 Hz vector (5120-d for the 7B), one per GLM semantic token of the same window.

Shapes: M windows in a batch, F mel frames per window, D encoder width, S stacked vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from aqa.backbones.kimi_audio.weights import load_into

WHISPER_SUBDIR = "whisper-large-v3"
SAMPLE_RATE = 16000
HOP_LENGTH = 160
FRAMES_PER_VECTOR = 4  # 50 Hz encoder frames stacked into one 12.5 Hz vector
SAMPLES_PER_VECTOR = HOP_LENGTH * 2 * FRAMES_PER_VECTOR  # 1280: conv2 stride 2, then 4 frames


def tokens_for_samples(num_samples: int) -> int:
    """12.5 Hz positions of a window of ``num_samples`` samples: ``ceil(L / 1280)``."""
    return (int(num_samples) - 1) // SAMPLES_PER_VECTOR + 1 if num_samples > 0 else 0


def _encoder_name(name: str) -> str | None:
    """Checkpoint name -> WhisperEncoder name; None for the decoder (stock ``model.encoder.*`` or bare ``encoder.*``)."""
    for prefix in ("model.encoder.", "encoder."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def whisper_config(directory: str | Path) -> WhisperConfig:
    """The subfolder's ``config.json`` as a ``WhisperConfig`` (plain JSON, no remote code)."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: the Kimi-Audio release keeps the Whisper encoder in {WHISPER_SUBDIR}/ (stock "
            "openai/whisper-large-v3 layout); copy that folder from the HF repo."
        )
    return WhisperConfig(**json.loads(file.read_text(encoding="utf-8")))


def build_whisper_encoder(config: WhisperConfig) -> WhisperEncoder:
    encoder = WhisperEncoder(config)
    encoder.requires_grad_(False)  # frozen: Kimi-Audio never trains it
    return encoder.eval()


def load_whisper_encoder(directory: str | Path, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> WhisperEncoder:
    """The encoder half of ``whisper-large-v3/`` (decoder tensors are skipped), frozen, in eval mode."""
    config = whisper_config(directory)
    with torch.device("meta"):
        encoder = build_whisper_encoder(config)
    load_into(encoder, directory, rename=_encoder_name, dtype=dtype, device=device)
    return encoder.eval()


def save_whisper_encoder(encoder: WhisperEncoder, directory: str | Path) -> None:
    """Write the encoder as the stock subfolder layout (``model.encoder.*``), with config and preprocessor."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(out)
    state = {f"model.encoder.{k}": v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    whisper_feature_extractor(out, encoder.config).save_pretrained(out)


def whisper_feature_extractor(directory: str | Path, config: WhisperConfig | None = None) -> WhisperFeatureExtractor:
    """``preprocessor_config.json`` of the subfolder, or one matching the encoder's span and mel bins."""
    directory = Path(directory)
    config = config or whisper_config(directory)
    span_frames = config.max_source_positions * 2
    if (directory / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(directory)
    else:
        fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE,
                                     hop_length=HOP_LENGTH, chunk_length=span_frames * HOP_LENGTH // SAMPLE_RATE)
    if fe.feature_size != config.num_mel_bins or fe.nb_max_frames != span_frames or fe.hop_length != HOP_LENGTH:
        raise ValueError(
            f"{directory}: preprocessor_config.json ({fe.feature_size} mel, {fe.nb_max_frames} frames, hop "
            f"{fe.hop_length}) does not match the encoder ({config.num_mel_bins} mel, {span_frames} frames, hop "
            f"{HOP_LENGTH}); fix one of the two files."
        )
    return fe


def window_samples(fe: WhisperFeatureExtractor) -> int:
    """Samples per encoder window (480000 = 30 s for whisper-large-v3)."""
    return int(fe.n_samples)


def log_mel_windows(wave: np.ndarray, fe: WhisperFeatureExtractor) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz mono ``[L]`` -> log-mel ``[n_mels, C * F]`` (C windows side by side) and window lengths ``[C]``.

    Each window is zero-padded to the encoder span before the log-mel, as Kimi-Audio does, so the
    dynamic-range floor (max - 8) is that of the padded window.
    """
    span = window_samples(fe)
    if span % SAMPLES_PER_VECTOR:
        raise ValueError(f"the Whisper window ({span} samples) must be a multiple of {SAMPLES_PER_VECTOR}.")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"expected a non-empty mono wave [S], got shape {wave.shape}.")
    pieces = [wave[i : i + span] for i in range(0, wave.size, span)]
    mels = [
        fe(p, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=span, truncation=True,
           return_tensors="np")["input_features"][0]
        for p in pieces
    ]
    return np.concatenate(mels, axis=1).astype(np.float32), np.asarray([p.size for p in pieces], dtype=np.int64)


def stack_frames(encoded: torch.Tensor, vectors_per_window: torch.Tensor) -> torch.Tensor:
    """Encoder output ``[M, F/2, D]`` and 12.5 Hz positions per window ``[M]`` -> ``[S, 4 * D]``.

    Window m keeps its first ``4 * vectors_per_window[m]`` frames; 4 consecutive frames make a vector.
    """
    out = []
    for frames, n in zip(encoded, vectors_per_window.tolist()):
        n = int(n)
        if n * FRAMES_PER_VECTOR > frames.shape[0]:
            raise ValueError(f"a window asks for {n} vectors but the encoder gives {frames.shape[0]} frames.")
        out.append(frames[: n * FRAMES_PER_VECTOR].reshape(n, FRAMES_PER_VECTOR * frames.shape[-1]))
    return torch.cat(out, dim=0)
