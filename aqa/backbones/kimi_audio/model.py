"""Kimi-Audio's language model (``MoonshotKimiaForCausalLM``) with the official tensor names.

``KimiAudioForCausalLM.state_dict()`` has exactly the release's 419 tensors:
``model.embed_tokens``, ``model.layers.{0..27}`` (transformers' Qwen2 decoder layers: q/k/v bias),
``model.norm``, ``model.mimo_layers.{0..5}``, ``model.mimo_norm``, ``model.vq_adaptor.layers.{0,3,4}``,
``lm_head`` and ``mimo_output``. RoPE frequencies are a non-persistent buffer of one shared rotary
module, so the 34 per-layer ``rotary_emb.inv_freq`` buffers of the checkpoint have no place here.

Two streams share one embedding table (see ``processor.py``): ``embed(audio ids)``, plus at the
continuous positions the adapted Whisper features, scaled by sqrt(2), plus ``embed(text ids)``.
The MIMO branch forks after trunk layer ``kimia_mimo_transformer_from_layer_index`` and feeds only
``mimo_output`` (audio logits); text logits are ``lm_head(norm(trunk))``, so the branch is run only
when audio logits are asked for.

Shapes: B rows, T positions, H hidden, S continuous positions in the batch, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.utils import ModelOutput

from aqa.backbones.kimi_audio.config import KimiAudioConfig
from aqa.backbones.lm_loss import IGNORE_INDEX, target_loss

__all__ = ["IGNORE_INDEX", "KimiAudioForCausalLM", "KimiAudioOutput", "KimiAudioTrunk"]


class VQAdaptor(nn.Module):
    """Whisper 4-frame stacks -> hidden size: Linear, SiLU, Dropout(0), Linear, LayerNorm (names .layers.{0,3,4})."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        h = config.hidden_size
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, h), nn.SiLU(), nn.Dropout(0.0), nn.Linear(h, h),
            nn.LayerNorm(h, eps=config.rms_norm_eps),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[S, kimia_adaptor_input_dim]`` -> ``[S, H]``."""
        return self.layers(features)


class KimiAudioTrunk(nn.Module):
    """The ``model.*`` part: embeddings, the Qwen2 trunk, the MIMO branch and the Whisper adaptor."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mimo_layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.kimia_mimo_layers))
        for i, layer in enumerate(self.mimo_layers):
            # KV-cache slots after the trunk's (28..33 in the 7B), as the official cache orders them
            layer.self_attn.layer_idx = config.num_hidden_layers + i
        self.mimo_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vq_adaptor = VQAdaptor(config)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def embed(self, input_ids: torch.Tensor, text_input_ids: torch.Tensor,
              is_continuous_mask: torch.Tensor | None = None, whisper_features: torch.Tensor | None = None,
              per_position: bool = False) -> torch.Tensor:
        """Both streams -> input embeddings ``[B, T, H]``.

        ``whisper_features`` ``[S, kimia_adaptor_input_dim]`` fill the ``S`` positions where
        ``is_continuous_mask`` ``[B, T]`` is true, in row-major order.
        """
        emb = self.embed_tokens(input_ids)
        if whisper_features is not None:
            if is_continuous_mask is None:
                raise ValueError("whisper_features need is_continuous_mask to say where they go.")
            mask = is_continuous_mask.bool()
            n = int(mask.sum())
            if whisper_features.shape[0] != n:
                raise ValueError(f"{whisper_features.shape[0]} Whisper feature vectors for {n} continuous positions: "
                                 "the clip's semantic tokens and Whisper features disagree; rebuild the feature cache.")
            adapted = self.vq_adaptor(whisper_features.to(emb.dtype))  # [S, H]
            fused = torch.zeros_like(emb).masked_scatter(mask[..., None], adapted)
            # official fusion: (audio token embedding + adapted feature) * sqrt(2) at continuous positions
            emb = torch.where(mask[..., None], (emb + fused) * math.sqrt(2.0), emb)
        # The official forward adds the text stream only when the text ids it is fed are not all 0 (decoding
        # feeds one id per row, and a sampled id 0 then contributes nothing). Applied per row, so one such row
        # leaves the other rows of a batch as they would be alone; ``per_position``: per token, for a row whose
        # columns are separate sequences fed one token each.
        text = self.embed_tokens(text_input_ids)  # [B, T, H]
        fed = (text_input_ids != 0)[..., None] if per_position else (text_input_ids != 0).any(dim=1)[:, None, None]
        return emb + torch.where(fed, text, torch.zeros_like(text))

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool = False,
        run_mimo: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Cache | None]:
        """``[B, T, H]`` embeddings -> (normed trunk states ``[B, T, H]``, normed MIMO states or None, cache)."""
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        rope = self.rotary_emb(inputs_embeds, position_ids)
        kwargs = dict(attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                      position_embeddings=rope)
        hidden, mimo = inputs_embeds, None
        fork = self.config.kimia_mimo_transformer_from_layer_index
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, **kwargs)
            if run_mimo and i == fork:
                mimo = hidden
        if run_mimo:
            for layer in self.mimo_layers:
                mimo = layer(mimo, **kwargs)
            mimo = self.mimo_norm(mimo)
        return self.norm(hidden), mimo, cache


@dataclass
class KimiAudioOutput(ModelOutput):
    """``loss`` (text CE), ``logits`` (text, ``[B, T, V]`` or None), ``audio_logits`` (MIMO, when asked),
    ``hidden_states`` (normed trunk ``[B, T, H]``) and ``cache`` (transformers' name for the KV cache since 5.24)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    audio_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    cache: Cache | None = None


class KimiAudioForCausalLM(PreTrainedModel):
    """``MoonshotKimiaForCausalLM`` re-implemented: trunk + MIMO branch + ``lm_head`` + ``mimo_output``."""

    config_class = KimiAudioConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # the release stores one inv_freq per attention layer; we compute it once
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: KimiAudioConfig):
        super().__init__(config)
        self.model = KimiAudioTrunk(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor, text_input_ids: torch.Tensor, is_continuous_mask: torch.Tensor | None = None,
        whisper_features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool = False,
        labels: torch.Tensor | None = None, output_audio_logits: bool = False, **_: object,
    ) -> KimiAudioOutput:
        """Two streams ``[B, T]`` (+ Whisper features ``[S, D]``) -> text loss/logits, optionally audio logits.

        ``labels`` ``[B, T]`` are input-aligned text targets (``-100`` elsewhere): position t is trained
        to predict ``labels[t + 1]``. With labels, ``lm_head`` runs only at the trained positions and
        ``logits`` is None (the 168k-wide logits of every position would dominate memory).
        """
        embeds = self.model.embed(input_ids, text_input_ids, is_continuous_mask, whisper_features)
        hidden, mimo, cache = self.model(embeds, attention_mask, position_ids, cache, use_cache,
                                         run_mimo=output_audio_logits)
        loss = logits = None
        if labels is not None:
            loss = target_loss(self.lm_head, hidden, labels)
        else:
            logits = self.lm_head(hidden)
        audio_logits = self.mimo_output(mimo) if mimo is not None else None
        return KimiAudioOutput(loss=loss, logits=logits, audio_logits=audio_logits, hidden_states=hidden,
                               cache=cache)
