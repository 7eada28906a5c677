"""A tiny random-init Qwen2.5-Instruct-style text LLM, the cascade's answerer (``python -m aqa.tiny text_llm``).

Written as a normal Hugging Face directory (config.json, model.safetensors, generation_config.json,
tokenizer files with the real added tokens and chat template) and loaded by exactly the code that loads
Qwen2.5-7B-Instruct. Its BPE is trained like the tiny Qwen2-Audio's (:func:`train_tokenizer`), then the
Qwen2.5 added tokens replace the Qwen2-Audio ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aqa.backbones.qwen2_audio_tiny import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS, train_tokenizer

# The real Qwen2.5 added tokens in their real order after the BPE vocabulary (151643..151664); the first 14
# are special (never sampled), the tool-call and fill-in-the-middle ones are plain added tokens.
QWEN25_SPECIAL_TOKENS = [
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]
QWEN25_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                       "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template, verbatim in behaviour for conversations without tools: a given first
# system message or the default one, then ChatML turns, then the assistant start.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
_EVENT_CORPUS = [  # words of the cascade's event lines, so they tokenize into few pieces as in the real vocabulary
    "Sound events detected in the audio:", "No sound events were detected.", "0.1-0.7 s: Dog bark (0.93)",
    "onset offset label score confidence event events detected noise environmental hooter warbler whistler "
    "cricket croaker trill rising falling steady trilling louder higher pitch longest",
]


@dataclass
class TinyQwen2TextSpec:
    """Sizes of a tiny Qwen2 text LLM. The Qwen2.5-7B-Instruct values are in comments for comparison."""

    vocab_size: int = 640  # BPE vocabulary before the added tokens (7B: 151643)
    hidden_size: int = 64  # 3584
    num_hidden_layers: int = 2  # 28
    num_attention_heads: int = 4  # 28
    num_key_value_heads: int = 2  # 4
    intermediate_size: int = 128  # 18944
    max_position_embeddings: int = 4096  # 32768
    # 7B: 0.02, which suits width 3584. At width 64 it shrinks every branch ~6x and a LoRA on the random model
    # learns nothing; ~1/sqrt(width) keeps the per-layer gain near 1 (as for the tiny Qwen2-Audio).
    initializer_range: float = 0.125
    tie_word_embeddings: bool = False  # 7B: false
    extra_corpus: list[str] = field(default_factory=lambda: list(_EVENT_CORPUS))  # more tokenizer training text


def build_tiny_text_tokenizer(spec: TinyQwen2TextSpec):
    """A Qwen2 tokenizer with a BPE trained like the tiny Qwen2-Audio's, the Qwen2.5 added tokens in their
    real order right after it, and Qwen2.5-Instruct's chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_tokenizer(spec)  # trained with the Qwen2-Audio specials appended: swap them
    for token in SPECIAL_TOKENS:
        del vocab[token]
    for token in QWEN25_SPECIAL_TOKENS + QWEN25_ADDED_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=IM_END,
                               pad_token=ENDOFTEXT, model_max_length=spec.max_position_embeddings)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN25_SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens(QWEN25_ADDED_TOKENS, special_tokens=False)  # kept whole, but not special
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    return tokenizer


def build_tiny_text_llm(spec: TinyQwen2TextSpec | None = None, seed: int = 0):
    """A random-init ``Qwen2ForCausalLM`` of ``spec``'s sizes and its tokenizer, in memory: ``(model, tokenizer)``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    spec = spec or TinyQwen2TextSpec()
    tokenizer = build_tiny_text_tokenizer(spec)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_END)}
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT], tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range, architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
                                               pad_token_id=ids[ENDOFTEXT], do_sample=False)
    return model.eval(), tokenizer


def write_tiny_text_llm(out_dir: str | Path, seed: int = 0, spec: TinyQwen2TextSpec | None = None) -> Path:
    """Write a tiny random-init Qwen2 text LLM to ``out_dir`` as a normal HF directory (config.json,
    model.safetensors, generation_config.json, tokenizer files with the chat template); it loads with
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` like Qwen2.5-7B-Instruct. Same seed and spec, same weights."""
    spec = spec or TinyQwen2TextSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_tiny_text_llm(spec, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2) + "\n", encoding="utf-8")
    return out
