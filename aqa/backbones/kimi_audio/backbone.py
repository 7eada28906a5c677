"""Kimi-Audio behind the backbone protocol.

Loads a release directory with no remote code: the LM and ``whisper-large-v3/`` (``audio_lm``), the
text tokenizer (``tiktoken.model``) and the GLM-4-Voice speech tokenizer (``glm-4-voice-tokenizer/``).
Features per clip (cached): the Whisper log-mel windows and the GLM semantic tokens. A prompt is the
two-stream layout of ``processor.py``: the question with lettered options, then the audio, then the
assistant's text. Only text logits are used (``lm_head`` on the trunk); the MIMO branch never runs.

Shapes: B questions, R = sum of orders over questions, T positions, M Whisper windows, S vectors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aqa.backbones import shared_prefix
from aqa.backbones.base import Backbone, Rollout, register
from aqa.backbones.chat_lm import eval_mode
from aqa.backbones.checkpoint_check import CheckpointChecker
from aqa.backbones.kimi_audio.audio_lm import KimiAudio, load_kimi_audio
from aqa.backbones.kimi_audio.checkpoint import check_release
from aqa.backbones.kimi_audio.config import MODEL_TYPE, SPECIAL_TOKEN_FIELDS, load_kimi_config
from aqa.backbones.kimi_audio.decoder_view import TextStreamView, pad_features_per_row
from aqa.backbones.kimi_audio.glm_tokenizer import SPEECH_TOKENIZER_SUBDIR, GlmSpeechTokenizer
from aqa.backbones.kimi_audio.model import IGNORE_INDEX
from aqa.backbones.kimi_audio.processor import SpecialIds, TwoStream, inference_prompt, training_sample
from aqa.backbones.kimi_audio.text_tokenizer import KimiTextTokenizer
from aqa.backbones.kimi_audio.tiny import TinyKimiAudioSpec, write_tiny_kimi_audio
from aqa.backbones.kimi_audio.whisper import (
    WHISPER_SUBDIR,
    log_mel_windows,
    tokens_for_samples,
    whisper_feature_extractor,
)
from aqa.backbones.letters import answer_lead, letter_token_ids
from aqa.backbones.option_scoring import OptionScorer, canonical_per_question, option_scores
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig, render_question, render_target

LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WHISPER_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def unwrap(model: nn.Module) -> KimiAudio:
    """The :class:`KimiAudio` under PEFT / DeepSpeed / DDP wrappers (LoRA layers stay injected in it)."""
    while not isinstance(model, KimiAudio):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            raise TypeError(f"{type(model).__name__} does not wrap a Kimi-Audio model.")
    return model


def pad_streams(rows: list[TwoStream], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad two-stream rows: ``input_ids``/``text_input_ids``/``is_continuous_mask``/``attention_mask``/
    ``labels`` ``[R, T]`` (labels: text ids where the loss mask is set, else -100)."""
    width = max(len(r) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "text_input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
        "is_continuous_mask": torch.zeros((len(rows), width), dtype=torch.bool),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r)
        out["input_ids"][i, :n] = torch.tensor(r.audio_ids)
        out["text_input_ids"][i, :n] = torch.tensor(r.text_ids)
        out["is_continuous_mask"][i, :n] = torch.tensor(r.is_continuous, dtype=torch.bool)
        out["attention_mask"][i, :n] = 1
        loss = torch.tensor(r.text_loss_mask, dtype=torch.bool)
        out["labels"][i, :n] = torch.where(loss, torch.tensor(r.text_ids), IGNORE_INDEX)
    return out


@register
class KimiAudioBackbone(Backbone):
    name = "kimi_audio"
    spec_augment_key = "whisper_mel"
    model_types = (MODEL_TYPE,)  # the release's moonshot_kimia: not ours to rename
    tiny_spec_class = TinyKimiAudioSpec
    tiny_writer = staticmethod(write_tiny_kimi_audio)

    def __init__(self, model: KimiAudio, tokenizer: KimiTextTokenizer, speech_tokenizer: GlmSpeechTokenizer,
                 whisper_fe, prompt: PromptConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.speech_tokenizer = speech_tokenizer
        self.whisper_fe = whisper_fe
        self.prompt = prompt or PromptConfig()
        if self.prompt.system is not None:
            raise ValueError("kimi_audio's prompt has no system turn: set prompt.system=null.")
        self.ids = SpecialIds.from_config(model.config)
        self._letter_ids: torch.Tensor | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, prompt=None) -> KimiAudioBackbone:
        path = Path(path)
        config = load_kimi_config(path)
        tokenizer = KimiTextTokenizer.from_pretrained(path)
        for field, token in SPECIAL_TOKEN_FIELDS.items():
            if token in tokenizer.special_tokens and tokenizer.special_tokens[token] != getattr(config, field):
                raise ValueError(
                    f"config.json gives {field}={getattr(config, field)} but tokenizer_config.json has {token} = "
                    f"{tokenizer.special_tokens[token]}: the two files come from different releases; set {field} in "
                    "config.json to the tokenizer's id."
                )
        model = load_kimi_audio(path, dtype=dtype, device=device)
        speech = GlmSpeechTokenizer.from_pretrained(path / SPEECH_TOKENIZER_SUBDIR, device=device)
        fe = whisper_feature_extractor(path / WHISPER_SUBDIR, model.whisper.config)
        if fe.n_samples % speech.window_samples and speech.window_samples % fe.n_samples:
            raise ValueError(f"Whisper windows ({fe.n_samples} samples) and speech-tokenizer windows "
                             f"({speech.window_samples}) must nest, or token counts drift apart.")
        return cls(model, tokenizer, speech, fe, prompt)

    @classmethod
    def checkpoint_checker(cls) -> CheckpointChecker:
        """LM, Whisper encoder and speech tokenizer against a names/shapes listing or a release index."""
        return CheckpointChecker(check_release)

    def save_processor(self, out_dir: str | Path) -> None:
        """Text tokenizer files and the speech tokenizer folder (the Whisper folder is saved with the model)."""
        out = Path(out_dir)
        self.tokenizer.save_pretrained(out)
        self.speech_tokenizer.save_pretrained(out / SPEECH_TOKENIZER_SUBDIR)

    def lora_target_modules(self, include_audio: bool = False, names: list[str] | None = None) -> str:
        """A regex on full module names: the trunk's linear layers (never the MIMO branch); with
        ``include_audio`` also the Whisper adaptor and the Whisper encoder's linear layers."""
        lm_names = names or LM_LINEAR
        parts = [rf"lm\.model\.layers\.\d+\.(?:self_attn|mlp)\.({'|'.join(map(re.escape, lm_names))})"]
        if include_audio:
            audio_names = names or WHISPER_LINEAR
            parts.append(r"lm\.model\.vq_adaptor\.layers\.(0|3)")
            parts.append(rf"whisper\.layers\.\d+\.(?:self_attn\.)?({'|'.join(map(re.escape, audio_names))})")
        pattern = "|".join(f"(?:{p})" for p in parts)
        hits = [n for n, m in unwrap(self.model).named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"LoRA targets {lm_names} match no linear layer of the Kimi-Audio trunk; use names "
                             f"among {LM_LINEAR}.")
        return pattern

    def full_finetune_prefixes(self, include_audio: bool = False) -> list[str]:
        """The trunk (embeddings, layers, norm) and the text head, never the MIMO branch; with
        ``include_audio`` also the Whisper adaptor and the Whisper encoder."""
        trunk = ["lm.model.embed_tokens.", "lm.model.layers.", "lm.model.norm.", "lm.lm_head."]
        return trunk + (["lm.model.vq_adaptor.", "whisper."] if include_audio else [])

    # -- features ------------------------------------------------------------------------------
    def feature_settings(self) -> dict[str, Any]:
        whisper = self.whisper_fe.to_dict()
        speech = (self.speech_tokenizer.feature_extractor or self.whisper_fe).to_dict()
        for d in (whisper, speech):
            d.pop("processor_class", None)
        return {"backbone": self.name, "whisper": whisper, "speech_features": speech,
                "speech_tokenizer": {**vars(self.speech_tokenizer.config),
                                     "codebook": self.speech_tokenizer.fingerprint()}}

    def extract_features(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        """16 kHz mono ``[L]`` -> ``whisper_mel`` ``[n_mels, C * F]`` (C padded windows side by side),
        ``window_samples`` ``[C]`` (real samples per window) and ``semantic_tokens`` ``[N]`` (GLM codes)."""
        mel, lengths = log_mel_windows(wave, self.whisper_fe)
        codes = self.speech_tokenizer.tokenize(wave)
        return {"whisper_mel": mel, "window_samples": lengths, "semantic_tokens": codes}

    def _clip(self, ex: Example) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """One example's Whisper windows ``[C, n_mels, F]``, vectors per window ``[C]`` and GLM codes."""
        feats = ex.features
        if not {"whisper_mel", "window_samples", "semantic_tokens"} <= set(feats):
            raise ValueError(f"example {ex.id} has no kimi_audio features (whisper_mel, window_samples, "
                             "semantic_tokens): build them with backbone.extract_features or the feature cache.")
        lengths = np.asarray(feats["window_samples"], dtype=np.int64).reshape(-1)
        mel = np.asarray(feats["whisper_mel"], dtype=np.float32)
        frames = self.whisper_fe.nb_max_frames
        if mel.shape != (self.whisper_fe.feature_size, frames * len(lengths)):
            raise ValueError(f"example {ex.id}: whisper_mel {mel.shape} does not fit {len(lengths)} windows of "
                             f"({self.whisper_fe.feature_size}, {frames}): the feature cache was built for another "
                             "model; rebuild it.")
        vectors = [tokens_for_samples(n) for n in lengths]
        codes = [int(c) for c in np.asarray(feats["semantic_tokens"]).reshape(-1)]
        if sum(vectors) != len(codes):
            raise ValueError(f"example {ex.id}: {len(codes)} semantic tokens but {sum(vectors)} Whisper vectors; the "
                             "cached features are inconsistent; rebuild the feature cache.")
        windows = torch.from_numpy(mel).reshape(mel.shape[0], len(lengths), frames).permute(1, 0, 2)
        return windows, torch.tensor(vectors), codes

    def _audio_batch(self, examples: list[Example]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """``whisper_mel`` ``[M, n_mels, F]`` and ``whisper_vectors`` ``[M]`` of all clips, and each clip's codes."""
        clips = [self._clip(ex) for ex in examples]
        return ({"whisper_mel": torch.cat([c[0] for c in clips]), "whisper_vectors": torch.cat([c[1] for c in clips])},
                [c[2] for c in clips])

    # -- SFT -----------------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Two-stream SFT batch; labels on the assistant text and ``text_eos`` only.

        Returns input_ids / text_input_ids / is_continuous_mask / attention_mask / labels ``[B, T]``,
        whisper_mel ``[M, n_mels, F]`` and whisper_vectors ``[M]``.
        """
        audio, codes = self._audio_batch(examples)
        rows = []
        for ex, c in zip(examples, codes):
            if ex.answer_index is None:
                raise ValueError(f"example {ex.id} has no answer: only answered examples can be collated for SFT.")
            question = self.tokenizer.encode(render_question(ex.question, ex.choices, self.prompt))
            answer = self.tokenizer.encode(render_target(ex.choices, ex.answer_index, self.prompt))
            rows.append(training_sample(question, c, answer, self.ids))
        return {**pad_streams(rows, self.ids.pad), **audio}

    # -- option logits -------------------------------------------------------------------------
    def letter_ids(self) -> torch.Tensor:
        """``[26]`` text ids of ``A..Z`` after the target's lead."""
        if self._letter_ids is None:
            self._letter_ids = torch.tensor(letter_token_ids(self.tokenizer.encode, answer_lead(self.prompt)))
        return self._letter_ids

    def _features_per_question(self, hf: KimiAudio, examples: list[Example]) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Whisper vectors ``[S_b, D]`` per question (one encoder pass for the batch) and codes per question."""
        audio, codes = self._audio_batch(examples)
        feats = hf.encode_audio(audio["whisper_mel"].to(hf.device), audio["whisper_vectors"])
        return list(feats.split([len(c) for c in codes])), codes

    @torch.no_grad()
    def option_logits(self, model, examples, orders=None, share_prefix: bool = True) -> list[torch.Tensor]:
        """Letter logits per order in canonical order: a ``[K_b, N_b]`` tensor per question.

        The Whisper encoder runs once per question; with ``share_prefix`` the text common to a
        question's K prompts (the question before its options) runs once and the K suffixes (options,
        audio, assistant start) continue from its KV cache.
        """
        hf = unwrap(model)
        orders = orders or [[list(range(len(ex.choices)))] for ex in examples]
        lead = self.tokenizer.encode(answer_lead(self.prompt))
        with eval_mode(model):
            feats, codes = self._features_per_question(hf, examples)
            rows = [[inference_prompt(self.tokenizer.encode(render_question(ex.question, [ex.choices[j] for j in o],
                                                                             self.prompt)), c, self.ids, lead)
                     for o in ords] for ex, ords, c in zip(examples, orders, codes)]
            letters = option_scores(self._scorer(hf, feats), rows, hf.device, share_prefix)  # [R, 26]
        return canonical_per_question(letters, orders, [len(ex.choices) for ex in examples])

    def _scorer(self, hf: KimiAudio, feats: list[torch.Tensor]) -> OptionScorer[TwoStream]:
        """The trunk runs of ``option_scoring`` over two-stream rows: a position is shared when both streams
        agree there; the prefix is text only, and each suffix or full row takes its question's vectors."""

        def check(prefixes: list[TwoStream], suffixes: list[TwoStream]) -> None:
            if any(any(p.is_continuous) for p in prefixes):
                raise ValueError("audio lies in the shared prefix; the prompt must put the question before the audio.")

        def pad(rows: list[TwoStream]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            batch = pad_streams(rows, self.ids.pad)
            return batch, batch["attention_mask"]

        def prefill(batch, mask):
            embeds = hf.lm.model.embed(batch["input_ids"].to(hf.device), batch["text_input_ids"].to(hf.device))
            return hf.lm.model(embeds, mask.to(hf.device), use_cache=True)[2]

        def extend(batch, mask, positions, cache, index) -> torch.Tensor:
            vectors = torch.cat([feats[b] for b in index.tolist()])  # one copy per order, row-major
            embeds = hf.lm.model.embed(batch["input_ids"].to(hf.device), batch["text_input_ids"].to(hf.device),
                                       batch["is_continuous_mask"].to(hf.device), vectors)
            positions = None if positions is None else positions.to(hf.device)
            return hf.lm.model(embeds, mask.to(hf.device), positions, cache, use_cache=cache is not None)[0]

        def read(hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:  # [R, T, H], [R] -> [R, 26]
            picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]  # [R, H]
            return hf.lm.lm_head(picked)[:, self.letter_ids().to(hidden.device)].float()

        return OptionScorer(tokens=lambda r: list(zip(r.audio_ids, r.text_ids)), cut=_slice, pad=pad,
                            prefill=prefill, extend=extend, read=read, check=check)

    # -- generation ----------------------------------------------------------------------------
    def _prompt_batch(self, hf: KimiAudio, examples: list[Example], temperature: float) -> shared_prefix.PromptBatch:
        """Left-padded prompts (one row per question) in the form ``shared_prefix`` drives through ``TextStreamView``."""
        feats, codes = self._features_per_question(hf, examples)
        rows = [inference_prompt(self.tokenizer.encode(render_question(ex.question, ex.choices, self.prompt)), c,
                                 self.ids) for ex, c in zip(examples, codes)]
        width = max(len(r) for r in rows)
        left = [_slice(r, 0, len(r), pad_to=width, pad=self.ids.pad) for r in rows]
        text, mask = shared_prefix.left_pad([r.text_ids for r in rows], self.ids.pad)
        audio = torch.tensor([r.audio_ids for r in left])
        cont = torch.tensor([r.is_continuous for r in left], dtype=torch.bool)
        device = hf.device
        return shared_prefix.PromptBatch(text.to(device), mask.to(device), {
            "audio_ids": audio.to(device), "is_continuous_mask": cont.to(device),
            "whisper_features": pad_features_per_row(feats)}, temperature,
            step_extra={"independent_columns": True}, per_position=("audio_ids", "is_continuous_mask"))

    def _rules(self) -> shared_prefix.TokenRules:
        """End on ``text_eos``; never sample another special token or an audio code (text output only)."""
        config = unwrap(self.model).config
        specials = set(self.tokenizer.special_tokens.values()) | {config.pad_token_id}
        audio_codes = set(range(config.kimia_token_offset, config.vocab_size))
        suppress = sorted((specials | audio_codes) - {self.ids.text_eos})
        return shared_prefix.TokenRules(eos_ids=[self.ids.text_eos], pad_id=self.ids.pad, suppress_ids=suppress)

    def _decode(self, ids: list[int]) -> str:
        if self.ids.text_eos in ids:
            ids = ids[: ids.index(self.ids.text_eos)]
        return self.tokenizer.decode([i for i in ids if i < self.ids.token_offset]).strip()

    @torch.no_grad()
    def generate_answers(self, model, examples, max_new_tokens) -> list[str]:
        """Greedy text completions (until ``text_eos``), the audio stream blank, as Kimi's text output mode."""
        hf = unwrap(model)
        view = TextStreamView(hf.lm)
        with eval_mode(model):
            prompt = self._prompt_batch(hf, examples, 1.0)
            out = view.model(prompt.input_ids, prompt.attention_mask, _positions(prompt.attention_mask),
                             use_cache=True, **prompt.extra)
            mask, cache, done = prompt.attention_mask, out.cache, None
            next_pos = mask.sum(1)
            logits = hf.lm.lm_head(out.last_hidden_state[:, -1])
            suppress = torch.tensor(self._rules().suppress_ids, device=logits.device)
            tokens = []
            for step in range(max_new_tokens):
                logits[:, suppress] = float("-inf")
                nxt = logits.argmax(-1)
                done = nxt == self.ids.text_eos if done is None else done | (nxt == self.ids.text_eos)
                tokens.append(nxt)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = view.model(nxt[:, None], mask, (next_pos + step)[:, None], cache, use_cache=True)
                cache = out.cache
                logits = hf.lm.lm_head(out.last_hidden_state[:, -1])
        ids = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in examples]
        return [self._decode(row) for row in ids]

    def generate(self, model, examples, num_samples, sampling, decoder=None) -> Rollout:
        """G sampled completions per question from one prefill per question (``shared_prefix``)."""
        hf = unwrap(model)
        with eval_mode(model), torch.no_grad():
            prompt = self._prompt_batch(hf, examples, sampling.temperature)
            ids, cmask = shared_prefix.sample(TextStreamView(hf.lm), prompt, num_samples, sampling, self._rules(),
                                              decoder=decoder)
        texts = [[self._decode(row) for row in group] for group in ids.cpu().tolist()]
        return Rollout(examples=examples, prompt=prompt, completion_ids=ids, completion_mask=cmask, texts=texts)

    def completion_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """Per-token log-probs ``[B, G, T]`` of the completions, the prompt run once per question."""
        return shared_prefix.completion_logprobs(TextStreamView(unwrap(model).lm), rollout.prompt,
                                                 rollout.completion_ids, rollout.completion_mask)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``[B, P]`` -> ``[B, P]``."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _slice(row: TwoStream, start: int, end: int, pad_to: int = 0, pad: int = 0) -> TwoStream:
    """Positions ``[start, end)`` of a row, optionally left-padded to ``pad_to`` positions."""
    n = max(0, pad_to - (end - start))
    return TwoStream([pad] * n + row.audio_ids[start:end], [pad] * n + row.text_ids[start:end],
                     [0] * n + row.is_continuous[start:end], [0] * n + row.text_loss_mask[start:end])
