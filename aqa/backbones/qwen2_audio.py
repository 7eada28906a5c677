"""Qwen2-Audio behind the backbone protocol: transformers' ``Qwen2AudioForConditionalGeneration`` and
``Qwen2AudioProcessor`` loaded from a local directory (safetensors only, no remote code).

A prompt is the checkpoint's own chat template: the default system turn, a user turn holding the
audio (``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>``) and the question with lettered options, and
the assistant turn. ``<|AUDIO|>`` is expanded to one token per encoder frame, as the processor does.
This file holds the audio side; collate, option logits, generation and GRPO log-probs are
:class:`~aqa.backbones.chat_lm.ChatLMBackbone`'s, shared with the text LLM.

Shapes: B questions, R = sum of orders over questions, T tokens, F mel frames, V vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aqa.backbones.base import register
from aqa.backbones.chat_lm import ChatLMBackbone, eval_mode, system_turn, unwrap
from aqa.backbones.qwen2_audio_tiny import TinyQwen2AudioSpec, write_tiny_qwen2_audio
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig, render_question

LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUDIO_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
__all__ = ["Qwen2AudioBackbone", "audio_token_count", "eval_mode", "unwrap"]  # unwrap/eval_mode: from chat_lm


def audio_token_count(feature_length: int) -> int:
    """Encoder frames of a clip with ``feature_length`` valid mel frames (conv stride 2, then pool 2)."""
    return ((feature_length - 1) // 2 + 1 - 2) // 2 + 1


@register
class Qwen2AudioBackbone(ChatLMBackbone):
    name = "qwen2_audio"
    spec_augment_key = "input_features"
    model_types = ("qwen2_audio",)
    tiny_spec_class = TinyQwen2AudioSpec
    tiny_writer = staticmethod(write_tiny_qwen2_audio)
    # what carries the audio into the language model besides the tower's layers: a LoRA target regex and the
    # prefixes full fine-tuning trains with the audio side (a subclass with another audio-to-text path sets both)
    audio_output_lora = r"model\.multi_modal_projector\.linear"
    audio_full_prefixes = ("model.audio_tower.", "model.multi_modal_projector.")

    def __init__(self, model: nn.Module, processor: Any, prompt: PromptConfig | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.prompt = prompt or PromptConfig()
        self.audio_token_id = model.config.audio_token_index
        self.pad_id = self.tokenizer.pad_token_id
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._init_chat_state()
        self._frame: tuple[str, str] | None = None  # chat template around the user text
        self._frame_system: str | None = None  # the prompt.system it was rendered with

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, prompt=None) -> Qwen2AudioBackbone:
        from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"model directory {path} has no config.json. Point model_path at a Qwen2-Audio checkpoint "
                "directory, or write a tiny one with `python -m aqa.tiny qwen2_audio --out DIR`."
            )
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type not in cls.model_types:
            raise ValueError(f"{path} holds a '{model_type}' model, not qwen2_audio: pick the matching backbone.")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{path} has no *.safetensors weights; only safetensors are loaded (never pickle). Convert the "
                "checkpoint with transformers' save_pretrained first."
            )
        model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dtype, use_safetensors=True)
        processor = Qwen2AudioProcessor.from_pretrained(path)
        return cls(model.to(device), processor, prompt)

    def save_processor(self, out_dir: str | Path) -> None:
        self.processor.save_pretrained(out_dir)
        self.feature_extractor.save_pretrained(out_dir)  # preprocessor_config.json, as the 7B ships it

    def lora_target_modules(self, include_audio: bool = False, names: list[str] | None = None) -> str:
        """A regex on full module names: the language model's linear layers; the audio side only if asked.

        A bare name list would also hit the audio tower's ``q/k/v_proj``, hence the anchored regex.
        """
        hf = unwrap(self.model)
        lm_names = names or LM_LINEAR
        parts = [rf"model\.language_model\..*\.({'|'.join(map(re.escape, lm_names))})"]
        if include_audio:
            audio_names = names or AUDIO_LINEAR
            parts.append(rf"model\.audio_tower\..*\.({'|'.join(map(re.escape, audio_names))})")
            parts.append(self.audio_output_lora)
        pattern = "|".join(f"(?:{p})" for p in parts)
        hits = [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"LoRA targets {lm_names} match no linear layer of the language model.")
        return pattern

    def full_finetune_prefixes(self, include_audio: bool = False) -> list[str]:
        return ["model.language_model.", "lm_head.", *(self.audio_full_prefixes if include_audio else ())]

    # -- features ------------------------------------------------------------------------------
    def feature_settings(self) -> dict[str, Any]:
        settings = self.feature_extractor.to_dict()
        settings.pop("processor_class", None)
        return {"backbone": self.name, **settings}

    def extract_features(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        """16 kHz mono ``[S]`` -> ``input_features`` ``[n_mels, F]`` (padded to the chunk, longer audio cut)
        and ``feature_length`` (scalar int64: valid frames), exactly as the processor computes them."""
        out = self.feature_extractor(
            np.asarray(wave, dtype=np.float32), sampling_rate=self.feature_extractor.sampling_rate,
            padding="max_length", truncation=True, return_attention_mask=True, return_tensors="np",
        )
        return {
            "input_features": out["input_features"][0].astype(np.float32),
            "feature_length": np.asarray(int(out["attention_mask"][0].sum()), dtype=np.int64),
        }

    # -- prompts -------------------------------------------------------------------------------
    def _chat_frame(self) -> tuple[str, str]:
        """The chat template rendered once around a placeholder user text: ``(head, tail)``.

        Rendering Jinja for each of K orders of each question costs more than the tiny model's forward;
        the template inserts the user text verbatim, so head + text + tail is the same string.
        """
        if self._frame is None or self._frame_system != self.prompt.system:
            marker = "\x00USER_TEXT\x00"
            messages = system_turn(self.prompt) + [
                {"role": "user", "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": marker}]}]
            # the processor's template: checkpoints keep it there (chat_template.jinja / .json)
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(marker) != 1:
                raise ValueError("the checkpoint's chat template does not place the user text exactly once.")
            head, tail = text.split(marker)
            self._frame, self._frame_system = (head, tail), self.prompt.system
        return self._frame

    def _chat_prefix(self, ex: Example, choices: list[str]) -> str:
        """Chat text up to and including the assistant start ``<|im_start|>assistant\\n``."""
        head, tail = self._chat_frame()
        return head + render_question(ex.question, choices, self.prompt) + tail

    def _expand_audio(self, ids: list[int], ex: Example) -> list[int]:
        """Replace the one ``<|AUDIO|>`` by as many copies as the encoder yields frames for this clip."""
        n = audio_token_count(int(self._features(ex)[1]))
        if ids.count(self.audio_token_id) != 1:
            raise ValueError(f"prompt of {ex.id} must hold exactly one <|AUDIO|> token.")
        i = ids.index(self.audio_token_id)
        return ids[:i] + [self.audio_token_id] * n + ids[i + 1 :]

    def _features(self, ex: Example) -> tuple[np.ndarray, int]:
        feats = ex.features
        if "input_features" not in feats or "feature_length" not in feats:
            raise ValueError(
                f"example {ex.id} has no qwen2_audio features (input_features, feature_length): build them with "
                "backbone.extract_features (or the feature cache) before collating."
            )
        mel = np.asarray(feats["input_features"], dtype=np.float32)
        if mel.shape != (self.feature_extractor.feature_size, self.feature_extractor.nb_max_frames):
            raise ValueError(
                f"example {ex.id}: log-mel {mel.shape} does not match this checkpoint's front end "
                f"({self.feature_extractor.feature_size}, {self.feature_extractor.nb_max_frames}): the feature "
                "cache was built for another model; rebuild it."
            )
        return mel, int(np.asarray(feats["feature_length"]))

    def _audio_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``input_features`` ``[B, n_mels, F]`` and ``feature_attention_mask`` ``[B, F]``."""
        mels, masks = [], []
        for ex in examples:
            mel, length = self._features(ex)
            mels.append(torch.from_numpy(mel))
            mask = torch.zeros(mel.shape[1], dtype=torch.long)
            mask[:length] = 1
            masks.append(mask)
        return {"input_features": torch.stack(mels), "feature_attention_mask": torch.stack(masks)}

    # -- the chat_lm hooks: audio placeholders expanded per frame, the log-mel fed on the prefill ----------
    def _prompt_ids(self, ids: list[int], ex: Example) -> list[int]:
        return self._expand_audio(ids, ex)

    def _batch_inputs(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return self._audio_batch(examples)

    def _prefix_only_ids(self) -> set[int]:
        return {self.audio_token_id}
