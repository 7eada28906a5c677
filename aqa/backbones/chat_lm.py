"""What every Hugging Face chat causal LM behind the protocol shares: Qwen2-Audio and the text LLM alike.

A subclass says how a question becomes prompt text and tokens (``_chat_prefix``, ``_prompt_ids``) and
which extra tensors the decoder takes on the prompt (``_batch_inputs``: the audio features, or nothing
for a text model). Everything else is here once: the SFT collate, option-letter logits with the prompt
prefix shared by K option orders (``option_scoring``), greedy answers and the GRPO rollouts / log-probs
of ``shared_prefix``.

The wrapped model must be an HF causal LM with ``.model`` (the decoder stack, taking ``input_ids``,
``attention_mask``, ``position_ids``, ``cache`` and the extra inputs) and an output embedding.

Shapes: B questions, R = sum of orders over questions, T tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aqa.backbones import shared_prefix
from aqa.backbones.base import Backbone, Rollout
from aqa.backbones.letters import answer_lead, gather_letter_logits, letter_token_ids
from aqa.backbones.lm_loss import IGNORE_INDEX, target_loss
from aqa.backbones.option_scoring import OptionScorer, canonical_per_question, option_scores
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig, render_target

ASSISTANT_START = "<|im_start|>assistant\n"  # ChatML: what the chat templates of these models end with


def unwrap(model: nn.Module) -> nn.Module:
    """The plain HF model under PEFT / DeepSpeed / DDP wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Scoring runs without dropout (LoRA's included), then the caller's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def system_turn(prompt: PromptConfig) -> list[dict]:
    """The chat messages before the user turn: ``prompt.system`` as a system message, or none (the chat
    template then writes its default system turn)."""
    return [{"role": "system", "content": prompt.system}] if prompt.system is not None else []


def right_pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ids ``[R, T]`` padded on the right with ``value``, and mask ``[R, T]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class ChatLMBackbone(Backbone):
    """The protocol for ChatML causal LMs, given the prompt hooks below. Not registered itself.

    A subclass sets ``model``, ``tokenizer``, ``prompt`` and ``pad_id`` in its constructor and calls
    ``_init_chat_state()``.
    """

    model: nn.Module
    tokenizer: Any
    prompt: PromptConfig
    pad_id: int

    def _init_chat_state(self) -> None:
        self._letter_ids: torch.Tensor | None = None  # computed on first scoring call

    # -- hooks -----------------------------------------------------------------------------------
    def _chat_prefix(self, ex: Example, choices: list[str]) -> str:
        """Chat text up to and including the assistant start ``<|im_start|>assistant\\n``."""
        raise NotImplementedError

    def _prompt_ids(self, ids: list[int], ex: Example) -> list[int]:
        """Token ids of a prompt as the model reads them (e.g. one audio token expanded per frame)."""
        return ids

    def _batch_inputs(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Extra decoder inputs of the prompts, one row per question ``[B, ...]`` on the CPU (audio)."""
        return {}

    def _prefix_only_ids(self) -> set[int]:
        """Tokens that must lie in the prefix the K option orders share (the audio placeholders)."""
        return set()

    # -- helpers ---------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefill_inputs(self, hf: nn.Module, examples: list[Example], device) -> dict[str, torch.Tensor]:
        """``_batch_inputs`` on ``device``; floating ones in the model's dtype."""
        return {k: v.to(device=device, dtype=hf.dtype if v.is_floating_point() else v.dtype)
                for k, v in self._batch_inputs(examples).items()}

    # -- SFT -------------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Prompt + target + ``<|im_end|>``, right-padded; labels only on the target and ``<|im_end|>``.

        Returns input_ids / attention_mask / labels ``[B, T]`` plus the ``_batch_inputs`` (audio features).
        """
        rows, labels = [], []
        for ex in examples:
            if ex.answer_index is None:
                raise ValueError(f"example {ex.id} has no answer: only answered examples can be collated for SFT.")
            prompt = self._chat_prefix(ex, ex.choices)
            target = render_target(ex.choices, ex.answer_index, self.prompt)
            prompt_ids = self._encode(prompt)
            full_ids = self._encode(prompt + target + "<|im_end|>")
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(f"target {target!r} merges with the assistant start in tokenization; change "
                                 "prompt.target_format so the answer starts a new token.")
            ids = self._prompt_ids(full_ids, ex)
            n_target = len(full_ids) - len(prompt_ids)
            rows.append(ids)
            labels.append([IGNORE_INDEX] * (len(ids) - n_target) + ids[len(ids) - n_target :])
        input_ids, attention_mask = right_pad(rows, self.pad_id)
        label_ids, _ = right_pad(labels, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
                **self._batch_inputs(examples)}

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean CE over the target tokens, the LM head run at those positions only (``lm_loss``): the same
        loss as the HF model's own, without its ``[B, T, V]`` logits."""
        hf = unwrap(model)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = hf.model(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
        return target_loss(hf.get_output_embeddings(), hidden, batch["labels"])

    # -- option logits -------------------------------------------------------------------------
    def letter_ids(self) -> torch.Tensor:
        """``[26]`` token ids of ``A..Z`` right after the assistant start and the target's lead."""
        if self._letter_ids is None:
            self._letter_ids = torch.tensor(letter_token_ids(self._encode, ASSISTANT_START + answer_lead(self.prompt)))
        return self._letter_ids

    def _scoring_ids(self, examples: list[Example], orders: list[list[list[int]]]) -> list[list[list[int]]]:
        """Prompt ids per question and order, ending at the answer position."""
        lead = answer_lead(self.prompt)
        texts = [self._chat_prefix(ex, [ex.choices[j] for j in order]) + lead
                 for ex, ords in zip(examples, orders) for order in ords]
        flat = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"])  # one batched call
        return [[self._prompt_ids(next(flat), ex) for _ in ords] for ex, ords in zip(examples, orders)]

    @torch.no_grad()
    def option_logits(self, model, examples, orders=None, share_prefix: bool = True) -> list[torch.Tensor]:
        """Letter logits per order, returned in canonical order: a ``[K_b, N_b]`` tensor per question.

        With ``share_prefix`` the tokens common to a question's K prompts (system, audio, events, question)
        run once, and the K option suffixes run from that KV cache; otherwise every order runs in full.
        """
        hf = unwrap(model)
        device = next(hf.parameters()).device
        orders = orders or [[list(range(len(ex.choices)))] for ex in examples]
        prompts = self._scoring_ids(examples, orders)
        with eval_mode(model):
            presented = option_scores(self._scorer(hf, examples, device), prompts, device, share_prefix)  # [R, 26]
        return canonical_per_question(presented, orders, [len(ex.choices) for ex in examples])

    def _read_letters(self, hf, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[R, T, H]`` -> letter logits ``[R, 26]`` at ``positions`` (the LM head runs on R rows only)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = hf.get_output_embeddings()(hidden[rows, positions.to(hidden.device)])[:, None, :]  # [R, 1, V]
        return gather_letter_logits(logits, torch.zeros_like(positions), self.letter_ids())

    def _scorer(self, hf, examples: list[Example], device) -> OptionScorer[list[int]]:
        """The decoder runs of ``option_scoring`` over token-id rows; the extra inputs (audio) go with the
        prefix, or with every row when rows run in full."""
        extra = self._prefill_inputs(hf, examples, device)  # [B, ...] per question
        only_prefix = self._prefix_only_ids()

        def check(prefixes: list[list[int]], suffixes: list[list[int]]) -> None:
            if only_prefix and any(only_prefix.intersection(s) for s in suffixes):
                raise ValueError("audio tokens differ between option orders; the audio must precede the options.")

        def prefill(ids: torch.Tensor, mask: torch.Tensor):
            return hf.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **extra).cache

        def extend(ids, mask, positions, cache, index) -> torch.Tensor:
            if cache is None:  # full rows: each takes its question's extra inputs
                rows_extra = {k: v[index.to(v.device)] for k, v in extra.items()}
                out = hf.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **rows_extra)
            else:  # suffixes: the extra inputs are in the cache already
                out = hf.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), cache=cache, use_cache=True)
            return out.last_hidden_state

        return OptionScorer(tokens=lambda row: row, cut=lambda row, a, b: row[a:b],
                            pad=lambda rows: right_pad(rows, self.pad_id), prefill=prefill, extend=extend,
                            read=lambda hidden, positions: self._read_letters(hf, hidden, positions), check=check)

    # -- generation (generate-mode inference) --------------------------------------------------
    def _question_prompts(self, examples: list[Example]) -> list[list[int]]:
        """The plain prompt (presented order, no answer lead) of each question, as the model reads it."""
        return [self._prompt_ids(self._encode(self._chat_prefix(ex, ex.choices)), ex) for ex in examples]

    @torch.no_grad()
    def generate_answers(self, model, examples, max_new_tokens) -> list[str]:
        """Greedy completions of the plain prompts (no lead), left-padded as HF generation expects."""
        hf = unwrap(model)
        device = next(hf.parameters()).device
        input_ids, mask = shared_prefix.left_pad(self._question_prompts(examples), self.pad_id)
        extra = self._prefill_inputs(hf, examples, device)
        with eval_mode(model):
            out = hf.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=self.pad_id, **extra,
            )
        return self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    # -- GRPO rollouts (shared prefix: aqa/backbones/shared_prefix.py) ----------------------------
    def generate(self, model, examples, num_samples, sampling, decoder=None) -> Rollout:
        """G completions per question: the prompt (audio included) prefilled once per question, the KV cache
        expanded to G, special and media tokens never sampled. ``Rollout.prompt`` is a ``PromptBatch``."""
        hf = unwrap(model)
        device = next(hf.parameters()).device
        input_ids, mask = shared_prefix.left_pad(self._question_prompts(examples), self.pad_id)
        prompt = shared_prefix.PromptBatch(input_ids.to(device), mask.to(device),
                                           self._prefill_inputs(hf, examples, device), sampling.temperature)
        rules = shared_prefix.token_rules(self.tokenizer, hf)
        with eval_mode(model):
            ids, cmask = shared_prefix.sample(hf, prompt, num_samples, sampling, rules, decoder=decoder)
        texts = [self.tokenizer.batch_decode(group, skip_special_tokens=True) for group in ids.cpu()]
        return Rollout(examples=examples, prompt=prompt, completion_ids=ids, completion_mask=cmask, texts=texts)

    def completion_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs ``[B, G, T]`` of ``rollout``'s completions under ``model`` (with grad when
        enabled), the prompt run once per question; see ``shared_prefix.completion_logprobs``."""
        return shared_prefix.completion_logprobs(unwrap(model), rollout.prompt, rollout.completion_ids,
                                                 rollout.completion_mask)
