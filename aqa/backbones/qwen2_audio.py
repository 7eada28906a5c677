"""Qwen2-Audio behind the backbone protocol: transformers' ``Qwen2AudioForConditionalGeneration`` and
``Qwen2AudioProcessor`` loaded from a local directory (safetensors only, no remote code).

A prompt is the checkpoint's own chat template: the default system turn, a user turn holding the
audio (``Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>``) and the question with lettered options, and
the assistant turn. ``<|AUDIO|>`` is expanded to one token per encoder frame, as the processor does.

Shapes: B questions, R = sum of orders over questions, T tokens, F mel frames, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aqa.backbones import shared_prefix
from aqa.backbones.base import Backbone, Rollout, register
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig, render_question, render_target
from aqa.scoring import answer_lead, gather_letter_logits, letter_token_ids, to_canonical

IGNORE_INDEX = -100
LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUDIO_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


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


def audio_token_count(feature_length: int) -> int:
    """Encoder frames of a clip with ``feature_length`` valid mel frames (conv stride 2, then pool 2)."""
    return ((feature_length - 1) // 2 + 1 - 2) // 2 + 1


def _right_pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists -> ids ``[R, T]`` padded on the right with ``value``, and mask ``[R, T]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _common_prefix_len(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


@register
class Qwen2AudioBackbone(Backbone):
    name = "qwen2_audio"
    spec_augment_key = "input_features"

    def __init__(self, model: nn.Module, processor: Any, prompt: PromptConfig | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.prompt = prompt or PromptConfig()
        self.audio_token_id = model.config.audio_token_index
        self.pad_id = self.tokenizer.pad_token_id
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._letter_ids: torch.Tensor | None = None  # computed on first scoring call
        self._frame: tuple[str, str] | None = None  # chat template around the user text

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
        if model_type != "qwen2_audio":
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
            parts.append(r"model\.multi_modal_projector\.linear")
        pattern = "|".join(f"(?:{p})" for p in parts)
        hits = [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"LoRA targets {lm_names} match no linear layer of the language model.")
        return pattern

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
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_frame(self) -> tuple[str, str]:
        """The chat template rendered once around a placeholder user text: ``(head, tail)``.

        Rendering Jinja for each of K orders of each question costs more than the tiny model's forward;
        the template inserts the user text verbatim, so head + text + tail is the same string.
        """
        if self._frame is None:
            marker = "\x00USER_TEXT\x00"
            messages = [{"role": "user", "content": [{"type": "audio", "audio": "clip"},
                                                     {"type": "text", "text": marker}]}]
            # the processor's template: checkpoints keep it there (chat_template.jinja / .json)
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(marker) != 1:
                raise ValueError("the checkpoint's chat template does not place the user text exactly once.")
            head, tail = text.split(marker)
            self._frame = (head, tail)
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

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Prompt + target + ``<|im_end|>``, right-padded; labels only on the target and ``<|im_end|>``.

        Returns input_ids / attention_mask / labels ``[B, T]``, input_features ``[B, n_mels, F]``,
        feature_attention_mask ``[B, F]``.
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
            ids = self._expand_audio(full_ids, ex)
            n_target = len(full_ids) - len(prompt_ids)
            rows.append(ids)
            labels.append([IGNORE_INDEX] * (len(ids) - n_target) + ids[len(ids) - n_target :])
        input_ids, attention_mask = _right_pad(rows, self.pad_id)
        label_ids, _ = _right_pad(labels, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
                **self._audio_batch(examples)}

    # -- option logits -------------------------------------------------------------------------
    def letter_ids(self) -> torch.Tensor:
        """``[26]`` token ids of ``A..Z`` right after the assistant start and the target's lead."""
        if self._letter_ids is None:
            start = self._encode_assistant_start()
            self._letter_ids = torch.tensor(letter_token_ids(self._encode, start))
        return self._letter_ids

    def _encode_assistant_start(self) -> str:
        return "<|im_start|>assistant\n" + answer_lead(self.prompt)

    def _scoring_ids(self, examples: list[Example], orders: list[list[list[int]]]) -> list[list[list[int]]]:
        """Prompt ids per question and order, ending at the answer position (audio expanded)."""
        lead = answer_lead(self.prompt)
        texts = [self._chat_prefix(ex, [ex.choices[j] for j in order]) + lead
                 for ex, ords in zip(examples, orders) for order in ords]
        flat = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"])  # one batched call
        return [[self._expand_audio(next(flat), ex) for _ in ords] for ex, ords in zip(examples, orders)]

    @torch.no_grad()
    def option_logits(self, model, examples, orders=None, share_prefix: bool = True) -> list[torch.Tensor]:
        """Letter logits per order, returned in canonical order: a ``[K_b, N_b]`` tensor per question.

        With ``share_prefix`` the tokens common to a question's K prompts (system, audio, question) run
        once, and the K option suffixes run from that KV cache; otherwise every order runs in full.
        """
        hf = unwrap(model)
        device = next(hf.parameters()).device
        orders = orders or [[list(range(len(ex.choices)))] for ex in examples]
        prompts = self._scoring_ids(examples, orders)
        with eval_mode(model):
            if share_prefix and any(len(o) > 1 for o in orders):
                presented = self._shared_prefix_logits(hf, examples, prompts, device)
            else:
                presented = self._full_logits(hf, examples, prompts, device)
        out, r = [], 0
        for ex, ords in zip(examples, orders):
            block = presented[r : r + len(ords), : len(ex.choices)]  # [K, N] in presented slots
            out.append(to_canonical(block, ords).cpu())
            r += len(ords)
        return out

    def _read_letters(self, hf, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[R, T, H]`` -> letter logits ``[R, 26]`` at ``positions`` (the LM head runs on R rows only)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = hf.lm_head(hidden[rows, positions.to(hidden.device)])[:, None, :]  # [R, 1, V]
        return gather_letter_logits(logits, torch.zeros_like(positions), self.letter_ids())

    def _full_logits(self, hf, examples, prompts, device) -> torch.Tensor:
        """Every order in full: R rows, each with its audio. Returns ``[R, 26]``."""
        flat = [ids for rows in prompts for ids in rows]
        repeat = torch.tensor([len(rows) for rows in prompts])
        input_ids, mask = _right_pad(flat, self.pad_id)
        audio = {k: v.repeat_interleave(repeat, dim=0).to(device) for k, v in self._audio_batch(examples).items()}
        audio["input_features"] = audio["input_features"].to(hf.dtype)
        out = hf.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False, **audio)
        return self._read_letters(hf, out.last_hidden_state, mask.sum(1) - 1)

    def _shared_prefix_logits(self, hf, examples, prompts, device) -> torch.Tensor:
        """Prefix once per question, K suffixes from its KV cache. Returns ``[R, 26]``."""
        split = [min(_common_prefix_len(rows), min(len(r) for r in rows) - 1) for rows in prompts]
        prefixes = [rows[0][:s] for rows, s in zip(prompts, split)]
        suffixes = [r[s:] for rows, s in zip(prompts, split) for r in rows]
        if any(self.audio_token_id in s for s in suffixes):
            raise ValueError("audio tokens differ between option orders; the audio must precede the options.")
        # 1) prefixes [B, P], right-padded: pad rows still see real tokens before them, so no query row is
        #    fully masked (which would put NaN into the cache).
        p_ids, p_mask = _right_pad(prefixes, self.pad_id)
        audio = {k: v.to(device) for k, v in self._audio_batch(examples).items()}
        audio["input_features"] = audio["input_features"].to(hf.dtype)
        out = hf.model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device), use_cache=True, **audio)
        cache = out.past_key_values
        # 2) expand the cache to one row per order: [B, ...] -> [R, ...]
        repeat = torch.tensor([len(rows) for rows in prompts])
        index = torch.repeat_interleave(torch.arange(len(prompts)), repeat)
        cache.reorder_cache(index.to(device))
        # 3) suffixes [R, S], positions continue from each question's own prefix length
        s_ids, s_mask = _right_pad(suffixes, self.pad_id)
        start = torch.tensor(split)[index]  # [R]
        positions = start[:, None] + torch.arange(s_ids.shape[1])[None, :]  # [R, S]
        full_mask = torch.cat([p_mask[index], s_mask], dim=1)  # [R, P + S]
        out = hf.model(
            input_ids=s_ids.to(device), attention_mask=full_mask.to(device), position_ids=positions.to(device),
            past_key_values=cache, use_cache=True,
        )
        return self._read_letters(hf, out.last_hidden_state, s_mask.sum(1) - 1)

    # -- generation (generate-mode inference) --------------------------------------------------
    @torch.no_grad()
    def generate_answers(self, model, examples, max_new_tokens) -> list[str]:
        """Greedy completions of the plain prompts (no lead), left-padded as HF generation expects."""
        hf = unwrap(model)
        device = next(hf.parameters()).device
        rows = [self._expand_audio(self._encode(self._chat_prefix(ex, ex.choices)), ex) for ex in examples]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        audio = {k: v.to(device) for k, v in self._audio_batch(examples).items()}
        audio["input_features"] = audio["input_features"].to(hf.dtype)
        with eval_mode(model):
            out = hf.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=self.pad_id, **audio,
            )
        return self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    # -- GRPO rollouts (shared prefix: aqa/backbones/shared_prefix.py) ----------------------------
    def generate(self, model, examples, num_samples, sampling) -> Rollout:
        """G completions per question: audio and prompt prefilled once per question, the KV cache expanded
        to G, special and media tokens never sampled. ``Rollout.prompt`` is a ``PromptBatch``."""
        hf = unwrap(model)
        device = next(hf.parameters()).device
        rows = [self._expand_audio(self._encode(self._chat_prefix(ex, ex.choices)), ex) for ex in examples]
        input_ids, mask = shared_prefix.left_pad(rows, self.pad_id)
        audio = self._audio_batch(examples)
        audio["input_features"] = audio["input_features"].to(hf.dtype)
        prompt = shared_prefix.PromptBatch(input_ids.to(device), mask.to(device),
                                           {k: v.to(device) for k, v in audio.items()}, sampling.temperature)
        rules = shared_prefix.token_rules(self.tokenizer, hf)
        with eval_mode(model):
            ids, cmask = shared_prefix.sample(hf, prompt, num_samples, sampling, rules)
        texts = [self.tokenizer.batch_decode(group, skip_special_tokens=True) for group in ids.cpu()]
        return Rollout(examples=examples, prompt=prompt, completion_ids=ids, completion_mask=cmask, texts=texts)

    def completion_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs ``[B, G, T]`` of ``rollout``'s completions under ``model`` (with grad when
        enabled), the prompt run once per question; see ``shared_prefix.completion_logprobs``."""
        return shared_prefix.completion_logprobs(unwrap(model), rollout.prompt, rollout.completion_ids,
                                                 rollout.completion_mask)
