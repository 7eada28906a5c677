"""Running a split: each rank scores its shard into its part file, the last to finish merges the outputs
(predictions.jsonl + metrics.json + submission.csv, see DESIGN.md's contracts); ``--merge`` from part files alone.

One process, or N ranks of one launch (``deepspeed``, ``torchrun``): the split's batches are dealt to ranks
(:mod:`aqa.eval.shards`), rows are appended to part files as scored and merged once every question is done
(:mod:`aqa.eval.parts`). A rerun scores only the questions no part file holds. The scoring of one batch is
:mod:`aqa.eval.predict`'s.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aqa.config import ConfigError, to_dict
from aqa.data.dataset import QADataset
from aqa.data.manifest import Manifest
from aqa.eval.metrics import PartAccuracy, chance_level, write_json, write_submission
from aqa.eval.orders import row_order_accuracy
from aqa.eval.parts import (
    METRICS,
    PARTS,
    PREDICTIONS,
    SUBMISSION,
    JobProgress,
    MergeError,
    PartRows,
    adopt_earlier_predictions,
    all_finished,
    already_merged,
    check_complete,
    drop_torn_tail,
    finished_marker,
    missing_error,
    part_files,
    part_path,
    scan_parts,
    split_lock,
    write_merged,
    write_stamp,
)
from aqa.eval.predict import (
    RUN_CONFIG,
    SCORING_KEYS,
    FeatureSource,
    InferConfig,
    load_scoring_backbone,
    resolve_device,
    score_batch,
)
from aqa.eval.shards import SplitIndex
from aqa.runtime.distributed import DistInfo, launch_info


def check_same_run(out_dir: Path, cfg: InferConfig) -> None:
    """Refuse to resume into a directory whose predictions were made with other scoring settings."""
    current = {k: v for k, v in to_dict(cfg).items() if k in SCORING_KEYS}
    saved_path = out_dir / RUN_CONFIG
    if (part_files(out_dir) or (out_dir / PREDICTIONS).is_file()) and saved_path.is_file():
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        diff = sorted(k for k in SCORING_KEYS if saved.get(k) != current.get(k))
        if diff:
            raise ConfigError(
                f"{out_dir} holds predictions made with other {', '.join(diff)}; resuming would mix them. Use another "
                f"output_dir, or delete its {PARTS}/ and {PREDICTIONS} to score again."
            )
    write_json(current, saved_path)


def compute_metrics(rows: Iterable[dict[str, Any]], cfg: InferConfig, split: str) -> dict[str, Any]:
    """metrics.json: per-part accuracy, arithmetic/weighted means, counts, chance; mean/strict with K > 1.

    ``rows`` is read twice and never held: a list, or :class:`PredictionRows` streaming a file."""
    overall, mean, strict, unparsed, model = PartAccuracy(), PartAccuracy(), PartAccuracy(), 0, None
    by_meta: dict[str, PartAccuracy] = {key: PartAccuracy() for key in cfg.breakdown}
    for r in rows:
        model = r["model"] if model is None else model
        unparsed += cfg.mode == "generate" and not r["parsed"]
        if r.get("answer") is None:
            continue
        overall.add(r["part"], float(r["pred"] == r["answer"]))
        if cfg.mode == "logits" and cfg.permutations > 1:
            m, s = row_order_accuracy(r)
            mean.add(r["part"], m)
            strict.add(r["part"], s)
        for key, acc in by_meta.items():
            if key in r.get("meta", {}):
                acc.add(str(r["meta"][key]), float(r["pred"] == r["answer"]))
    answered = (r for r in rows if r.get("answer") is not None)
    metrics: dict[str, Any] = {"split": split, "mode": cfg.mode, "audio": cfg.audio, "model": model,
                               **overall.result(), "chance": chance_level(answered)}
    if cfg.mode == "logits" and cfg.permutations > 1:
        metrics["permutations"] = cfg.permutations
        metrics["mean_over_orders"] = mean.result()
        metrics["strict"] = strict.result()
    if cfg.mode == "generate":
        metrics["unparsed"] = unparsed
    breakdown = {}
    for key, acc in by_meta.items():
        result = acc.result()
        if result["n"]:
            breakdown[key] = {value: {"accuracy": a, "n": result["counts"][value]}
                              for value, a in result["per_part"].items()}
    if breakdown:
        metrics["breakdown"] = breakdown
    return metrics


class PredictionRows:
    """The rows of a predictions file, read afresh at each iteration (one row in memory at a time)."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)


def run_inference(cfg: InferConfig, split: str, info: DistInfo | None = None,
                  loaded: dict | None = None) -> dict[str, Any]:
    """Score this rank's shard of ``<data_dir>/<split>.jsonl`` into its part file; the rank that finds every
    question done (the last to finish; the only one in a one-process run) merges the outputs. Returns a
    summary with the paths (and the metrics when merged).

    ``info``: this process's rank and world (default: from the launcher's environment). An ``eval`` split (or
    one without answers) gets predictions and a submission but no metrics.json. ``loaded``: a dict this call
    keeps the scoring backbone in, so the next split a process scores with the same config reuses it.
    """
    start = time.monotonic()
    info = info or launch_info()
    index, out_dir = open_split(cfg, split)
    mine = part_path(out_dir, info.rank)
    with split_lock(out_dir):
        check_same_run(out_dir, cfg)
        adopt_earlier_predictions(out_dir)
        mine.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(mine)  # a row cut off by a kill is scored again, never half-read
        finished_marker(out_dir, info.rank, info.world_size).unlink(missing_ok=True)
    parts = scan_parts(out_dir, index, progress=cfg.progress and info.is_main)
    done = parts.done(len(index))
    # this rank's batches with a question left; a batch is scored whole (the same logits as in a run that was
    # never stopped) and only its missing rows are written
    todo = [b for b in index.schedule(cfg.batch_size, info.world_size, info.rank) if not done[b].all()]
    scored = sum(int((~done[b]).sum()) for b in todo)
    model_name = cfg.model_name or Path(cfg.adapter or cfg.model_path).resolve().name

    if todo:
        device = resolve_device(cfg.device, info.local_rank)
        loaded = {} if loaded is None else loaded
        if "backbone" not in loaded:
            loaded["backbone"] = load_scoring_backbone(cfg, device)
        backbone = loaded["backbone"]
        # the questions left, as the training dataset builds them (canonical order, no augmentation); a
        # backbone that reads no audio (empty feature settings: a text LLM over events) decodes no clip
        features = None
        if backbone.feature_settings():
            with index.open_records() as reader:
                clips = dict.fromkeys(index.audio_root / r.audio for b in todo for r in reader.read(index, b))
            features = FeatureSource(backbone, clips, cfg.cache_dir, cfg.progress and info.is_main, cfg.audio,
                                     disjoint=info.world_size > 1)
        progress = JobProgress(out_dir, info.rank, info.world_size, total=int((~done).sum()),
                               sizes={p.name: s for p, s in zip(parts.files, parts.sizes)},
                               desc=f"{split} ({cfg.mode}, {info.world_size} rank{'s' * (info.world_size > 1)})",
                               enabled=cfg.progress)
        with index.open_records() as reader, mine.open("a", encoding="utf-8") as fh, progress:
            for batch in todo:
                records = reader.read(index, batch)
                dataset = QADataset(Manifest(path=index.path, audio_root=index.audio_root, records=records),
                                    features)
                rows = score_batch(backbone, records, [dataset[i] for i in range(len(records))], cfg, model_name)
                for row, pos in zip(rows, batch):
                    if not done[pos]:
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()  # a killed run keeps every finished batch
                progress.update(int((~done[batch]).sum()))

    summary: dict[str, Any] = {"split": split, "rank": info.rank, "ranks": info.world_size, "scored": scored,
                               "resumed": int(done.sum()), "merged": False,
                               "predictions": str(out_dir / PREDICTIONS), "submission": str(out_dir / SUBMISSION)}
    with split_lock(out_dir):  # the last rank to finish finds every rank finished and every question done
        finished_marker(out_dir, info.rank, info.world_size).touch()
        if not all_finished(out_dir, info.world_size):
            summary["waiting"] = True  # another rank is still scoring; it merges when it finishes
            return summary
        parts = scan_parts(out_dir, index)
        row_of = check_complete(out_dir, parts, index)
        if (row_of < 0).any() and info.world_size == 1:
            raise missing_error(out_dir, index, row_of)  # nothing else is scoring: a question was lost
        if (row_of < 0).any():  # a marker of an earlier, killed launch: that rank's share is not done yet
            summary["waiting"] = True
            return summary
        # a rank that finished at the same moment merged these rows (and the outputs are all still there)
        if already_merged(out_dir, parts, index, metrics=split != "eval" and index.answered):
            if (out_dir / METRICS).is_file():
                summary.update(metrics=json.loads((out_dir / METRICS).read_text(encoding="utf-8")),
                               metrics_path=str(out_dir / METRICS))
            return summary
        run = {"ranks": info.world_size, "wall_s": None, "questions_per_s": None,
               "scored": int(len(index) - summary["resumed"]), "resumed": summary["resumed"]}
        summary.update(merge_outputs(cfg, split, index, out_dir, parts, row_of, run, start))
    return summary


def merge_split(cfg: InferConfig, split: str) -> dict[str, Any]:
    """``--merge``: write the outputs from the part files alone (every question exactly once, else an error
    that names the ids), e.g. after copying every node's ``parts/`` into one output_dir."""
    start = time.monotonic()
    index, out_dir = open_split(cfg, split)
    if not part_files(out_dir):
        raise MergeError(f"{out_dir / PARTS} holds no part files; score the split first (inference/run.py without "
                         "--merge), or copy every node's parts/ files there.")
    with split_lock(out_dir):
        parts = scan_parts(out_dir, index, progress=cfg.progress)
        row_of = check_complete(out_dir, parts, index)
        if (row_of < 0).any():
            raise missing_error(out_dir, index, row_of)
        summary = {"split": split, "scored": 0, "resumed": len(index), "merged": False,
                   "predictions": str(out_dir / PREDICTIONS), "submission": str(out_dir / SUBMISSION)}
        summary.update(merge_outputs(cfg, split, index, out_dir, parts, row_of, None, start))
    return summary


def open_split(cfg: InferConfig, split: str) -> tuple[SplitIndex, Path]:
    """The split's index (the manifest streamed once) and its output directory."""
    manifest_path = Path(cfg.data_dir) / f"{split}.jsonl"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist. Write manifests with a data_prep converter "
                                "(e.g. python -m data_prep.synth --out DIR) and point data_dir at DIR.")
    return SplitIndex.scan(manifest_path, cfg.limit), Path(cfg.output_dir) / split


def merge_outputs(cfg: InferConfig, split: str, index: SplitIndex, out_dir: Path, parts: PartRows,
                  row_of: np.ndarray, run: dict[str, Any] | None, start: float) -> dict[str, Any]:
    """predictions.jsonl in manifest order, submission.csv and (with answers) metrics.json; ``run``: this
    launch's ranks and counts, to which the wall time (from ``start``) and questions/s are added."""
    pred_path = out_dir / PREDICTIONS
    write_merged(out_dir, parts, index, row_of, pred_path, progress=cfg.progress)
    rows = PredictionRows(pred_path)
    tmp = out_dir / f".{SUBMISSION}.tmp"
    write_submission(rows, tmp)
    os.replace(tmp, out_dir / SUBMISSION)
    out: dict[str, Any] = {"merged": True, "outside": parts.outside}
    if run is not None:
        run["wall_s"] = round(time.monotonic() - start, 3)
        run["questions_per_s"] = round(run["scored"] / run["wall_s"], 3) if run["wall_s"] > 0 else None
        out["run"] = run
    if split != "eval" and index.answered:
        metrics = compute_metrics(rows, cfg, split)
        if run is not None:
            metrics["run"] = run  # how this launch went; every other key is the same however it was run
        write_json(metrics, out_dir / METRICS)
        out.update(metrics=metrics, metrics_path=str(out_dir / METRICS))
    write_stamp(out_dir, parts, index)
    return out


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
