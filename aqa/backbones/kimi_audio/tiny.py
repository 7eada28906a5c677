"""A tiny random-init Kimi-Audio written in the release's directory layout.

    out/config.json                          KimiAudioConfig (model_type moonshot_kimia, tiny ids)
    out/model-{i}-of-{n}.safetensors         the 419 LM tensors + per-layer rotary_emb.inv_freq, as released
    out/model.safetensors.index.json
    out/tiktoken.model, tokenizer_config.json  the text tokenizer (a small byte-level BPE)
    out/whisper-large-v3/                    a stock-layout WhisperForConditionalGeneration + preprocessor
    out/glm-4-voice-tokenizer/               the speech tokenizer (+ its EMA buffers, as released)

It is then loaded by exactly the loader of the 7B. Sizes come from :class:`TinyKimiAudioSpec`; the
special tokens are compact (ids right after the BPE vocabulary), written into config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aqa.backbones.kimi_audio.config import SPECIAL_TOKEN_FIELDS, KimiAudioConfig
from aqa.backbones.kimi_audio.glm_tokenizer import (
    SPEECH_TOKENIZER_SUBDIR,
    GlmSpeechTokenizer,
    GlmTokenizerConfig,
)
from aqa.backbones.kimi_audio.model import KimiAudioForCausalLM
from aqa.backbones.kimi_audio.text_tokenizer import KimiTextTokenizer, train_byte_bpe
from aqa.backbones.kimi_audio.weights import save_shards
from aqa.backbones.kimi_audio.whisper import SAMPLE_RATE, WHISPER_SUBDIR

# Text the tiny BPE learns its merges from: the words prompts and answers are made of.
_CORPUS = (
    "what which when where how many sound sounds heard first last before after during between the a an of in "
    "is are was there audio clip recording question answer option options letter choose correct "
    "dog bark cat bird siren car horn engine train rain thunder wind water speech man woman child laugh cough "
    "door knock footsteps music piano guitar drum bell alarm phone whale call calls click whistle species animal "
    "loud quiet longer shorter count times once twice none both all other yes no start end second seconds. "
    "Answer with the option's letter."
)
_BOS, _EOS, _PAD = "[BOS]", "[EOS]", "[PAD]"


@dataclass
class TinyKimiAudioSpec:
    """Sizes of a tiny Kimi-Audio; 7B values in comments."""

    bpe_vocab_size: int = 384  # 151643
    hidden_size: int = 64  # 3584
    num_hidden_layers: int = 4  # 28
    num_attention_heads: int = 4  # 28
    num_key_value_heads: int = 2  # 4
    intermediate_size: int = 128  # 18944
    mimo_layers: int = 2  # 6
    mimo_from_layer: int = 2  # 21
    max_position_embeddings: int = 2048  # 8192
    rope_theta: float = 10000.0  # (1e6 believed for the 7B)
    whisper_d_model: int = 32  # 1280 (adaptor input = 4 x this)
    whisper_layers: int = 2  # 32
    whisper_heads: int = 2  # 20
    whisper_ffn_dim: int = 64  # 5120
    window_seconds: int = 4  # 30: Whisper and GLM windows (a multiple of 0.08 s)
    glm_d_model: int = 32  # 1280
    glm_layers: int = 2  # 16
    glm_heads: int = 2  # 20
    glm_ffn_dim: int = 64  # 5120
    glm_block_frames: int = 50  # 200 (4 s at 50 Hz)
    codebook_size: int = 64  # 16384
    num_shards: int = 3  # 36
    # 7B: 0.02 (LM and Whisper). At width 64 a weight std of 0.02 shrinks every branch ~6x and a random tiny
    # model learns next to nothing from its audio; 0.1 ~ 1/sqrt(64) keeps the per-layer gain near 1.
    initializer_range: float = 0.1
    extra_corpus: list[str] = field(default_factory=list)


def tiny_text_tokenizer(spec: TinyKimiAudioSpec) -> KimiTextTokenizer:
    """A byte-level BPE of ``spec.bpe_vocab_size`` ranks; specials right after it, pad last."""
    ranks = train_byte_bpe([_CORPUS, _CORPUS.title(), *spec.extra_corpus], spec.bpe_vocab_size)
    names = [_BOS, _EOS, *SPECIAL_TOKEN_FIELDS.values(), _PAD]
    return KimiTextTokenizer(ranks, {name: len(ranks) + i for i, name in enumerate(names)})


def tiny_kimi_config(spec: TinyKimiAudioSpec, tokenizer: KimiTextTokenizer) -> KimiAudioConfig:
    specials = tokenizer.special_tokens
    offset = max(specials.values()) + 1  # audio codes follow the text vocabulary
    config = KimiAudioConfig(
        vocab_size=offset + spec.codebook_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings, rope_parameters={"rope_type": "default",
        "rope_theta": spec.rope_theta}, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=specials[_BOS], eos_token_id=specials[_EOS], pad_token_id=specials[_PAD],
        kimia_mimo_layers=spec.mimo_layers, kimia_mimo_transformer_from_layer_index=spec.mimo_from_layer,
        kimia_adaptor_input_dim=4 * spec.whisper_d_model, kimia_token_offset=offset,
        kimia_text_output_vocab=offset, kimia_audio_output_vocab=spec.codebook_size,
        num_base_tokens=tokenizer.num_base_tokens, initializer_range=spec.initializer_range,
        **{name: specials[token] for name, token in SPECIAL_TOKEN_FIELDS.items()},
    )
    config.architectures = ["MoonshotKimiaForCausalLM"]
    config.check()
    return config


def _write_language_model(config: KimiAudioConfig, out: Path, seed: int, num_shards: int) -> None:
    torch.manual_seed(seed)
    lm = KimiAudioForCausalLM(config)
    state = dict(lm.state_dict())
    # the release also stores each attention layer's RoPE inv_freq; keep that quirk so loading drops it
    inv_freq = lm.model.rotary_emb.inv_freq.detach().clone()
    for group, count in (("layers", config.num_hidden_layers), ("mimo_layers", config.kimia_mimo_layers)):
        for i in range(count):
            state[f"model.{group}.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    config.save_pretrained(out)
    save_shards(state, out, num_shards=num_shards)


def _write_whisper(spec: TinyKimiAudioSpec, out: Path, seed: int) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    positions = spec.window_seconds * SAMPLE_RATE // 320  # 50 encoder frames per second
    config = WhisperConfig(
        vocab_size=64, num_mel_bins=128, d_model=spec.whisper_d_model, encoder_layers=spec.whisper_layers,
        decoder_layers=1, encoder_attention_heads=spec.whisper_heads, decoder_attention_heads=spec.whisper_heads,
        encoder_ffn_dim=spec.whisper_ffn_dim, decoder_ffn_dim=spec.whisper_ffn_dim, max_source_positions=positions,
        max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
        begin_suppress_tokens=None, suppress_tokens=None, init_std=spec.initializer_range,
    )
    torch.manual_seed(seed + 1)
    WhisperForConditionalGeneration(config).save_pretrained(out)  # stock layout: model.encoder.*, model.decoder.*
    WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=160,
                            chunk_length=spec.window_seconds).save_pretrained(out)


def _write_speech_tokenizer(spec: TinyKimiAudioSpec, out: Path, seed: int) -> None:
    config = GlmTokenizerConfig(
        num_mel_bins=128, d_model=spec.glm_d_model, encoder_attention_heads=spec.glm_heads,
        encoder_ffn_dim=spec.glm_ffn_dim, max_source_positions=spec.window_seconds * SAMPLE_RATE // 320,
        quantize_position=spec.glm_layers, pooling_position=spec.glm_layers, quantize_vocab_size=spec.codebook_size,
        quantize_causal_block_size=spec.glm_block_frames,
    )
    torch.manual_seed(seed + 2)
    GlmSpeechTokenizer(config).save_pretrained(out)
    # the released file also carries the EMA codebook buffers of VQ training
    weights = load_file(str(out / "model.safetensors"))
    weights["ema_count"] = torch.ones(spec.codebook_size)
    weights["ema_weight"] = weights["codebook.weight"].clone()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_kimi_audio(out_dir: str | Path, seed: int = 0, spec: TinyKimiAudioSpec | None = None) -> Path:
    """Write a tiny random Kimi-Audio release to ``out_dir``; same seed and spec, same files."""
    spec = spec or TinyKimiAudioSpec()
    if (spec.window_seconds * SAMPLE_RATE) % 1280:
        raise ValueError("window_seconds must be a multiple of 0.08 s (1280 samples).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_text_tokenizer(spec)
    config = tiny_kimi_config(spec, tokenizer)
    _write_language_model(config, out, seed, spec.num_shards)
    tokenizer.save_pretrained(out)
    _write_whisper(spec, out / WHISPER_SUBDIR, seed)
    _write_speech_tokenizer(spec, out / SPEECH_TOKENIZER_SUBDIR, seed)
    (out / "tiny_spec.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2) + "\n", encoding="utf-8")
    return out
