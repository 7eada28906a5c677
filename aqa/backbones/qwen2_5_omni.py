"""Qwen2.5-Omni behind the backbone protocol: the thinker alone, transformers'
``Qwen2_5OmniThinkerForConditionalGeneration``, loaded from the released full Omni directory.

The release (``Qwen/Qwen2.5-Omni-7B``, ``-3B``) stores thinker, talker and token2wav weights under their
prefixes in sharded safetensors. :func:`load_thinker` reads the index, opens only the shards that hold
``thinker.`` tensors and hands transformers lazy slices of exactly those tensors: the talker's and the
vocoder's bytes are never read, and a shard holding only them is never opened. A thinker-only directory
(``qwen2_5_omni_thinker``, as a full fine-tune or ``aqa.export`` writes it) loads with plain
``from_pretrained``.

Everything above the weights is Qwen2-Audio's recipe (:class:`Qwen2AudioBackbone`): the checkpoint's chat
template around the question, ``<|AUDIO|>`` expanded to one token per encoder frame (25 per second), the
Whisper log-mel of the processor's own feature extractor, the thinker's decoder run on the prompt with the
audio features. Differences handled here:

- the released front end pads every clip to 300 s (30,000 frames) and the encoder then drops the padding;
  the feature cache keeps only a clip's valid frames and a batch is padded to its longest clip, which gives
  the encoder the same frames at a fraction of the memory;
- the output head is separate in the 7B (``thinker.lm_head.weight``); a checkpoint without that tensor is
  loaded tied to the embeddings instead of leaving a random head, and loading checks which one it got;
- audio-only prompts take plain 1-D positions (the thinker's mRoPE is 3-D only for images and video), which
  the shared-prefix code passes explicitly.

Shapes: B questions, T tokens, F mel frames, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aqa.backbones.base import register
from aqa.backbones.qwen2_5_omni_tiny import CHAT_TEMPLATE_FILE, TinyQwen2_5OmniSpec, write_tiny_qwen2_5_omni
from aqa.backbones.qwen2_audio import Qwen2AudioBackbone
from aqa.data.example import Example

RELEASE_TYPE = "qwen2_5_omni"  # the released directory: thinker + talker + token2wav
THINKER_TYPE = "qwen2_5_omni_thinker"  # a thinker saved alone
THINKER_PREFIX = "thinker."
INDEX_FILE = "model.safetensors.index.json"


class LoadError(ValueError):
    """A directory that does not hold a loadable Qwen2.5-Omni thinker; the message names the fix."""


@dataclass
class OmniAudioProcessor:
    """The parts of ``Qwen2_5OmniProcessor`` an audio-only thinker uses: tokenizer, Whisper feature
    extractor and chat template. (The full processor also builds image and video processors; the video
    one needs torchvision, which audio questions never touch.)"""

    tokenizer: Any
    feature_extractor: Any
    chat_template: str

    def apply_chat_template(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        self.feature_extractor.save_pretrained(out)
        (out / CHAT_TEMPLATE_FILE).write_text(json.dumps({"chat_template": self.chat_template}, indent=2) + "\n",
                                              encoding="utf-8")


def load_processor(path: str | Path) -> OmniAudioProcessor:
    """Tokenizer, feature extractor (``preprocessor_config.json``) and chat template of a checkpoint dir."""
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    path = Path(path)
    # the release's tokenizer class; AutoTokenizer would first build the full Omni config just to find it
    tokenizer = Qwen2Tokenizer.from_pretrained(path)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(path)
    template = None
    if (path / CHAT_TEMPLATE_FILE).is_file():
        template = json.loads((path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")).get("chat_template")
    elif (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise LoadError(f"{path} has no chat template ({CHAT_TEMPLATE_FILE}, chat_template.jinja or in the "
                        "tokenizer config); copy it from the released checkpoint.")
    return OmniAudioProcessor(tokenizer, feature_extractor, template)


def thinker_tensors(path: Path) -> dict[str, str]:
    """``{tensor name: shard file}`` of every ``thinker.`` tensor of a released directory (from the index,
    or from the one ``model.safetensors``)."""
    from safetensors import safe_open

    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            weight_map = dict.fromkeys(fh.keys(), "model.safetensors")
    else:
        raise LoadError(f"{path} has no {INDEX_FILE} or model.safetensors; only safetensors are loaded (never "
                        "pickle). Point model_path at the released Qwen2.5-Omni directory.")
    found = {k: f for k, f in weight_map.items() if k.startswith(THINKER_PREFIX)}
    if not found:
        raise LoadError(f"{path} holds no '{THINKER_PREFIX}' tensors: it is not a released Qwen2.5-Omni checkpoint.")
    return found


def load_thinker(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The thinker of a released (``qwen2_5_omni``) or thinker-only (``qwen2_5_omni_thinker``) directory.

    From a release, only the shards holding ``thinker.`` tensors are opened and only those tensors are
    handed over (as lazy slices, read as they are copied into the model). Missing thinker weights raise.
    """
    from safetensors import safe_open
    from transformers import (
        GenerationConfig,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    path = Path(path)
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == THINKER_TYPE:
        model, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path, dtype=dtype, use_safetensors=True, output_loading_info=True)
    else:
        tensors = thinker_tensors(path)
        # the thinker config inside the release's config.json (transformers finds it by model_type)
        config = Qwen2_5OmniThinkerConfig.from_pretrained(path)
        # follow the checkpoint: a separate head where it stores one, tied to the embeddings where it does not
        tied = f"{THINKER_PREFIX}lm_head.weight" not in tensors
        config.tie_word_embeddings = tied
        config.text_config.tie_word_embeddings = tied
        handles, state = [], {}
        try:
            for shard in sorted(set(tensors.values())):
                fh = safe_open(str(path / shard), framework="pt")
                handles.append(fh)
                for key in fh.keys():
                    if key in tensors:
                        state[key] = fh.get_slice(key)  # lazy: read when copied into the model
            model, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
        finally:
            for fh in handles:
                fh.__exit__(None, None, None)
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        # what from_pretrained(path) records: PEFT writes it into adapter_config.json as the base model
        model.name_or_path = str(path)
        model.config._name_or_path = str(path)
    missing = sorted(k for k in info.get("missing_keys", ()) if not (k == "lm_head.weight" and _is_tied(model)))
    if missing:
        raise LoadError(f"{path} lacks thinker weights {missing[:5]}{' ...' if len(missing) > 5 else ''}: the "
                        "checkpoint is incomplete or of another model.")
    if _is_tied(model) != bool(model.config.tie_word_embeddings):
        raise LoadError(f"{path}: the output head is {'tied' if _is_tied(model) else 'separate'} but the config "
                        f"says tie_word_embeddings={model.config.tie_word_embeddings}; the logits would be wrong.")
    return model


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings().weight
    return head.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@register
class Qwen2_5OmniBackbone(Qwen2AudioBackbone):
    name = "qwen2_5_omni"
    model_types = (RELEASE_TYPE, THINKER_TYPE)
    tiny_spec_class = TinyQwen2_5OmniSpec
    tiny_writer = staticmethod(write_tiny_qwen2_5_omni)
    # the thinker's audio tower ends in its own projection (no separate projector); the vision tower never trains
    audio_output_lora = r"model\.audio_tower\.proj"
    audio_full_prefixes = ("model.audio_tower.",)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, prompt=None) -> Qwen2_5OmniBackbone:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"model directory {path} has no config.json. Point model_path at a Qwen2.5-Omni checkpoint "
                "directory, or write a tiny one with `python -m aqa.tiny qwen2_5_omni --out DIR`."
            )
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type not in cls.model_types:
            raise ValueError(f"{path} holds a '{model_type}' model, not qwen2_5_omni: pick the matching backbone.")
        model = load_thinker(path, dtype)
        return cls(model.to(device), load_processor(path), prompt)

    def save_processor(self, out_dir: str | Path) -> None:
        self.processor.save_pretrained(out_dir)

    # -- features: the valid frames only (the release pads to 300 s; the encoder drops the padding) ------------
    def extract_features(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        """16 kHz mono ``[S]`` -> ``input_features`` ``[n_mels, F]`` (the clip's valid frames, computed as the
        processor computes them, padding cut off) and ``feature_length`` (F, scalar int64)."""
        out = super().extract_features(wave)
        n = int(out["feature_length"])
        return {"input_features": np.ascontiguousarray(out["input_features"][:, :n]),
                "feature_length": out["feature_length"]}

    def _features(self, ex: Example) -> tuple[np.ndarray, int]:
        feats = ex.features
        if "input_features" not in feats or "feature_length" not in feats:
            raise ValueError(
                f"example {ex.id} has no qwen2_5_omni features (input_features, feature_length): build them with "
                "backbone.extract_features (or the feature cache) before collating."
            )
        mel = np.asarray(feats["input_features"], dtype=np.float32)
        length = int(np.asarray(feats["feature_length"]))
        fe = self.feature_extractor
        if mel.ndim != 2 or mel.shape[0] != fe.feature_size or mel.shape[1] != length or length > fe.nb_max_frames:
            raise ValueError(
                f"example {ex.id}: log-mel {mel.shape} (length {length}) does not match this checkpoint's front "
                f"end ({fe.feature_size} mels, at most {fe.nb_max_frames} frames): the feature cache was built "
                "for another model; rebuild it."
            )
        return mel, length

    def _audio_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``input_features`` ``[B, n_mels, F]`` padded to the longest clip of the batch, and
        ``feature_attention_mask`` ``[B, F]``."""
        feats = [self._features(ex) for ex in examples]
        width = max(length for _, length in feats)
        mels = torch.zeros(len(feats), self.feature_extractor.feature_size, width)
        masks = torch.zeros(len(feats), width, dtype=torch.long)
        for i, (mel, length) in enumerate(feats):
            mels[i, :, :length] = torch.from_numpy(mel)
            masks[i, :length] = 1
        return {"input_features": mels, "feature_attention_mask": masks}
