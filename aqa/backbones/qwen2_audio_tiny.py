"""A tiny random-init Qwen2-Audio, written as a normal Hugging Face directory (``python -m aqa.tiny qwen2_audio``).

A tiny model is not a special code path: it is written to disk with the same files a real checkpoint
has (``config.json``, ``model.safetensors``, tokenizer files with the real special tokens and chat
template, ``preprocessor_config.json``) and is then loaded by exactly the code that loads
Qwen2-Audio-7B-Instruct. Only its sizes differ, and (for CPU speed) its audio window: the Whisper
front end pads every clip to ``chunk_seconds``, and the encoder's ``max_source_positions`` is set to
match (7B: 30 s -> 3000 mel frames -> 1500 positions). The tiny text LLM (``text_llm_tiny``) trains its
tokenizer with :func:`train_tokenizer` too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

if TYPE_CHECKING:
    from aqa.backbones.text_llm_tiny import TinyQwen2TextSpec

# The real Qwen2-Audio special tokens, in the order the real vocabulary appends them after its BPE
# vocabulary (151643..151648), so ids relate to each other as they do in the 7B checkpoint.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS]

# The Qwen2 pre-tokenizer pattern (digits split one by one, punctuation runs, newline runs).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of Qwen2-Audio-7B-Instruct (its processor's template), verbatim in behaviour:
# an implicit default system turn, "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n" per audio item.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Text the tiny BPE is trained on: the words prompts and answers are made of. Content barely matters
# (the model is random) but real merges make token counts look like a real tokenizer's.
_CORPUS_WORDS = (
    "what which when where how many sound sounds heard first last before after during between the a an of in "
    "is are was there audio clip recording question answer option options letter choose correct you a helpful "
    "assistant system user dog bark barking cat meow bird birds chirp chirping siren car horn engine train rain "
    "thunder wind water speech speaking man woman child laugh laughter cough door knock footsteps music piano "
    "guitar drum bell alarm clock phone ring whale dolphin humpback orca seal call calls click clicks whistle "
    "species animal marine mammal loud quiet louder quieter longer shorter count times once twice three four "
    "none both all other yes no true false start end begins ends second seconds minute"
)


@dataclass
class TinyQwen2AudioSpec:
    """Sizes of a tiny Qwen2-Audio. The 7B values are in comments for comparison."""

    vocab_size: int = 640  # BPE vocabulary before special tokens (7B: 151643)
    hidden_size: int = 64  # 4096
    num_hidden_layers: int = 2  # 32
    num_attention_heads: int = 4  # 32
    num_key_value_heads: int = 2  # 32
    intermediate_size: int = 128  # 11008
    max_position_embeddings: int = 4096  # 8192
    # 7B: 1e4. The demo builds its tiny one with 1e6 (the text LLM's): on option-reading questions it reached 0.78
    # in 1,000 CPU steps where 1e4 stayed at 0.51 (README, "Teaching the tiny backbones to read options").
    rope_theta: float = 10000.0
    audio_d_model: int = 64  # 1280
    audio_layers: int = 2  # 32
    audio_heads: int = 4  # 20
    audio_ffn_dim: int = 128  # 5120
    num_mel_bins: int = 128  # 128: the real Whisper-v3 front end, kept
    chunk_seconds: int = 5  # 30: audio window; sets max_source_positions = chunk_seconds * 50
    # 7B: 0.02. A weight std of 0.02 suits width 4096 (0.02 * sqrt(4096) ~ 1.3 gain per layer); at width 64 it
    # shrinks every branch ~6x, signals and gradients vanish, and LoRA on such a model learned nothing in 900
    # CPU steps on the demo data. 0.1 ~ 1/sqrt(64) keeps the gain near 1 (dev 0.70 vs 0.43 after 600 full steps).
    initializer_range: float = 0.1
    extra_corpus: list[str] = field(default_factory=list)  # more tokenizer training text


def train_tokenizer(spec: TinyQwen2AudioSpec | TinyQwen2TextSpec) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with the Qwen2 pre-tokenizer; returns (vocab incl. specials, merges).

    Only ``spec.vocab_size`` and ``spec.extra_corpus`` are read, so the tiny text LLM's spec serves too.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        # every byte is a token, so any text (and each letter A..Z alone) is encodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    words = _CORPUS_WORDS.split()
    corpus = [
        _CORPUS_WORDS, _CORPUS_WORDS.title(), "Answer with the option's letter.", "You are a helpful assistant.",
        "system\n", "user\n", "assistant\n", "Audio 1: ", *spec.extra_corpus,
    ]
    corpus += [f"({letter}) {w}" for letter, w in zip("ABCDEFGH" * 40, words)]
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    # Specials get the ids right after the BPE vocabulary, in the real order.
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def build_tiny_qwen2_audio_processor(spec: TinyQwen2AudioSpec):
    """The processor (Whisper feature extractor + Qwen2 tokenizer + chat template) of a tiny model."""
    from transformers import Qwen2AudioProcessor, Qwen2Tokenizer, WhisperFeatureExtractor

    vocab, merges = train_tokenizer(spec)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=spec.max_position_embeddings,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    feature_extractor = WhisperFeatureExtractor(
        feature_size=spec.num_mel_bins,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=spec.chunk_seconds,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )
    return Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE
    )


def tiny_qwen2_audio_config(spec: TinyQwen2AudioSpec, tokenizer):
    """The ``Qwen2AudioConfig`` of a tiny model whose vocabulary is ``tokenizer``'s."""
    from transformers import Qwen2AudioConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # The audio encoder sees exactly chunk_seconds of mel frames (hop 10 ms), halved by conv2's stride.
    max_source_positions = spec.chunk_seconds * 100 // 2
    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": spec.num_mel_bins,
            "encoder_layers": spec.audio_layers,
            "encoder_attention_heads": spec.audio_heads,
            "encoder_ffn_dim": spec.audio_ffn_dim,
            "d_model": spec.audio_d_model,
            "max_source_positions": max_source_positions,
            "initializer_range": spec.initializer_range,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads,
            "intermediate_size": spec.intermediate_size,
            "max_position_embeddings": spec.max_position_embeddings,
            "rope_theta": spec.rope_theta,
            "rms_norm_eps": 1e-5,
            "bos_token_id": ids[ENDOFTEXT],
            "eos_token_id": ids[IM_END],
            "pad_token_id": ids[ENDOFTEXT],
            "tie_word_embeddings": False,
            "initializer_range": spec.initializer_range,
        },
        audio_token_index=ids[AUDIO],
    )
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    return config


# Qwen2-Audio-7B's shapes as TinyQwen2AudioSpec overrides (the benches' --seven-b): 32 x 4096 LM, 32 x 1280
# Whisper encoder, 30 s window. The tiny BPE cannot have 151k merges, so the vocabulary is matched by resizing
# the embeddings to SEVEN_B_VOCAB rows after building (the LM head's size is what costs).
SEVEN_B_SPEC = ["hidden_size=4096", "num_hidden_layers=32", "num_attention_heads=32", "num_key_value_heads=32",
                "intermediate_size=11008", "max_position_embeddings=8192", "audio_d_model=1280", "audio_layers=32",
                "audio_heads=20", "audio_ffn_dim=5120", "chunk_seconds=30"]
SEVEN_B_VOCAB = 156032


def build_tiny_qwen2_audio(spec: TinyQwen2AudioSpec | None = None, seed: int = 0, *,
                           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A random-init Qwen2-Audio of ``spec``'s sizes and its processor, in memory: ``(model, processor)``.

    Benchmarks use it to build 7B-shaped models on a GPU without writing 16 GB to disk; everything
    else goes through :func:`write_tiny_qwen2_audio` and ``from_pretrained``.
    """
    from transformers import GenerationConfig, Qwen2AudioForConditionalGeneration

    spec = spec or TinyQwen2AudioSpec()
    processor = build_tiny_qwen2_audio_processor(spec)
    config = tiny_qwen2_audio_config(spec, processor.tokenizer)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT), do_sample=False,
    )
    return model.eval(), processor


def write_tiny_qwen2_audio(out_dir: str | Path, seed: int = 0, spec: TinyQwen2AudioSpec | None = None) -> Path:
    """Write a tiny random-init Qwen2-Audio to ``out_dir`` as a normal HF model directory.

    The directory holds config.json, model.safetensors, generation_config.json, the tokenizer files and
    preprocessor_config.json; it loads with ``Qwen2AudioForConditionalGeneration.from_pretrained`` and
    ``Qwen2AudioProcessor.from_pretrained`` like the real checkpoint. Same seed and spec, same weights.
    """
    spec = spec or TinyQwen2AudioSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_qwen2_audio(spec, seed)
    model.save_pretrained(out)  # safetensors (transformers 5 writes nothing else)
    processor.save_pretrained(out)
    # The 7B checkpoint ships its Whisper settings as preprocessor_config.json; write it too, so tools
    # that read only that file (and the feature-cache key) see the same thing for tiny and 7B.
    processor.feature_extractor.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2) + "\n", encoding="utf-8")
    return out
