"""A tiny random-init Qwen2.5-Omni in the released layout (``python -m aqa.tiny qwen2_5_omni``).

The released ``Qwen/Qwen2.5-Omni-7B`` directory holds the whole Omni model: the thinker (audio, vision and
text to text), the talker and the token2wav vocoder, saved by ``Qwen2_5OmniForConditionalGeneration`` as
sharded safetensors under the ``thinker.``, ``talker.`` and ``token2wav.`` prefixes with a
``model.safetensors.index.json``. This writer builds that full model at tiny sizes and saves it the same
way (several shards, so the talker and vocoder land in shards of their own as well as beside thinker
tensors), with the tokenizer, chat template and Whisper front end. The backbone then loads only the
thinker from it, exactly as from the 7B directory.

Sizes differ from the 7B (in comments), and so does the audio window: the released front end pads every
clip to 300 s (30,000 mel frames); the tiny one to ``chunk_seconds`` for CPU speed. The encoder itself is
windowed (``n_window`` 100: 2 s chunks), so its own settings keep their released values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aqa.backbones.qwen2_audio_tiny import ENDOFTEXT, IM_END, IM_START, train_tokenizer

AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
VISION_BOS = "<|vision_bos|>"
VISION_EOS = "<|vision_eos|>"
VISION_PAD = "<|vision_pad|>"
IMAGE = "<|IMAGE|>"
VIDEO = "<|VIDEO|>"
# The released special tokens in their real order after the BPE vocabulary (151643..151656), so the ids of
# the config (audio 151646, audio_bos/eos 151647/8, vision_bos/eos 151652/3, image 151655, video 151656)
# relate to each other as in the 7B. 151649-151651 are box/quad tokens the tiny vocabulary keeps as fillers.
OMNI_SPECIAL_TOKENS = [
    ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS, "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    VISION_BOS, VISION_EOS, VISION_PAD, IMAGE, VIDEO,
]
CHAT_TEMPLATE_FILE = "chat_template.json"
DEFAULT_SYSTEM = "You are a helpful assistant."
# The released chat template, in behaviour for text, audio, image and video parts: an implicit default system
# turn, parts concatenated in order with no separator, audio as <|audio_bos|><|AUDIO|><|audio_eos|>.
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
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


@dataclass
class TinyQwen2_5OmniSpec:
    """Sizes of a tiny Qwen2.5-Omni. The 7B values are in comments for comparison."""

    vocab_size: int = 640  # BPE vocabulary before the special tokens (7B: 151643; config vocab 152064)
    hidden_size: int = 64  # 3584
    num_hidden_layers: int = 2  # 28
    num_attention_heads: int = 4  # 28
    num_key_value_heads: int = 2  # 4
    intermediate_size: int = 128  # 18944
    max_position_embeddings: int = 4096  # 32768
    audio_d_model: int = 64  # 1280
    audio_layers: int = 2  # 32
    audio_heads: int = 4  # 20
    audio_ffn_dim: int = 128  # 5120
    num_mel_bins: int = 128  # 128: the real Whisper-v3 front end, kept
    chunk_seconds: int = 5  # 300: the front end's window (every clip is padded to it)
    vision_hidden_size: int = 32  # 1280 (the vision tower is loaded, never run)
    vision_depth: int = 1  # 32
    talker_hidden_size: int = 32  # 896 (talker and token2wav: written, never loaded)
    talker_layers: int = 1  # 24
    # 7B: 0.02; 0.1 ~ 1/sqrt(64) keeps a width-64 model's gain near 1 (see qwen2_audio_tiny)
    initializer_range: float = 0.1
    shard_kb: int = 256  # safetensors shard size, so the directory is sharded as the 7B's (5 shards) is
    extra_corpus: list[str] = field(default_factory=list)  # more tokenizer training text


def build_tiny_qwen2_5_omni_processor(spec: TinyQwen2_5OmniSpec):
    """``(tokenizer, feature_extractor)`` of a tiny model: a Qwen2 tokenizer with the Omni special tokens and
    the Omni chat template, and the Whisper feature extractor the Omni processor holds.

    Not a ``Qwen2_5OmniProcessor``: that class also demands an image and a video processor, and the video
    one needs torchvision, which the thinker's audio-only use never touches."""
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    vocab, merges = train_tokenizer(spec)
    for token in list(vocab):  # train_tokenizer appends the Qwen2-Audio specials: put the Omni ones there
        if token.startswith("<|") and token.endswith("|>"):
            del vocab[token]
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    for token in OMNI_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token=IM_END, pad_token=ENDOFTEXT,
        model_max_length=spec.max_position_embeddings,
        extra_special_tokens={"audio_token": AUDIO, "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS,
                              "image_token": IMAGE, "video_token": VIDEO, "vision_bos_token": VISION_BOS,
                              "vision_eos_token": VISION_EOS},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": OMNI_SPECIAL_TOKENS[1:]})
    feature_extractor = WhisperFeatureExtractor(
        feature_size=spec.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=spec.chunk_seconds,
        n_fft=400, padding_value=0.0, return_attention_mask=True, dither=0.0,
    )
    return tokenizer, feature_extractor


def tiny_qwen2_5_omni_config(spec: TinyQwen2_5OmniSpec, tokenizer):
    """The full ``Qwen2_5OmniConfig`` (thinker, talker, token2wav) of a tiny model over ``tokenizer``."""
    from transformers import Qwen2_5OmniConfig
    from transformers.utils import logging

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in OMNI_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    head_dim = spec.hidden_size // spec.num_attention_heads
    # mrope splits head_dim / 2 rotary frequencies into (temporal, height, width) sections: 16/24/24 of 64
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ti = spec.talker_hidden_size
    thinker = {
        "audio_config": {
            "num_mel_bins": spec.num_mel_bins, "encoder_layers": spec.audio_layers,
            "encoder_attention_heads": spec.audio_heads, "encoder_ffn_dim": spec.audio_ffn_dim,
            "d_model": spec.audio_d_model, "output_dim": spec.hidden_size, "n_window": 100,
            "max_source_positions": 1500, "initializer_range": spec.initializer_range,
        },
        "vision_config": {
            "depth": spec.vision_depth, "hidden_size": spec.vision_hidden_size,
            "intermediate_size": 2 * spec.vision_hidden_size, "num_heads": 2, "out_hidden_size": spec.hidden_size,
            "fullatt_block_indexes": [spec.vision_depth - 1], "initializer_range": spec.initializer_range,
        },
        "text_config": {
            "vocab_size": vocab, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
            "intermediate_size": spec.intermediate_size, "max_position_embeddings": spec.max_position_embeddings,
            "rms_norm_eps": 1e-6, "head_dim": head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            # The released text config says false (a separate lm_head); the class default is true: write it.
            "tie_word_embeddings": False, "initializer_range": spec.initializer_range,
            "pad_token_id": ids[ENDOFTEXT],
        },
        "audio_token_index": ids[AUDIO], "image_token_index": ids[IMAGE], "video_token_index": ids[VIDEO],
        "audio_start_token_id": ids[AUDIO_BOS], "audio_end_token_id": ids[AUDIO_EOS],
        # keys of the released thinker config that the class does not declare; get_rope_index reads them
        "vision_start_token_id": ids[VISION_BOS], "vision_end_token_id": ids[VISION_EOS],
        "vision_token_id": ids[VISION_PAD], "user_token_id": tokenizer.convert_tokens_to_ids("user"),
        "bos_token_id": ids[IM_START], "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False, "initializer_range": spec.initializer_range,
    }
    talker = {
        # one table for the codec tokens (after the text ids here) and the thinker ids the talker reads
        "vocab_size": vocab + 8, "tts_codec_start_token_id": vocab + 1, "tts_codec_end_token_id": vocab + 2,
        "tts_codec_pad_token_id": vocab, "tts_codec_mask_token_id": vocab + 4,
        "tts_text_start_token_id": vocab - 3, "tts_text_end_token_id": vocab - 2, "tts_text_pad_token_id": vocab - 1,
        "audio_token_index": ids[AUDIO], "image_token_index": ids[IMAGE], "video_token_index": ids[VIDEO],
        "vision_start_token_id": ids[VISION_BOS], "vision_end_token_id": ids[VISION_EOS],
        "audio_start_token_id": ids[AUDIO_BOS], "audio_end_token_id": ids[AUDIO_EOS],
        "embedding_size": spec.hidden_size, "hidden_size": ti, "intermediate_size": 2 * ti,
        "num_hidden_layers": spec.talker_layers, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": ti // 2, "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    }
    token2wav = {
        "dit_config": {
            "hidden_size": ti, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": ti // 2, "ff_mult": 2,
            "emb_dim": 16, "num_embeds": 64, "mel_dim": 8, "enc_emb_dim": 8, "enc_dim": 8,
            "enc_channels": [16, 16, 32], "enc_kernel_sizes": [3, 3, 1], "enc_dilations": [1, 2, 1],
            "enc_attention_channels": 8, "enc_res2net_scale": 2, "enc_se_channels": 8,
            "look_ahead_layers": [1], "look_backward_layers": [0], "block_size": 24, "repeats": 2,
        },
        "bigvgan_config": {
            "mel_dim": 8, "upsample_initial_channel": 16, "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4],
        },
    }
    # Building the composite config first validates a default talker config against its own vocabulary (7
    # warnings about the 7B's token ids); the values written are the ones above.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav,
                                 enable_audio_output=True)
    finally:
        logging.set_verbosity(verbosity)


def build_tiny_qwen2_5_omni(spec: TinyQwen2_5OmniSpec | None = None, seed: int = 0):
    """The full random-init Omni model (thinker + talker + token2wav), its tokenizer and feature extractor."""
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration

    spec = spec or TinyQwen2_5OmniSpec()
    tok, feature_extractor = build_tiny_qwen2_5_omni_processor(spec)
    config = tiny_qwen2_5_omni_config(spec, tok)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT), do_sample=False,
    )
    return model.eval(), tok, feature_extractor


def write_tiny_qwen2_5_omni(out_dir: str | Path, seed: int = 0, spec: TinyQwen2_5OmniSpec | None = None) -> Path:
    """Write a tiny random-init Qwen2.5-Omni to ``out_dir`` in the released layout.

    The directory holds config.json (``qwen2_5_omni``: thinker, talker and token2wav configs), sharded
    ``model-*.safetensors`` with ``model.safetensors.index.json`` (``thinker.``/``talker.``/``token2wav.``
    prefixes), generation_config.json, the tokenizer files, the chat template and
    preprocessor_config.json. (The release's ``spk_dict.pt``, a pickle read only by the talker, is not
    written.) Same seed and spec, same bytes.
    """
    spec = spec or TinyQwen2_5OmniSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, feature_extractor = build_tiny_qwen2_5_omni(spec, seed)
    model.save_pretrained(out, max_shard_size=f"{spec.shard_kb}KB")
    tokenizer.save_pretrained(out)
    feature_extractor.save_pretrained(out)  # preprocessor_config.json
    # the release keeps its template beside the processor files, as chat_template.json
    (out / CHAT_TEMPLATE_FILE).write_text(json.dumps({"chat_template": OMNI_CHAT_TEMPLATE}, indent=2) + "\n",
                                          encoding="utf-8")
    (out / "tiny_spec.json").write_text(json.dumps({"seed": seed, **asdict(spec)}, indent=2) + "\n", encoding="utf-8")
    return out
