"""Kimi-Audio seen as a one-stream causal LM, for the generic GRPO rollouts in ``shared_prefix``.

``shared_prefix`` drives ``model.model(input_ids=..., attention_mask=..., position_ids=...,
cache=..., use_cache=..., **extra)`` and ``model.get_output_embeddings()``. Kimi-Audio
generates text in the text stream while its audio stream holds ``text_blank``, so this view takes
the text-stream ids as ``input_ids`` and fills the audio stream with blanks, except on the prompt,
whose audio stream, continuous mask and Whisper vectors come in as per-row ``extra`` tensors
(so they repeat per row like any other prompt input).

Shapes: B rows, P prompt positions, T positions fed, Smax vectors per row (padded), D vector width.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from aqa.backbones.kimi_audio.model import KimiAudioForCausalLM


def pad_features_per_row(features: list[torch.Tensor]) -> torch.Tensor:
    """Per-row vectors ``[S_b, D]`` -> ``[B, Smax, D]`` zero-padded (row b's first S_b are real)."""
    width = max(f.shape[0] for f in features)
    out = features[0].new_zeros(len(features), width, features[0].shape[1])
    for b, f in enumerate(features):
        out[b, : f.shape[0]] = f
    return out


class _TextStreamDecoder(nn.Module):
    def __init__(self, lm: KimiAudioForCausalLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                audio_ids: torch.Tensor | None = None, is_continuous_mask: torch.Tensor | None = None,
                whisper_features: torch.Tensor | None = None, independent_columns: bool = False
                ) -> BaseModelOutputWithPast:
        """Text ids ``[B, T]`` (+ prompt audio ids / continuous mask ``[B, P<=T]``, vectors ``[B, Smax, D]``).

        ``independent_columns``: each of the T columns is one token of its own sequence (the static decode
        step's G completions), so the text-stream rule applies per column."""
        config = self.lm.config
        audio = torch.full_like(input_ids, config.kimia_text_blank)
        cont = torch.zeros_like(input_ids, dtype=torch.bool)
        feats = None
        if audio_ids is not None:
            # the naive layout appends completions to the prompt: the prompt part keeps its audio stream
            p = audio_ids.shape[1]
            audio[:, :p] = audio_ids
            if is_continuous_mask is not None:
                cont[:, :p] = is_continuous_mask.bool()
        if whisper_features is not None:
            counts = cont.sum(dim=1).tolist()
            feats = torch.cat([whisper_features[b, :n] for b, n in enumerate(counts)], dim=0)  # [S, D]
        embeds = self.lm.model.embed(audio, input_ids, cont, feats, per_position=independent_columns)
        hidden, _, cache = self.lm.model(embeds, attention_mask, position_ids, cache, use_cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)


class TextStreamView(nn.Module):
    """``.model`` (the decoder above) and ``get_output_embeddings()`` (``lm_head``) over one Kimi LM."""

    def __init__(self, lm: KimiAudioForCausalLM):
        super().__init__()
        self.model = _TextStreamDecoder(lm)
        self._head = lm.lm_head

    def get_output_embeddings(self) -> nn.Module:
        return self._head
