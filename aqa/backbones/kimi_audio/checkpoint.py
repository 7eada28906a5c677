"""Kimi-Audio's checkpoint check (``KimiAudioBackbone.checkpoint_checker()``, run by ``aqa.check_checkpoint``).

Three parts, each built on the meta device and compared with the checkpoint's names and shapes:

* the language model from ``config.json`` vs the root index (the 34 ``rotary_emb.inv_freq``
  buffers of the release are dropped on load, and reported as such);
* the Whisper encoder vs ``whisper-large-v3/`` (stock layout; the decoder is not used);
* the GLM-4-Voice speech tokenizer vs its ``model.safetensors`` (247 tensors; EMA buffers unused).

The index is either the names/shapes listing of ``tests/fixtures/kimi_audio_7b_params.json`` (a copy of the official listing)
(sections ``model``, ``model_checkpoint_extra_buffers``, ``whisper_large_v3_subfolder_hf_layout``,
``glm4_voice_tokenizer``, ``glm4_voice_tokenizer_optional_ema_buffers``), checked against the
published whisper-large-v3 and glm-4-voice-tokenizer architectures, or a release directory's
``model.safetensors.index.json``, whose subfolders' own configs and headers are then used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import WhisperConfig

from aqa.backbones.checkpoint_check import PartCheck, Shapes, module_shapes
from aqa.backbones.kimi_audio.config import load_kimi_config
from aqa.backbones.kimi_audio.glm_tokenizer import (
    SPEECH_TOKENIZER_SUBDIR,
    GlmSpeechTokenizer,
    GlmTokenizerConfig,
)
from aqa.backbones.kimi_audio.model import KimiAudioForCausalLM
from aqa.backbones.kimi_audio.weights import tensor_shapes
from aqa.backbones.kimi_audio.whisper import WHISPER_SUBDIR, build_whisper_encoder, whisper_config

# openai/whisper-large-v3's architecture (its config.json), for checking a names/shapes listing
# that comes without the subfolder's config.
WHISPER_LARGE_V3 = dict(
    d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20,
    encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128, max_source_positions=1500,
    max_target_positions=448, vocab_size=51866,
)

INV_FREQ = re.compile(r"rotary_emb\.inv_freq$")
WHISPER_UNUSED = re.compile(r"^(model\.decoder\.|decoder\.|proj_out\.)")
GLM_EMA = re.compile(r"^(ema_count|ema_weight)$")


def _meta(build):
    with torch.device("meta"):
        return build()


def language_model_part(config_path: Path, index: Shapes) -> PartCheck:
    config = load_kimi_config(config_path)
    built = module_shapes(_meta(lambda: KimiAudioForCausalLM(config)))
    return PartCheck("kimi_audio language model", built, index, is_unused=lambda n: bool(INV_FREQ.search(n)),
                     unused_reason="rotary_emb.inv_freq buffers in the checkpoint, recomputed and dropped on load")


def whisper_part(config: WhisperConfig, index: Shapes) -> PartCheck:
    # the stock layout prefixes the encoder with model.encoder.; finetune_codes' export writes bare encoder.
    prefix = "model.encoder." if any(n.startswith("model.encoder.") for n in index) else "encoder."
    built = module_shapes(_meta(lambda: build_whisper_encoder(config)), prefix)
    return PartCheck(f"{WHISPER_SUBDIR} encoder", built, index, is_unused=lambda n: bool(WHISPER_UNUSED.match(n)),
                     unused_reason="decoder tensors, not used")


def speech_tokenizer_part(config: GlmTokenizerConfig, index: Shapes) -> PartCheck:
    built = module_shapes(_meta(lambda: GlmSpeechTokenizer(config)))

    def unused(name: str) -> bool:  # EMA buffers, and encoder layers past the quantiser in a full checkpoint
        m = re.match(r"^layers\.(\d+)\.", name)
        return bool(GLM_EMA.match(name)) or (m is not None and int(m.group(1)) >= config.quantize_position)

    return PartCheck(SPEECH_TOKENIZER_SUBDIR, built, index, is_unused=unused,
                     unused_reason="EMA / post-quantiser tensors, not used")


def _section(listing: dict, name: str, path: Path) -> Shapes:
    if name not in listing:
        raise SystemExit(f"{path} has no '{name}' section; pass the names/shapes listing of the reference "
                         "(kimi_audio_7b_params.json) or a release's model.safetensors.index.json.")
    return listing[name]


def check_release(config_path: Path, index_path: Path) -> list[PartCheck]:
    """The three parts of Kimi-Audio against a names/shapes listing or a release index."""
    listing = json.loads(Path(index_path).read_text(encoding="utf-8"))
    if "weight_map" in listing:  # a release directory: read every shape from the safetensors headers
        root = Path(index_path).parent
        whisper_dir, glm_dir = root / WHISPER_SUBDIR, root / SPEECH_TOKENIZER_SUBDIR
        return [
            language_model_part(config_path, tensor_shapes(root)),
            whisper_part(whisper_config(whisper_dir), tensor_shapes(whisper_dir)),
            speech_tokenizer_part(GlmTokenizerConfig.from_dir(glm_dir), tensor_shapes(glm_dir)),
        ]
    model = {**_section(listing, "model", index_path), **listing.get("model_checkpoint_extra_buffers", {})}
    glm = {**_section(listing, "glm4_voice_tokenizer", index_path),
           **listing.get("glm4_voice_tokenizer_optional_ema_buffers", {})}
    return [
        language_model_part(config_path, model),
        whisper_part(WhisperConfig(**WHISPER_LARGE_V3), _section(listing, "whisper_large_v3_subfolder_hf_layout",
                                                                  index_path)),
        speech_tokenizer_part(GlmTokenizerConfig(), glm),
    ]
