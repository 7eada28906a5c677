"""Scoring questions: the inference config, the scoring backbone, the clips' features (real, silenced or
noise) and a batch scored into prediction rows: option-letter logits over K option orders, or
generate-then-parse.

``inference/run.py`` is the command; running a whole split over ranks, resuming and merging the outputs is
:mod:`aqa.eval.runner`'s. Outputs go to ``<output_dir>/<split>/``.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from aqa.config import ConfigError
from aqa.data.example import Example
from aqa.data.manifest import Record
from aqa.data.prompts import PromptConfig
from aqa.eval.orders import average_log_probs, option_orders, order_predictions
from aqa.rl.answer_parsing import parse_answer
from aqa.runtime.distributed import choose_device

RUN_CONFIG = "infer_config.json"
# Config keys that change what a prediction is: a resumed run must agree on them with the first run.
SCORING_KEYS = ("backbone", "model_path", "adapter", "permutations", "mode", "max_new_tokens", "seed", "prompt",
                "audio")
NOISE_RMS = 0.05  # the level of audio=noise (about -26 dBFS): audible, and the same for every clip
UNPARSED_LOGIT = -1e4  # generate mode: the options a parsed answer did not name


@dataclass
class InferConfig:
    """What ``inference/run.py`` scores and how."""

    model_path: str  # base model dir (with ``adapter``) or a merged model dir
    data_dir: str  # manifest dir with <split>.jsonl and dataset.json
    output_dir: str  # predictions land in <output_dir>/<split>/
    backbone: str = "qwen2_audio"  # registered backbone: qwen2_audio, kimi_audio, text_llm
    adapter: str | None = None  # PEFT adapter dir trained on model_path; None for a base or merged model
    model_name: str | None = None  # the predictions' "model" field; None: the adapter's or model's dir name
    mode: Literal["logits", "generate"] = "logits"  # logits: option-letter likelihood; generate: parse the answer
    permutations: int = 1  # K option orders per question (logits mode); canonical order first
    max_new_tokens: int = 32  # generate mode
    batch_size: int = 8  # questions per forward pass
    seed: int = 0  # option orders are drawn per question from (seed, id)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu; or a torch device string
    cache_dir: str | None = None  # feature cache dir; None computes features in memory
    limit: int | None = None  # score only the first N questions (smoke runs)
    # real: the clips; silence / noise: each clip replaced by zeros / white noise of the same length, to measure
    # how much a model needs the audio (predictions and metrics say which)
    audio: Literal["real", "silence", "noise"] = "real"
    # metrics.json breaks accuracy down by these manifest meta keys (those a split has): DCASE's question_type,
    # MMAU's task, difficulty and sub_category, as MMAU publishes them
    breakdown: list[str] = field(default_factory=lambda: ["question_type", "task", "difficulty", "sub_category"])
    progress: bool = True  # a progress bar
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.permutations < 1:
            raise ConfigError(f"'permutations' must be >= 1, got {self.permutations}.")
        if self.batch_size < 1:
            raise ConfigError(f"'batch_size' must be >= 1, got {self.batch_size}.")
        if self.mode == "generate" and self.permutations != 1:
            raise ConfigError("'permutations' applies to mode=logits only; set permutations=1 with mode=generate.")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU (``cuda:<local_rank>``) if any, else the CPU; ``cuda``: this rank's GPU."""
    if name == "auto":
        return choose_device(local_rank)
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_scoring_backbone(cfg: InferConfig, device: torch.device | None = None):
    """The backbone from ``model_path`` on ``device`` (default: ``cfg.device``), with ``adapter`` loaded
    (checked against the base) when given."""
    from aqa.backbones import get_backbone
    from aqa.backbones.lora import load_adapter

    device = device or resolve_device(cfg.device)
    backbone = get_backbone(cfg.backbone).from_pretrained(
        cfg.model_path, device=device, dtype=resolve_dtype(cfg.dtype, device), prompt=cfg.prompt
    )
    if cfg.adapter:
        if not Path(cfg.adapter).is_dir():
            raise FileNotFoundError(f"adapter dir {cfg.adapter} does not exist; pass the <output_dir>/adapter of an "
                                    "SFT/GRPO run, or adapter=null for a base or merged model.")
        load_adapter(backbone, cfg.adapter)
    backbone.model.eval()
    return backbone


def replace_audio(wave: np.ndarray, mode: str) -> np.ndarray:
    """``[S]`` -> the clip itself, zeros, or white noise of RMS ``NOISE_RMS``, all of the same length; the noise
    is seeded by the clip's samples, so a rerun (or the cache) hears the same noise for the same clip."""
    if mode == "real":
        return wave
    if mode == "silence":
        return np.zeros_like(wave)
    rng = np.random.default_rng(list(hashlib.sha256(wave.tobytes()).digest()[:8]))
    return (NOISE_RMS * rng.standard_normal(wave.shape[0])).astype(wave.dtype)


class FeatureSource:
    """Features per audio file, as :class:`~aqa.data.dataset.QADataset` asks for them (``get(path)``): from the
    memory-mapped feature cache when configured, else computed and kept for the last ``MEMO_CLIPS`` clips (a
    rank scores a clip's questions one after another). With ``audio`` other than ``real`` each clip is replaced
    first (in a cache folder of its own: the settings say which audio was heard).

    ``paths``: every clip this process will ask for. ``disjoint``: no other process computes these clips (the
    ranks' shards never share a clip), so the cache is filled without waiting for the others' lock."""

    MEMO_CLIPS = 32

    def __init__(self, backbone, paths: Iterable[Path], cache_dir: str | None, progress: bool,
                 audio: str = "real", disjoint: bool = False):
        self.backbone = backbone
        self.audio = audio
        self._memo: OrderedDict[Path, dict[str, Any]] = OrderedDict()
        self.cache = None
        if cache_dir:
            from aqa.data.cache import FeatureCache

            settings = backbone.feature_settings()
            self.cache = FeatureCache(cache_dir, settings if audio == "real" else {**settings, "audio": audio})
            self.cache.ensure(paths, self._extract, progress=progress, disjoint=disjoint)

    def _extract(self, wave: np.ndarray) -> dict[str, Any]:
        return self.backbone.extract_features(replace_audio(wave, self.audio))

    def get(self, path: Path) -> dict[str, Any]:
        if self.cache is not None:
            return self.cache.get(path)
        if path not in self._memo:
            from aqa.data.audio import load_audio

            self._memo[path] = self._extract(load_audio(path))
            if len(self._memo) > self.MEMO_CLIPS:
                self._memo.popitem(last=False)
        self._memo.move_to_end(path)
        return self._memo[path]


def orders_for(record: Record, k: int, seed: int) -> list[list[int]]:
    """The K option orders of one question; seeded by (seed, id) so a resumed run draws the same ones."""
    return option_orders(len(record.choices), k, random.Random(f"{seed}:{record.id}"))


def score_batch(backbone, records: list[Record], examples: list[Example], cfg: InferConfig,
                model_name: str) -> list[dict[str, Any]]:
    """Prediction rows (the predictions contract plus diagnostics, and ``meta`` with the breakdown keys)."""
    rows = _score(backbone, records, examples, cfg, model_name)
    for rec, row in zip(records, rows):
        meta = {k: rec.meta[k] for k in cfg.breakdown if rec.meta.get(k) is not None}
        if meta:
            row["meta"] = meta
        if cfg.audio != "real":
            row["audio"] = cfg.audio  # scored without the clip's audio: an audio-dependence floor
        if rec.meta.get("raw_choices"):  # the source's option strings: submission.csv writes these verbatim
            row["raw_choices"] = rec.meta["raw_choices"]
    return rows


def _score(backbone, records: list[Record], examples: list[Example], cfg: InferConfig,
           model_name: str) -> list[dict[str, Any]]:
    rows = []
    if cfg.mode == "logits":
        orders = [orders_for(r, cfg.permutations, cfg.seed) for r in records]
        per_question = backbone.option_logits(backbone.model, examples, orders)  # [K_b, N_b] canonical
        for rec, canonical in zip(records, per_question):
            avg = average_log_probs(canonical)  # [N] mean log-prob over orders
            pred = int(avg.argmax())
            rows.append({
                "id": rec.id, "part": rec.part, "choices": rec.choices, "option_logits": avg.tolist(),
                "pred": rec.choices[pred], "answer": rec.answer, "model": model_name,
                "order_preds": order_predictions(canonical),
            })
    else:
        texts = backbone.generate_answers(backbone.model, examples, cfg.max_new_tokens)
        for rec, text in zip(records, texts):
            index = parse_answer(text, rec.choices)
            # An answer that names no option is wrong, never a guess: pred is null, the logits are flat (so the
            # ensemble reads no preference), and the submission row is empty. "parsed" tells it apart.
            logits = [0.0 if index in (None, i) else UNPARSED_LOGIT for i in range(len(rec.choices))]
            rows.append({
                "id": rec.id, "part": rec.part, "choices": rec.choices, "option_logits": logits,
                "pred": None if index is None else rec.choices[index], "answer": rec.answer, "model": model_name,
                "generated": text, "parsed": index is not None,
            })
    return rows
