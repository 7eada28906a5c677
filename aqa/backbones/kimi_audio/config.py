"""Kimi-Audio's model config, read from the release's ``config.json`` without its remote code.

The release names ``configuration_moonshot_kimia.KimiAudioConfig`` in ``auto_map``; we never run it.
Our class is transformers' ``Qwen2Config`` (the trunk is Qwen2: q/k/v bias, GQA, RMSNorm, SiLU MLP)
plus the ``kimia_*`` fields. The release's ``config.json`` holds only ``kimia_media_begin/end`` of the
prompt's special tokens; the others are fields here whose defaults are the 7B ids (from the official
tokenizer's special-token list, see ``kimi_audio_io.md``), so a tiny model writes its own small ids and
the 7B needs none written.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Qwen2Config

MODEL_TYPE = "moonshot_kimia"

# The prompt's special tokens: config field -> the token's name in the text tokenizer.
SPECIAL_TOKEN_FIELDS = {
    "kimia_msg_end": "<|im_msg_end|>",
    "kimia_media_begin": "<|im_media_begin|>",
    "kimia_media_end": "<|im_media_end|>",
    "kimia_text_blank": "<|im_kimia_text_blank|>",
    "kimia_text_eos": "<|im_kimia_text_eos|>",
    "kimia_user_msg_start": "<|im_kimia_user_msg_start|>",
    "kimia_assistant_msg_start": "<|im_kimia_assistant_msg_start|>",
    "kimia_speech_ct_id": "<|im_kimia_speech_ct_id|>",
    "kimia_speech_ctd_id": "<|im_kimia_speech_ctd_id|>",
}


# The release's auto_map: its own loader finds its classes through it. Written, never run here.
RELEASE_AUTO_MAP = {"AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
                    "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"}


class KimiAudioConfig(Qwen2Config):
    """``MoonshotKimiaForCausalLM``'s config as a ``Qwen2Config`` with the Kimi fields (7B defaults)."""

    model_type = MODEL_TYPE

    def to_dict(self) -> dict:
        """transformers 5 writes RoPE only as ``rope_parameters``. The official configuration class, vLLM's
        port and transformers 4 read a top-level ``rope_theta`` and, not finding it, silently use 10,000: so
        both forms are written, with the release's ``auto_map``, and every reader sees the same model."""
        out = super().to_dict()
        theta = (out.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            out["rope_theta"] = float(theta)
        out.setdefault("auto_map", dict(RELEASE_AUTO_MAP))
        return out

    # MIMO (audio-output) branch: its layers start from the output of trunk layer index
    # kimia_mimo_transformer_from_layer_index (0-based).
    kimia_mimo_layers: int = 6
    kimia_mimo_transformer_from_layer_index: int = 21
    kimia_mimo_audiodelaytokens: int = 6
    # Whisper features: 4 stacked 1280-d frames of whisper-large-v3 per 12.5 Hz position.
    use_whisper_feature: bool = True
    kimia_adaptor_input_dim: int = 5120
    # Audio-stream id of GLM code c is kimia_token_offset + c (text ids lie below it).
    kimia_token_offset: int = 152064
    kimia_text_output_vocab: int = 152064
    kimia_audio_output_vocab: int = 16896
    num_audio_special_tokens: int = 512
    num_base_tokens: int = 151643
    # Special token ids of the two-stream prompt (7B values).
    kimia_msg_end: int = 151645
    kimia_media_begin: int = 151661
    kimia_media_end: int = 151663
    kimia_text_blank: int = 151666
    kimia_text_eos: int = 151667
    kimia_user_msg_start: int = 151670
    kimia_assistant_msg_start: int = 151671
    kimia_speech_ct_id: int = 151675
    kimia_speech_ctd_id: int = 151676

    def check(self) -> None:
        """Raise if the fields cannot describe a working model (names the field to fix)."""
        if self.tie_word_embeddings:
            raise ValueError("Kimi-Audio keeps embed_tokens, lm_head and mimo_output separate: set "
                             "tie_word_embeddings to false in config.json.")
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            raise ValueError(
                f"kimia_mimo_transformer_from_layer_index={self.kimia_mimo_transformer_from_layer_index} is not a "
                f"layer index of the {self.num_hidden_layers}-layer trunk; fix it in config.json."
            )
        if not self.use_whisper_feature:
            raise ValueError("use_whisper_feature=false checkpoints (no vq_adaptor) are not supported.")
        if not 0 < self.kimia_token_offset < self.vocab_size:
            raise ValueError(f"kimia_token_offset={self.kimia_token_offset} must lie inside vocab_size={self.vocab_size}.")
        for name in [*SPECIAL_TOKEN_FIELDS, "pad_token_id"]:
            value = getattr(self, name)
            if value is None or not 0 <= value < self.kimia_token_offset:
                raise ValueError(
                    f"special token {name}={value} must be a text id below kimia_token_offset="
                    f"{self.kimia_token_offset}; set it in config.json."
                )

    def special_token_ids(self) -> dict[str, int]:
        """Field name -> id of every prompt special token."""
        return {name: int(getattr(self, name)) for name in SPECIAL_TOKEN_FIELDS}


def load_kimi_config(path: str | Path) -> KimiAudioConfig:
    """Read a release's ``config.json`` (a file or the model directory) into :class:`KimiAudioConfig`."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist. Point model_path at a Kimi-Audio release directory (the HF repo "
            "moonshotai/Kimi-Audio-7B-Instruct), or write a tiny one with aqa.backbones.kimi_audio.tiny."
        )
    raw = json.loads(file.read_text(encoding="utf-8"))
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{file} holds a '{raw.get('model_type')}' model, not Kimi-Audio ({MODEL_TYPE}): "
                         "pick the matching backbone.")
    # auto_map points at remote code we never run; dropping it keeps it out of configs we write.
    raw.pop("auto_map", None)
    raw.pop("_comment", None)
    config = KimiAudioConfig(**raw)
    config.check()
    return config
