"""GRPO rollouts over a static KV cache, one decode step for all G completions of every question.

The eager loop of ``shared_prefix`` grows a dynamic cache of ``B*G`` rows by one token per step, each
row holding its own copy of the prompt, and samples with a full-vocabulary sort. At 7B shapes its
per-step cost is Python and kernel launches, not the bytes the step must read. Here:

- **Layout.** One cache row per question (``B`` rows, not ``B*G``), ``L = C + G*T`` slots: the prompt
  right-aligned in ``[0, C)`` (``C`` is the prompt length rounded up, so nearby prompt lengths reuse one
  cache and one graph), then step-major completion slots: slot ``C + t*G + g`` holds completion g's
  token t. A step feeds the newest ``B x G`` tokens as G query columns of each row (so
  transformers' ``StaticLayer`` writes them in order), under a 4-D mask that lets column g see its
  question's prompt and its own earlier tokens only. The prompt's keys and values are stored and
  read once per question per step, not G times.
- **Step.** Forward, LM head, sampling and the bookkeeping (end of completion, padding, the step
  counter) are tensor ops on fixed buffers with no host sync, so on CUDA the step is captured once
  as a CUDA graph (``torch.cuda.graphs``) and replayed; on CPU the same function runs eagerly.
- **Sampling** on device without a sort: suppressed ids to -inf, temperature, top-p by bisection on
  a probability threshold (fixed iterations), then one draw by the exponential race
  ``argmax(p / E)``, ``E ~ Exp(1)``, which picks token i with probability ``p_i``.

The log-prob of each sampled token under ``softmax(logits / temperature)`` (what the loss uses) comes
out with it; in fp32 tokens and log-probs equal the eager loop's (tests/backbones/test_static_decode.py).

- **Merged LoRA** (``merge_lora``, ``grpo.rollout.merge_lora``): before each rollout the LoRA linear layers'
  ``W + scaling * B A`` are written in place into persistent buffers (``lora.MergedLora``, one more copy of
  the LoRA'd weights), and for the rollout (prefill and steps) each of those layers runs one matmul on its
  buffer instead of the base matmul plus the LoRA branch's small kernels. The base and LoRA weights are never
  written, so the loss's log-probs, computed afterwards through the unmerged model, are unchanged. The
  buffers keep their addresses across rollouts, so a captured step stays valid; a step captured over merged
  buffers is replayed only in merged mode, over the same buffers (the mode and the buffers' version are part
  of the shape a run is kept for), and a step captured over the LoRA branch only in unmerged mode.

Shapes: B questions, G completions per question, P prompt tokens, C prompt slots, T new tokens,
L = C + G*T cache slots, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from aqa.backbones import shared_prefix as sp
from aqa.backbones.base import SamplingConfig
from aqa.backbones.lora import MergedLora

PROMPT_ROUND = 128  # prompt slots are a multiple of this: prompts of nearby lengths share a cache and a graph
NUCLEUS_ITERS = 32  # bisection steps of the top-p threshold: 2^-32 of the top probability


def nucleus_keep(probs: torch.Tensor, top_p: float, iters: int = NUCLEUS_ITERS) -> torch.Tensor:
    """``[N, V]`` probabilities -> ``[N, V]`` bool, the tokens top-p keeps, without sorting.

    A token stays when the tokens strictly more likely than it hold at most ``top_p`` (the rule of
    ``shared_prefix``'s sorted filter, ties aside); the most likely token always stays. With
    ``mass(x)`` the probability above ``x``, the kept tokens are those above the largest ``x`` with
    ``mass(x) > top_p``; bisection brackets it (``mass(lo) > top_p >= mass(hi)``), and after ``iters``
    halvings no other probability lies between ``lo`` and the smallest kept one.
    """
    hi = probs.amax(dim=-1, keepdim=True)  # nothing lies above the top probability
    lo = torch.zeros_like(hi)  # everything lies above 0 (top_p < 1)
    for _ in range(iters):
        mid = (lo + hi) * 0.5
        ok = (probs * (probs > mid)).sum(dim=-1, keepdim=True) <= top_p
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return probs > lo


def draw(logits: torch.Tensor, sampling: SamplingConfig, suppress: torch.Tensor,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``[N, V]`` logits: suppressed ids (``[V]`` bool) never, temperature, top-k
    (``topk``, a partial selection, not a sort), top-p.

    Returns ids ``[N]`` and their log-probs ``[N]`` under ``softmax(logits / temperature)``, unfiltered,
    as ``shared_prefix.completion_logprobs`` scores them for the loss.
    """
    scaled = logits.float() / sampling.temperature
    logp = scaled.log_softmax(dim=-1)
    kept = scaled.masked_fill(suppress, float("-inf"))
    if 0 < sampling.top_k < kept.shape[-1]:
        kth = kept.topk(sampling.top_k, dim=-1).values[:, -1:]  # [N, 1] the k-th largest logit
        kept = kept.masked_fill(kept < kth, float("-inf"))
    probs = kept.softmax(dim=-1)
    if sampling.top_p < 1.0:
        probs = probs * nucleus_keep(probs, sampling.top_p)
    race = torch.empty_like(probs).exponential_(generator=generator)
    ids = (probs / race).argmax(dim=-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


@dataclass(frozen=True)
class _Shape:
    """What a cache and a captured step are built for (with room for a prompt of up to ``_Run.slots`` tokens)."""

    head: int  # id of the LM head: one model's weights
    rows: int  # B
    columns: int  # G
    steps: int  # T
    vocab: int
    dtype: torch.dtype
    device: str
    temperature: float
    top_k: int
    top_p: float
    eos: tuple[int, ...]
    pad: int
    step_keys: tuple[str, ...]
    merged: int  # 0: the LoRA branch runs; else the version of the merged LoRA buffers the step reads


class _Run:
    """One shape's static cache, its buffers and (on CUDA) the captured step."""

    def __init__(self, shape: _Shape, slots: int, decoder: nn.Module, head: nn.Module, step_extra: dict,
                 n_layers: int, use_graph: bool):
        from transformers.cache_utils import Cache, StaticLayer

        self.shape, self.slots, self.decoder, self.head, self.step_extra = shape, slots, decoder, head, step_extra
        B, G, T, C, V = shape.rows, shape.columns, shape.steps, slots, shape.vocab
        dev = torch.device(shape.device)
        self.length = C + G * T
        self.cache = Cache(layers=[StaticLayer(max_cache_len=self.length) for _ in range(n_layers)])
        self.sampling = SamplingConfig(temperature=shape.temperature, top_k=shape.top_k, top_p=shape.top_p,
                                       max_new_tokens=T)
        slot = torch.arange(self.length, device=dev)
        completion = slot >= C
        self.own = completion[None, :] & ((slot - C) % G == torch.arange(G, device=dev)[:, None])  # [G, L]
        self.slot_step = torch.where(completion, (slot - C) // G, 0)  # [L]
        self.prompt_slots = torch.zeros(B, self.length, dtype=torch.bool, device=dev)  # [B, L]
        self.start = torch.zeros(B, dtype=torch.long, device=dev)  # [B] position of token 0
        self.suppress = torch.zeros(V, dtype=torch.bool, device=dev)
        self.eos = torch.tensor(shape.eos, dtype=torch.long, device=dev)
        self.ids = torch.zeros(B, G, dtype=torch.long, device=dev)  # the tokens fed next
        self.done = torch.zeros(B, G, dtype=torch.bool, device=dev)
        self.t = torch.zeros((), dtype=torch.long, device=dev)  # completion position of the tokens fed next
        self.tokens = torch.zeros(T + 1, B, G, dtype=torch.long, device=dev)  # [T+1, B, G] (+1: warm-up room)
        self.keep = torch.zeros(T + 1, B, G, dtype=torch.bool, device=dev)
        self.logp = torch.zeros(T + 1, B, G, dtype=torch.float32, device=dev)
        self.generator: torch.Generator | None = None
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    # -- per rollout -------------------------------------------------------------------------------
    def load(self, dyn_cache, prompt_mask: torch.Tensor, suppress: torch.Tensor) -> None:
        """The prompt's keys and values (a dynamic cache of B rows, P slots) right-aligned into ``[0, C)``."""
        B, P = prompt_mask.shape
        C = self.slots
        for layer, prefix in zip(self.cache.layers, dyn_cache.layers):
            if not layer.is_initialized:
                layer.lazy_initialization(prefix.keys, prefix.values)
            layer.keys[:, :, C - P:C].copy_(prefix.keys)
            layer.values[:, :, C - P:C].copy_(prefix.values)
            layer.cumulative_length.fill_(C)
        self.prompt_slots.zero_()
        self.prompt_slots[:, C - P:C] = prompt_mask.bool()
        self.start.copy_(prompt_mask.sum(dim=1))
        self.suppress.copy_(suppress)
        self.done.zero_()
        self.t.zero_()

    def first(self, last: torch.Tensor) -> None:
        """Token 0 of every completion from the prompt's last logits ``[B, V]``."""
        B, G = self.ids.shape
        nxt, logp = draw(last.repeat_interleave(G, dim=0), self.sampling, self.suppress, self.generator)
        self._record(0, nxt.view(B, G), logp.view(B, G))

    def _record(self, index, nxt: torch.Tensor, logp: torch.Tensor) -> None:
        """Token ``index`` (int or 0-dim tensor) of every completion: padding after an end, masks, the state."""
        done = self.done
        nxt = torch.where(done, torch.full_like(nxt, self.shape.pad), nxt)
        at = torch.as_tensor(index, device=nxt.device).view(1)
        self.tokens.index_copy_(0, at, nxt[None])
        self.keep.index_copy_(0, at, (~done)[None])
        self.logp.index_copy_(0, at, logp[None])
        self.done.copy_(done | torch.isin(nxt, self.eos))
        self.ids.copy_(nxt)

    def step(self) -> None:
        """Feed token ``t`` of every completion, sample token ``t + 1``. No host sync: capturable."""
        B, G = self.ids.shape
        t = self.t
        allowed = self.prompt_slots[:, None, None, :] | (self.own & (self.slot_step <= t))[None, None]  # [B,1,G,L]
        dtype = self.shape.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=t.device).masked_fill(~allowed, torch.finfo(dtype).min)
        out = self.decoder(input_ids=self.ids, attention_mask=mask, position_ids=self.start[:, None] + t,
                           cache=self.cache, use_cache=True, **self.step_extra)
        logits = self.head(out.last_hidden_state)  # [B, G, V]
        nxt, logp = draw(logits.reshape(B * G, -1), self.sampling, self.suppress, self.generator)
        self._record(t + 1, nxt.view(B, G), logp.view(B, G))
        self.t.add_(1)

    def capture(self) -> None:
        """Record :meth:`step` as a CUDA graph (after warm-up steps on a side stream, as the CUDA graph
        docs ask). Warm-up changes the state; the caller loads the rollout again afterwards."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.t.zero_()
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.t.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self.graph = graph

    def run_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class StaticDecoder:
    """Samples G completions per question over a static cache (module docstring). Keep one per model and
    reuse it: the cache and, on CUDA, the captured step are rebuilt only when the shape outgrows them.

    ``cuda_graph``: capture the step as a CUDA graph on CUDA devices (no effect on CPU).
    ``merge_lora``: sample through merged copies of the LoRA linear layers' weights (module docstring; costs
    one more copy of the LoRA'd weights, kept while the decoder lives; a model without LoRA layers: no effect).
    """

    def __init__(self, cuda_graph: bool = True, merge_lora: bool = False):
        self.cuda_graph = cuda_graph
        self.merge_lora = merge_lora
        self.merged: MergedLora | None = None  # the buffers, from the first merged rollout on
        self._run: _Run | None = None

    @torch.no_grad()
    def sample(self, model: nn.Module, prompt: sp.PromptBatch, num_samples: int, sampling: SamplingConfig,
               rules: sp.TokenRules, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``shared_prefix.sample``; also returns each token's log-prob ``[B, G, T]`` (see :func:`draw`)."""
        if sampling.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0 for GRPO rollouts (G equal greedy answers teach "
                             "nothing).")
        merged = 0
        if self.merge_lora:
            self.merged = self.merged or MergedLora()
            merged = self.merged.refresh(model)  # the LoRA weights as they are now, in place
        with self.merged.patched() if merged else contextlib.nullcontext():
            return self._sample(model, prompt, num_samples, sampling, rules, generator, merged)

    def _sample(self, model, prompt, num_samples, sampling, rules, generator, merged):
        decoder, head = sp._parts(model)
        last, dyn = sp._prefill(model, prompt, 1)  # [B, V], a dynamic cache of B rows
        if any(getattr(layer, "is_sliding", False) for layer in dyn.layers):
            raise ValueError("the static rollout cache holds full-attention layers only; this model has "
                             "sliding-window layers: set grpo.rollout.engine=eager.")
        B, P = prompt.input_ids.shape
        V = last.shape[-1]
        run = self._prepare(decoder, head, prompt, B, num_samples, P, V, last, sampling, rules, len(dyn.layers),
                            merged)
        suppress = torch.zeros(V, dtype=torch.bool, device=last.device)
        suppress[sp._suppress_tensor(rules, V, last.device)] = True
        run.generator = None if run.use_graph else generator  # a captured graph draws from the device's RNG
        run.load(dyn, prompt.attention_mask, suppress)
        if run.use_graph and run.graph is None and sampling.max_new_tokens > 1:
            run.capture()
            run.load(dyn, prompt.attention_mask, suppress)
        del dyn
        run.first(last)
        n = 1
        while n < sampling.max_new_tokens and not bool(run.done.all()):
            run.run_step()
            n += 1
        order = (1, 2, 0)  # [T, B, G] -> [B, G, T]
        return (run.tokens[:n].permute(order).clone(), run.keep[:n].permute(order).long(),
                run.logp[:n].permute(order).clone())

    def _prepare(self, decoder, head, prompt, B, G, P, V, last, sampling, rules, n_layers, merged) -> _Run:
        """The run for this shape: the current one when the prompt fits its slots, else a new one."""
        shape = _Shape(id(head), B, G, sampling.max_new_tokens, V, last.dtype, str(last.device),
                       float(sampling.temperature), int(sampling.top_k), float(sampling.top_p), tuple(rules.eos_ids), int(rules.pad_id),
                       tuple(sorted(prompt.step_extra)), merged)
        run = self._run
        if run is not None and run.shape == shape and P <= run.slots:
            run.decoder = decoder  # a new view over the same weights (Kimi's) computes what the captured one did
            return run
        self._run = None  # free the old cache before the new one is allocated
        use_graph = self.cuda_graph and last.device.type == "cuda"
        self._run = _Run(shape, math.ceil(P / PROMPT_ROUND) * PROMPT_ROUND, decoder, head, dict(prompt.step_extra),
                         n_layers, use_graph)
        return self._run
