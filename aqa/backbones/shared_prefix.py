"""GRPO rollouts and completion log-probs with the prompt computed once per question.

Generic over Hugging Face causal LMs with a KV cache whose model exposes ``.model`` (the decoder
stack, which takes the prompt's extra inputs such as audio features on the prefill) and an output
embedding (``get_output_embeddings()``): ``Qwen2ForCausalLM`` and
``Qwen2AudioForConditionalGeneration`` alike.

For G completions of each of B questions, the prompt (audio included) runs once per question
(``[B, P]``, left-padded so every prompt ends in the same column), and its KV cache is expanded to
``B*G`` rows for the completions. Log-probs use the same layout with gradients flowing through the
prefix, so the loss and its gradients equal those of the naive layout (prompt and audio repeated G
times, as r1-aqa does), which is kept here for the equality test and the benchmark.

Shapes: B questions, G completions per question, P prompt tokens, T completion tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from aqa.backbones.base import SamplingConfig


@dataclass
class PromptBatch:
    """Encoded prompts, one row per question (never repeated G times)."""

    input_ids: torch.Tensor  # [B, P] int64, left-padded
    attention_mask: torch.Tensor  # [B, P] 1 on real tokens
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # prefill-only inputs, [B, ...] (audio)
    temperature: float = 1.0  # what completions were sampled at; their log-probs use the same
    # decoder inputs of every step of ``static_decode``, which feeds a question's G completions as G columns
    # of one row (Kimi-Audio: apply its per-sequence text-stream rule per column)
    step_extra: dict[str, Any] = field(default_factory=dict)
    # the ``extra`` entries laid out per prompt position (``[B, P, ...]``, left-padded with the prompt): they
    # lose their padding columns with it in :meth:`rows`; every other entry is per question, ``[B, ...]``
    per_position: tuple[str, ...] = ()

    def rows(self, start: int, end: int) -> PromptBatch:
        """Questions ``[start, end)`` as a batch of their own, without the padding columns none of them needs
        (positions count real tokens only, so every question's prompt reads exactly as in the whole batch)."""
        mask = self.attention_mask[start:end]
        first = mask.shape[1] - int(mask.sum(dim=1).max())  # left padding common to the chunk's rows
        extra = {k: v[start:end, first:] if k in self.per_position else v[start:end] for k, v in self.extra.items()}
        return PromptBatch(self.input_ids[start:end, first:], mask[:, first:], extra, self.temperature,
                           self.step_extra, self.per_position)


@dataclass
class TokenRules:
    """Which ids end a completion and which may never be sampled."""

    eos_ids: list[int]  # any of them ends a completion (it is kept, and masked in)
    pad_id: int  # fills completions after their end
    suppress_ids: list[int]  # special / media tokens the model would read back as input (never sampled)


def token_rules(tokenizer, model: nn.Module) -> TokenRules:
    """EOS from the model's generation config (else the tokenizer's); every special or added-special
    token and every id past the tokenizer (padded embedding rows) is suppressed, EOS excepted."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if not eos_ids:
        raise ValueError("no EOS token: set eos_token_id in the checkpoint's generation_config.json.")
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    _, head = _parts(model)
    vocab = head.weight.shape[0]
    special |= set(range(len(tokenizer), vocab))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return TokenRules(eos_ids=eos_ids, pad_id=int(pad), suppress_ids=sorted(special - set(eos_ids)))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ids ``[B, P]`` left-padded with ``pad_id`` and their mask ``[B, P]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    decoder = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or head is None:
        raise TypeError(f"{type(model).__name__} has no .model decoder and output embedding; pass the unwrapped "
                        "Hugging Face causal LM (backbones unwrap PEFT/DeepSpeed before calling this module).")
    return decoder, head


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: ``[B, P]`` -> ``[B, P]`` (pads get 0, they are masked)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _prefill(model: nn.Module, prompt: PromptBatch, repeat: int):
    """Run the prompts once; returns the last position's logits ``[B*repeat, V]`` and the KV cache
    expanded to ``B*repeat`` rows (row ``b*repeat + g`` is completion g of question b)."""
    decoder, head = _parts(model)
    out = decoder(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                  position_ids=_positions(prompt.attention_mask), use_cache=True, **prompt.extra)
    last = head(out.last_hidden_state[:, -1])  # [B, V]: left padding puts every prompt's end in the last column
    cache = out.cache
    if repeat > 1:
        index = torch.arange(prompt.input_ids.shape[0], device=last.device).repeat_interleave(repeat)
        cache.reorder_cache(index)  # index_select: differentiable, so gradients reach the shared prefix
        last = last[index]
    return last, cache


def _filter_logits(logits: torch.Tensor, sampling: SamplingConfig, suppress: torch.Tensor) -> torch.Tensor:
    """Suppressed ids to -inf, temperature, then top-k and top-p (nucleus) filtering. ``[N, V]`` -> ``[N, V]``."""
    logits = logits.float()
    logits[:, suppress] = float("-inf")
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # [N, 1] the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p; the first token always stays.
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _suppress_tensor(rules: TokenRules, vocab: int, device: torch.device) -> torch.Tensor:
    ids = sorted({i for i in rules.suppress_ids if 0 <= i < vocab} - set(rules.eos_ids))
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def _decode(model: nn.Module, last: torch.Tensor, cache, prompt_mask: torch.Tensor, sampling: SamplingConfig,
            rules: TokenRules, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``last`` ``[N, V]`` and the cache of N rows; returns ids and mask ``[N, T]``."""
    if sampling.temperature <= 0:
        raise ValueError("sampling.temperature must be > 0 for GRPO rollouts (G equal greedy answers teach nothing).")
    decoder, head = _parts(model)
    n, device = last.shape[0], last.device
    suppress = _suppress_tensor(rules, last.shape[-1], device)
    eos = torch.tensor(rules.eos_ids, dtype=torch.long, device=device)
    start = prompt_mask.sum(dim=1)  # [N] each row's next position
    mask = prompt_mask.clone()
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, keep = [], []
    logits = last
    for step in range(sampling.max_new_tokens):
        probs = _filter_logits(logits, sampling, suppress).softmax(dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [N]
        nxt = torch.where(done, torch.full_like(nxt, rules.pad_id), nxt)
        keep.append(~done)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or step == sampling.max_new_tokens - 1:
            break
        mask = torch.cat([mask, keep[-1].long()[:, None]], dim=1)  # the fed token is real iff it was kept
        out = decoder(input_ids=nxt[:, None], attention_mask=mask, position_ids=(start + step)[:, None],
                      cache=cache, use_cache=True)
        cache = out.cache
        logits = head(out.last_hidden_state[:, -1])
    return torch.stack(tokens, dim=1), torch.stack(keep, dim=1).long()


class Decoder(Protocol):
    """A decode loop other than the eager one below (``static_decode.StaticDecoder``)."""

    def sample(self, model: nn.Module, prompt: PromptBatch, num_samples: int, sampling: SamplingConfig,
               rules: TokenRules, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Completion ids, mask and the sampled tokens' log-probs, each ``[B, G, T]``."""
        ...


def sample(model: nn.Module, prompt: PromptBatch, num_samples: int, sampling: SamplingConfig, rules: TokenRules,
           generator: torch.Generator | None = None, decoder: Decoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G completions per question from one prefill per question.

    Returns ``completion_ids`` ``[B, G, T]`` (right-padded with ``pad_id``) and ``completion_mask``
    ``[B, G, T]`` (1 up to and including the first EOS). ``rules.suppress_ids`` are never sampled.
    ``decoder``: the loop that samples (None: the eager loop here, a growing cache of ``B*G`` rows).
    """
    if decoder is not None:
        ids, mask, _ = decoder.sample(model, prompt, num_samples, sampling, rules, generator)
        return ids, mask
    B = prompt.input_ids.shape[0]
    with torch.no_grad():
        last, cache = _prefill(model, prompt, num_samples)
    index = torch.arange(B, device=last.device).repeat_interleave(num_samples)
    ids, mask = _decode(model, last, cache, prompt.attention_mask[index], sampling, rules, generator)
    return ids.view(B, num_samples, -1), mask.view(B, num_samples, -1)


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[N, T, V]`` logits and ``[N, T]`` ids -> ``[N, T]`` log-probs under softmax(logits / temperature)."""
    logits = logits.float() / temperature
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def completion_logprobs(model: nn.Module, prompt: PromptBatch, completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[B, G, T]`` of the completions, the prompt run once per question.

    Differentiable: gradients flow through the completions and the shared prefix. The logits are
    divided by ``prompt.temperature`` (the sampling one, as TRL does), so ratios compare the sampled
    distribution.
    Positions after a completion's end hold values of no meaning; the loss masks them.
    """
    B, G, T = completion_ids.shape
    last, cache = _prefill(model, prompt, G)  # [B*G, V]
    flat = completion_ids.reshape(B * G, T)
    logits = [last[:, None, :]]
    if T > 1:
        decoder, head = _parts(model)
        index = torch.arange(B, device=flat.device).repeat_interleave(G)
        p_mask = prompt.attention_mask[index]  # [B*G, P]
        c_mask = completion_mask.reshape(B * G, T)[:, :-1].to(p_mask.dtype)
        start = p_mask.sum(dim=1, keepdim=True)  # [B*G, 1]
        out = decoder(input_ids=flat[:, :-1], attention_mask=torch.cat([p_mask, c_mask], dim=1),
                      position_ids=start + torch.arange(T - 1, device=flat.device)[None, :],
                      cache=cache, use_cache=True)
        logits.append(head(out.last_hidden_state))  # [B*G, T-1, V]
    return _token_logprobs(torch.cat(logits, dim=1), flat, prompt.temperature).view(B, G, T)


# -- the naive layout (r1-aqa): prompt and audio repeated G times --------------------------------------
def repeat_prompt(prompt: PromptBatch, num_samples: int) -> PromptBatch:
    """Every question's row (audio included) repeated G times: ``[B, ...]`` -> ``[B*G, ...]``."""
    return PromptBatch(prompt.input_ids.repeat_interleave(num_samples, dim=0),
                       prompt.attention_mask.repeat_interleave(num_samples, dim=0),
                       {k: v.repeat_interleave(num_samples, dim=0) for k, v in prompt.extra.items()},
                       prompt.temperature, prompt.step_extra, prompt.per_position)


def naive_sample(model: nn.Module, prompt: PromptBatch, num_samples: int, sampling: SamplingConfig,
                 rules: TokenRules, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`sample`, but the prefill runs on ``B*G`` repeated prompts (audio encoded G times)."""
    B = prompt.input_ids.shape[0]
    rep = repeat_prompt(prompt, num_samples)
    with torch.no_grad():
        last, cache = _prefill(model, rep, 1)
    ids, mask = _decode(model, last, cache, rep.attention_mask, sampling, rules, generator)
    return ids.view(B, num_samples, -1), mask.view(B, num_samples, -1)


def naive_completion_logprobs(model: nn.Module, prompt: PromptBatch, completion_ids: torch.Tensor,
                              completion_mask: torch.Tensor) -> torch.Tensor:
    """As :func:`completion_logprobs`, but one full forward of ``[B*G, P+T]`` rows, prompt and audio repeated."""
    B, G, T = completion_ids.shape
    rep = repeat_prompt(prompt, G)
    decoder, head = _parts(model)
    flat = completion_ids.reshape(B * G, T)
    mask = torch.cat([rep.attention_mask, completion_mask.reshape(B * G, T).to(rep.attention_mask.dtype)], dim=1)
    out = decoder(input_ids=torch.cat([rep.input_ids, flat], dim=1), attention_mask=mask,
                  position_ids=_positions(mask), use_cache=False, **rep.extra)
    P = rep.input_ids.shape[1]
    logits = head(out.last_hidden_state[:, P - 1: P + T - 1])  # [B*G, T, V]: position t predicts token t+1
    return _token_logprobs(logits, flat, prompt.temperature).view(B, G, T)
