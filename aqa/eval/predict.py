"""Scoring a split: option-letter logits over K option orders (or generate-then-parse), resumable,
written as predictions.jsonl + metrics.json + submission.csv (see DESIGN.md's contracts).

``inference/run.py`` is the command; everything with a branch lives here so tests reach it.
Outputs go to ``<output_dir>/<split>/``. A rerun skips ids already in ``predictions.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from aqa.config import ConfigError, to_dict
from aqa.data.dataset import QADataset
from aqa.data.example import Example
from aqa.data.manifest import Manifest, Record, load_manifest
from aqa.data.prompts import PromptConfig
from aqa.eval.metrics import accuracy_by_part, chance_level, write_json, write_submission
from aqa.eval.orders import average_log_probs, option_orders, order_accuracy, order_predictions
from aqa.rl.answer_parsing import parse_answer

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
SUBMISSION = "submission.csv"
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_scoring_backbone(cfg: InferConfig):
    """The backbone from ``model_path``, with ``adapter`` loaded (checked against the base) when given."""
    from aqa.backbones import get_backbone
    from aqa.backbones.lora import load_adapter

    device = resolve_device(cfg.device)
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
    feature cache when configured, else computed once per file and kept. With ``audio`` other than ``real`` each
    clip is replaced first (in a cache folder of its own: the settings say which audio was heard)."""

    def __init__(self, backbone, manifest: Manifest, records: list[Record], cache_dir: str | None, progress: bool,
                 audio: str = "real"):
        self.backbone = backbone
        self.audio = audio
        self._memo: dict[Path, dict[str, Any]] = {}
        self.cache = None
        if cache_dir and records:
            from aqa.data.cache import FeatureCache

            settings = backbone.feature_settings()
            self.cache = FeatureCache(cache_dir, settings if audio == "real" else {**settings, "audio": audio})
            paths = [manifest.audio_path(r) for r in records]
            self.cache.ensure(paths, self._extract, progress=progress)

    def _extract(self, wave: np.ndarray) -> dict[str, Any]:
        return self.backbone.extract_features(replace_audio(wave, self.audio))

    def get(self, path: Path) -> dict[str, Any]:
        if self.cache is not None:
            return self.cache.get(path)
        if path not in self._memo:
            from aqa.data.audio import load_audio

            self._memo[path] = self._extract(load_audio(path))
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


def read_done(path: Path) -> list[dict[str, Any]]:
    """Rows already written. A torn last line (a run killed mid-write) is dropped and the file rewritten."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not valid JSON and is not the last line: the file was edited; "
                                 "delete it to score the split again.") from None
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def check_same_run(out_dir: Path, cfg: InferConfig) -> None:
    """Refuse to resume into a directory whose predictions were made with other scoring settings."""
    current = {k: v for k, v in to_dict(cfg).items() if k in SCORING_KEYS}
    saved_path = out_dir / RUN_CONFIG
    if (out_dir / PREDICTIONS).is_file() and saved_path.is_file():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        diff = sorted(k for k in SCORING_KEYS if saved.get(k) != current.get(k))
        if diff:
            raise ConfigError(
                f"{out_dir} holds predictions made with other {', '.join(diff)}; resuming would mix them. Use another "
                "output_dir, or delete its predictions.jsonl to score again."
            )
    write_json(current, saved_path)


def compute_metrics(rows: list[dict[str, Any]], cfg: InferConfig, split: str) -> dict[str, Any]:
    """metrics.json: per-part accuracy, arithmetic/weighted means, counts, chance; mean/strict with K > 1."""
    answered = [r for r in rows if r.get("answer") is not None]
    metrics: dict[str, Any] = {"split": split, "mode": cfg.mode, "audio": cfg.audio,
                               "model": rows[0]["model"] if rows else None,
                               **accuracy_by_part(answered), "chance": chance_level(answered)}
    if cfg.mode == "logits" and cfg.permutations > 1:
        for r in answered:
            right = {i for i, c in enumerate(r["choices"]) if c == r["answer"]}  # repeated options: by text
            r["_order_mean"], r["_order_strict"] = order_accuracy(r["order_preds"], right)
        metrics["permutations"] = cfg.permutations
        metrics["mean_over_orders"] = accuracy_by_part(answered, correct_key="_order_mean")
        metrics["strict"] = accuracy_by_part(answered, correct_key="_order_strict")
        for r in answered:
            del r["_order_mean"], r["_order_strict"]
    if cfg.mode == "generate":
        metrics["unparsed"] = sum(not r["parsed"] for r in rows)
    breakdown = {}
    for key in cfg.breakdown:
        keyed = [{**r, "part": str(r["meta"][key])} for r in answered if key in r.get("meta", {})]
        if keyed:
            acc = accuracy_by_part(keyed)
            breakdown[key] = {value: {"accuracy": a, "n": acc["counts"][value]} for value, a in acc["per_part"].items()}
    if breakdown:
        metrics["breakdown"] = breakdown
    return metrics


def run_inference(cfg: InferConfig, split: str) -> dict[str, Any]:
    """Score ``<data_dir>/<split>.jsonl`` and write the outputs; returns a summary with the paths.

    An ``eval`` split (or one without answers) gets predictions and a submission but no metrics.json.
    """
    manifest_path = Path(cfg.data_dir) / f"{split}.jsonl"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist. Write manifests with a data_prep converter "
                                "(e.g. python -m data_prep.synth --out DIR) and point data_dir at DIR.")
    manifest = load_manifest(manifest_path)
    records = manifest.records[: cfg.limit] if cfg.limit else manifest.records
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{manifest_path} repeats question id {dup!r}; ids must be unique (re-run the converter).")

    out_dir = Path(cfg.output_dir) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    check_same_run(out_dir, cfg)
    pred_path = out_dir / PREDICTIONS
    done = {r["id"]: r for r in read_done(pred_path)}
    pending = [r for r in records if r.id not in done]
    model_name = cfg.model_name or Path(cfg.adapter or cfg.model_path).resolve().name

    if pending:
        backbone = load_scoring_backbone(cfg)
        # the questions left, as the training dataset builds them (canonical order, no augmentation); a
        # backbone that reads no audio (empty feature settings: a text LLM over events) decodes no clip
        reads_audio = bool(backbone.feature_settings())
        features = (FeatureSource(backbone, manifest, pending, cfg.cache_dir, cfg.progress, cfg.audio)
                    if reads_audio else None)
        dataset = QADataset(Manifest(path=manifest.path, audio_root=manifest.audio_root, records=pending), features)
        with pred_path.open("a", encoding="utf-8") as fh, tqdm(
            total=len(pending), desc=f"{split} ({cfg.mode})", unit="q", disable=not cfg.progress
        ) as bar:
            for start in range(0, len(pending), cfg.batch_size):
                batch = pending[start : start + cfg.batch_size]
                examples = [dataset[i] for i in range(start, start + len(batch))]
                for row in score_batch(backbone, batch, examples, cfg, model_name):
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[row["id"]] = row
                fh.flush()  # a killed run keeps every finished batch
                bar.update(len(batch))

    rows = [done[i] for i in ids]  # manifest order, exactly one row per question
    write_submission(rows, out_dir / SUBMISSION)
    summary: dict[str, Any] = {"split": split, "predictions": str(pred_path), "submission": str(out_dir / SUBMISSION),
                               "scored": len(pending), "resumed": len(records) - len(pending)}
    if split != "eval" and any(r.answer is not None for r in records):
        metrics = compute_metrics(rows, cfg, split)
        write_json(metrics, out_dir / METRICS)
        summary.update(metrics=metrics, metrics_path=str(out_dir / METRICS))
    return summary


def format_metrics(metrics: dict[str, Any]) -> str:
    """A per-part accuracy table for the terminal."""
    lines = [f"{'part':<12}{'n':>6}{'acc %':>9}"]
    for part, acc in metrics["per_part"].items():
        lines.append(f"{part:<12}{metrics['counts'][part]:>6}{100 * acc:>9.1f}")
    lines.append(f"{'arith. mean':<18}{100 * metrics['arithmetic_mean']:>9.1f}")
    lines.append(f"{'weighted':<18}{100 * metrics['weighted_mean']:>9.1f}")
    lines.append(f"{'chance':<18}{100 * metrics['chance']:>9.1f}")
    if "unparsed" in metrics:  # generate mode: answers that named no option, all counted wrong
        lines.append(f"{'unparsed (wrong)':<18}{metrics['unparsed']:>9d} of {metrics['n']}")
    if "strict" in metrics:
        k = metrics["permutations"]
        lines.append(f"{f'mean ({k} orders)':<18}{100 * metrics['mean_over_orders']['weighted_mean']:>9.1f}")
        lines.append(f"{f'strict ({k} orders)':<18}{100 * metrics['strict']['weighted_mean']:>9.1f}")
    return "\n".join(lines)
