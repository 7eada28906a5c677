"""BEATs (Chen et al., 2022) as a plain PyTorch module whose ``state_dict`` has the official names.

Written from the architecture of microsoft/unilm ``beats/`` so that an official checkpoint's
``model`` dict loads with ``strict=True`` (252 tensors for the AS2M fine-tuned ``cpt2`` structure):

- a 16x16 patch embedding over the (T, 128) fbank; the patch grid is flattened time-major, so token
  ``t * 8 + f`` is frequency patch ``f`` of the 160 ms row ``t``;
- a weight-normalised convolutional positional embedding (keys ``weight_g`` / ``weight_v``, the layout
  ``torch.nn.utils.weight_norm(dim=2)`` writes; computed here without the deprecated hook);
- post-LN Transformer layers with DeepNorm residual scaling, one T5-style bucketed relative-position
  table shared by all layers (it appears under every layer's key, as in the official state_dict), and
  the gated relative position of WavLM (``grep_linear``, ``grep_a``);
- the fine-tuned head: a class predictor on *every* token. The official model averages token logits
  over non-padded tokens and applies a sigmoid (clip probabilities); here the same logits are also read
  per row: ``token_logits.view(B, R, 8, C).mean(2)`` (segment logits every 160 ms).

Attention uses ``scaled_dot_product_attention`` with the position bias as an additive mask; the
official code's max-subtraction trick (for fp16 range) leaves the softmax unchanged, so results agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aqa.sed.config import BeatsConfig


@dataclass
class BeatsOutput:
    """What one forward pass gives. ``R`` rows of 160 ms, ``N = R * 8`` tokens, ``C`` classes."""

    hidden: torch.Tensor  # [B, N, D] last-layer token states
    row_mask: torch.Tensor  # [B, R] bool, True where the row holds real (unpadded) audio
    token_logits: torch.Tensor | None = None  # [B, N, C]
    row_logits: torch.Tensor | None = None  # [B, R, C] segment logits: token logits meaned over frequency
    clip_logits: torch.Tensor | None = None  # [B, C] token logits meaned over the real tokens

    @property
    def clip_probs(self) -> torch.Tensor:
        """``[B, C]``: the official fine-tuned model's output (sigmoid of the mean token logit)."""
        if self.clip_logits is None:
            raise ValueError("this BEATs has no predictor (finetuned_model is false): it gives no class scores.")
        return torch.sigmoid(self.clip_logits)


def token_padding(frame_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[B, T]`` frame mask (True on real frames) -> ``[B, N]`` token padding (True where padded), by the
    official rule (BEATs' ``forward_padding_mask``): the frames past a multiple of N are dropped, the rest is cut
    into N equal consecutive chunks in token order, and a token is padding when its whole chunk is.

    Tokens are ordered row * F' + frequency patch, so a chunk is 16 / F' consecutive frames of the token's own
    row, not the token's patch: a mask that ends inside a row pads only the row's later tokens. For masks that
    end on a row boundary (what this project's callers build) this equals padding whole rows."""
    pad = ~frame_mask.bool()
    extra = pad.shape[1] % n_tokens
    if extra:
        pad = pad[:, :-extra]
    return pad.reshape(pad.shape[0], n_tokens, -1).all(-1)


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets of ``relative = key position - query position`` (any shape, long).

    Half the buckets for each direction; within one, distances below a quarter of ``num_buckets`` get a
    bucket each and larger ones share log-spaced buckets up to ``max_distance``.
    """
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    dist = relative.abs()
    max_exact = half // 2
    # clamp(min=1) only keeps log() finite where the exact branch is taken anyway
    log_ratio = torch.log(dist.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + log_ratio * (half - max_exact)).long().clamp(max=half - 1)
    return bucket + torch.where(dist < max_exact, dist, large)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with ``weight = weight_g * weight_v / ||weight_v||`` (norm over all but the kernel axis)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.padding = kernel // 2
        self.groups = groups

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, N] -> [B, D, N + 1 - kernel % 2]
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class TrimLast(nn.Module):
    """Drop the extra output step an even kernel with ``padding = kernel // 2`` produces ("SamePad")."""

    def __init__(self, kernel: int):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : x.shape[-1] - self.remove]


class BeatsAttention(nn.Module):
    """Multi-head self-attention with the shared bucketed relative bias and its per-query gate."""

    def __init__(self, cfg: BeatsConfig, owns_bias_table: bool):
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.heads, self.head_dim = heads, dim // heads
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        if owns_bias_table:  # layers 1.. get layer 0's table assigned after construction
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        self.attention_dropout = cfg.attention_dropout

    def position_bias(self, length: int) -> torch.Tensor:
        """``[H, N, N]`` additive bias for ``N`` tokens (the same for every layer)."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None, key_padding: torch.Tensor | None):
        """``x`` [B, N, D]; ``pos_bias`` [H, N, N]; ``key_padding`` [B, N] bool (True = padding)."""
        b, n, d = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        mask = None
        if pos_bias is not None:
            mask = pos_bias.unsqueeze(0)  # [1, H, N, N]
            if self.gru_rel_pos:
                # The gate reads the unscaled query: two sigmoid gates per head and query position.
                gates = torch.sigmoid(self.grep_linear(q).view(b, self.heads, n, 2, 4).sum(-1))  # [B, H, N, 2]
                gate_a, gate_b = gates[..., :1], gates[..., 1:]
                mask = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * mask  # [B, H, N, N]
        if key_padding is not None:
            pad = torch.zeros(b, 1, 1, n, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(key_padding[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class BeatsLayer(nn.Module):
    def __init__(self, cfg: BeatsConfig, owns_bias_table: bool):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = BeatsAttention(cfg, owns_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0  # DeepNorm residual scale
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.activation = cfg.activation_fn

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h) if self.activation == "gelu" else F.relu(h)
        return self.dropout(self.fc2(self.activation_dropout(h)))

    def forward(self, x, pos_bias, key_padding):  # [B, N, D] -> [B, N, D]
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), pos_bias, key_padding))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.alpha + self.dropout(self.self_attn(x, pos_bias, key_padding)))
        return self.final_layer_norm(x * self.alpha + self._ffn(x))


class BeatsEncoder(nn.Module):
    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups),
                                      TrimLast(cfg.conv_pos), nn.GELU())
        shared = cfg.relative_position_embedding
        self.layers = nn.ModuleList([BeatsLayer(cfg, owns_bias_table=shared and i == 0)
                                     for i in range(cfg.encoder_layers)])
        if shared:
            # One table for all layers; registered on each so every layer's key exists, as in the official model.
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        """``x`` [B, N, D] token embeddings; ``key_padding`` [B, N] (True = padding) -> [B, N, D]."""
        cfg = self.cfg
        if key_padding is not None:
            x = x.masked_fill(key_padding[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        pos_bias = self.layers[0].self_attn.position_bias(x.shape[1]) if cfg.relative_position_embedding else None
        ratio = cfg.layer_wise_gradient_decay_ratio
        for layer in self.layers:
            if ratio != 1.0 and self.training and torch.is_grad_enabled():
                x = x * ratio + x.detach() * (1.0 - ratio)  # same value, gradient scaled by ratio
            if self.training and cfg.encoder_layerdrop > 0 and float(torch.rand(())) < cfg.encoder_layerdrop:
                continue
            x = layer(x, pos_bias, key_padding)
        if cfg.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BeatsModel(nn.Module):
    """BEATs over a normalised fbank; see the module docstring for the layout."""

    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        self.cfg = cfg
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = BeatsEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return 0 if self.predictor is None else self.predictor.out_features

    def reset_parameters(self) -> None:
        """Random init in the spirit of the official one (BERT normal(0.02), DeepNorm gains); works on meta."""
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        conv = self.encoder.pos_conv[0]
        nn.init.normal_(conv.weight_v, std=math.sqrt(4.0 / (cfg.conv_pos * cfg.encoder_embed_dim)))
        nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.weight_g.copy_(conv.weight_v.norm(dim=(0, 1), keepdim=True))  # start with weight == v
        if cfg.deep_norm:
            beta = math.pow(8 * cfg.encoder_layers, -0.25)
            for layer in self.encoder.layers:
                a = layer.self_attn
                for lin, gain in ((a.k_proj, 1.0), (a.q_proj, 1.0), (a.v_proj, beta), (a.out_proj, beta),
                                  (layer.fc1, beta), (layer.fc2, beta)):
                    nn.init.xavier_normal_(lin.weight, gain=gain)

    def forward(self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None) -> BeatsOutput:
        """``fbank`` [B, T, 128] (normalised, see :mod:`aqa.sed.fbank`); ``frame_mask`` [B, T] bool, True on
        real frames (None: all real). Rows are whole 16-frame patches; trailing frames are dropped."""
        b, t, mels = fbank.shape
        p, fp = self.cfg.input_patch_size, self.cfg.freq_patches
        rows = t // p
        if rows == 0:
            raise ValueError(f"BEATs needs at least {p} fbank frames (0.175 s of audio); got {t}.")
        if mels != self.cfg.num_mel_bins:
            raise ValueError(f"BEATs expects {self.cfg.num_mel_bins} mel bins, got {mels}.")
        x = self.patch_embedding(fbank.unsqueeze(1))  # [B, E, R, F']
        x = self.layer_norm(x.flatten(2).transpose(1, 2))  # [B, N, E], token = row * F' + freq patch
        if frame_mask is None:
            row_mask = torch.ones(b, rows, dtype=torch.bool, device=fbank.device)
            key_padding = None
        else:
            key_padding = token_padding(frame_mask, rows * fp)  # [B, N]
            row_mask = ~key_padding.view(b, rows, fp).all(-1)  # [B, R]: a row with any real token
            key_padding = key_padding if key_padding.any() else None
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.encoder(self.dropout_input(x), key_padding)  # [B, N, D]
        out = BeatsOutput(hidden=x, row_mask=row_mask)
        if self.predictor is None:
            return out
        logits = self.predictor(self.predictor_dropout(x))  # [B, N, C]
        out.token_logits = logits
        out.row_logits = logits.view(b, rows, fp, -1).mean(2)  # [B, R, C]
        real = (~key_padding).to(logits.dtype) if key_padding is not None else torch.ones_like(logits[..., 0])
        out.clip_logits = (logits * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)  # [B, C]
        return out
