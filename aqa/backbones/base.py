"""The backbone protocol: everything outside ``aqa/backbones/`` talks to a model through this.

A backbone object owns the processor/tokenizer and the config of one checkpoint directory. The
trainable ``nn.Module`` is ``backbone.model``; recipes may wrap it (PEFT, DeepSpeed engine) and pass
the wrapper back into the methods below as ``model``, so the backbone never cares how it is wrapped.

Shapes: B questions, G completions per question (GRPO), K option orders, N options, T tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from aqa.backbones.checkpoint_check import CheckpointChecker
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig


@dataclass
class SamplingConfig:
    """Rollout sampling for GRPO and generate-mode inference."""

    temperature: float = 1.0  # softmax temperature of the sampled tokens (log-probs are taken at it too)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much probability (1: off)
    top_k: int = 0  # sample among the k most likely tokens only (0: off); applied before top_p
    max_new_tokens: int = 8  # completion length cap; a completion also ends at the end-of-turn token


@dataclass
class Rollout:
    """G sampled completions per question, with what is needed to score them again.

    ``prompt`` is backbone-private (the encoded prompts, one row per question: never repeated G times).
    """

    examples: list[Example]
    prompt: Any
    completion_ids: torch.Tensor  # [B, G, T] int64, right-padded
    completion_mask: torch.Tensor  # [B, G, T] 1 on real tokens (up to and including EOS)
    texts: list[list[str]]  # [B][G] decoded completions

    def rows(self, start: int, end: int) -> Rollout:
        """Questions ``[start, end)`` with their completions: what GRPO scores and trains on in question chunks
        (``batch.update_chunk``). The prompt's type provides ``rows`` (``shared_prefix.PromptBatch`` does)."""
        return Rollout(self.examples[start:end], self.prompt.rows(start, end), self.completion_ids[start:end],
                       self.completion_mask[start:end], self.texts[start:end])


class Backbone(ABC):
    """One model family behind the protocol. Register concrete classes with ``@register``."""

    name: ClassVar[str]
    # Name of the log-mel entry of ``extract_features`` that SpecAugment may mask ([n_mels, frames]),
    # or None for backbones without spectrogram inputs.
    spec_augment_key: ClassVar[str | None] = None
    # The config.json ``model_type`` values of the checkpoints this backbone loads, so a checkpoint
    # directory names its backbone (``aqa.export``); empty: the backbone claims none and must be named.
    model_types: ClassVar[tuple[str, ...]] = ()

    model: nn.Module

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
        prompt: PromptConfig | None = None,
    ) -> Backbone:
        """Load model and processor from a local HF-style directory (tiny or 7B alike)."""

    @abstractmethod
    def lora_target_modules(self, include_audio: bool = False, names: list[str] | None = None) -> str | list[str]:
        """PEFT ``target_modules``: the language model's linear layers (plus the audio side if asked).

        ``names`` narrows the choice to these leaf names (e.g. ``["q_proj", "v_proj"]``) while keeping it
        on the language model; None means the backbone's default set. Raises if nothing matches.
        """

    def full_finetune_prefixes(self, include_audio: bool = False) -> list[str]:
        """Parameter-name prefixes (on the unwrapped model) that full fine-tuning trains: the language model
        and its output head; with ``include_audio`` also the audio encoder and its projector. Never the
        parts a backbone keeps frozen by design (a vision tower, Kimi-Audio's MIMO branch)."""
        raise NotImplementedError(f"{self.name} does not support full fine-tuning yet; use finetune: lora")

    # -- features ------------------------------------------------------------------------------
    def feature_settings(self) -> dict[str, Any]:
        """Extractor settings; part of the feature-cache key, so a change recomputes the cache.

        Empty (the default) means the backbone reads no audio: the scripts then decode no clip and every
        ``Example.features`` stays ``{}``. An audio backbone must return a non-empty dict."""
        return {}

    def extract_features(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        """16 kHz mono float32 ``[S]`` -> model-ready arrays (cached per clip). Empty for text backbones."""
        return {}

    # -- training and scoring ------------------------------------------------------------------
    @abstractmethod
    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """SFT batch: prompt + target (``PromptConfig.target_format``) with labels on the target only."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over target tokens."""
        return model(**batch).loss

    @abstractmethod
    def option_logits(
        self, model: nn.Module, examples: list[Example], orders: list[list[list[int]]] | None = None
    ) -> list[torch.Tensor]:
        """Logit of each option's letter at the answer position, one forward pass per order.

        ``orders[b]`` lists K permutations of ``range(N_b)`` for question b (None: the presented order
        only). Returns, per question, ``[K, N_b]`` logits **in canonical order** (``examples[b].choices``
        order). The audio and prompt prefix is computed once per question and shared by its K orders.
        """

    def generate_answers(self, model: nn.Module, examples: list[Example], max_new_tokens: int) -> list[str]:
        """Greedy completions of the question prompts (generate-mode inference), special tokens removed."""
        raise NotImplementedError(f"{self.name} does not support generate-mode inference yet")

    # -- GRPO ------------------------------------------------------------------------------------
    def generate(self, model: nn.Module, examples: list[Example], num_samples: int,
                 sampling: SamplingConfig, decoder: Any = None) -> Rollout:
        """Sample G completions per question from one prefill per question. ``decoder``: the decode loop
        (``static_decode.StaticDecoder``: a static cache, one step for all G; None: the eager loop, the
        prompt's KV cache expanded to G rows)."""
        raise NotImplementedError(f"{self.name} does not support generation yet")

    def completion_logprobs(self, model: nn.Module, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs ``[B, G, T]`` of the completions, the prompt run once per question."""
        raise NotImplementedError(f"{self.name} does not support completion log-probs yet")

    @abstractmethod
    def save_processor(self, out_dir: str | Path) -> None:
        """Write the processor/tokenizer files next to an exported model."""

    # -- tools: tiny models (python -m aqa.tiny) and checkpoint checks (python -m aqa.check_checkpoint) ------
    # A tiny random-init model of this backbone (``python -m aqa.tiny NAME``): the dataclass of its sizes and
    # ``writer(out_dir, seed=, spec=)``; None where the backbone has none.
    tiny_spec_class: ClassVar[type | None] = None
    tiny_writer: ClassVar[Callable[..., Path] | None] = None

    @classmethod
    def tiny_spec(cls) -> type | None:
        """The dataclass of a tiny model's sizes (the ``key=value`` keys of ``python -m aqa.tiny NAME``),
        or None when this backbone has no tiny model writer."""
        return cls.tiny_spec_class

    @classmethod
    def write_tiny(cls, out_dir: str | Path, seed: int = 0, spec: Any = None) -> Path:
        """Write a tiny random-init model of ``spec``'s sizes (an instance of ``tiny_spec()``, None: its
        defaults) to ``out_dir``, laid out as the real checkpoint so ``from_pretrained`` loads it.
        Same seed and spec, same bytes. Returns ``out_dir``."""
        if cls.tiny_writer is None:
            raise NotImplementedError(f"{cls.name} has no tiny model writer")
        return cls.tiny_writer(out_dir, seed=seed, spec=spec)

    @classmethod
    def checkpoint_checker(cls) -> CheckpointChecker | None:
        """The names-and-shapes check of this backbone against a checkpoint, or None (the default) when
        it has none (e.g. a transformers model, whose ``from_pretrained`` reports mismatches itself)."""
        return None


_REGISTRY: dict[str, type[Backbone]] = {}


def register(cls: type[Backbone]) -> type[Backbone]:
    _REGISTRY[cls.name] = cls
    return cls


def backbones() -> dict[str, type[Backbone]]:
    """Every registered backbone class by name."""
    import aqa.backbones  # noqa: F401  (importing the package registers every backbone)

    return dict(_REGISTRY)


def get_backbone(name: str) -> type[Backbone]:
    """The backbone class registered under ``name``; an unknown name lists the known ones."""
    known = backbones()
    if name not in known:
        raise ValueError(f"unknown backbone '{name}'. Known backbones: {', '.join(sorted(known))}.")
    return known[name]


def backbone_for_model_type(model_type: str) -> type[Backbone]:
    """The backbone that declares ``model_type`` (a checkpoint's config.json) in its ``model_types``."""
    known = backbones()
    found = [cls for cls in known.values() if model_type in cls.model_types]
    if len(found) != 1:
        claim = f"backbones {', '.join(sorted(c.name for c in found))} all declare" if found else "no backbone declares"
        raise ValueError(f"{claim} model_type '{model_type}'. Known backbones: {', '.join(sorted(known))}.")
    return found[0]
