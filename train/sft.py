"""LoRA supervised fine-tuning of an audio-language model for multiple-choice audio QA.

    deepspeed train/sft.py --config configs/qwen2_audio/sft.yaml [key=value ...]     # GPUs of this node
    deepspeed --hostfile hosts train/sft.py --config ...                               # several nodes
    torchrun --nproc_per_node 2 train/sft.py --config ...
    python train/sft.py --config configs/demo/qwen2_audio_sft.yaml max_steps=10        # one process

The recipe reads top to bottom: setup (processes, model + LoRA, data, DeepSpeed engine, resume) ->
loop (micro-batches, loss on the answer tokens, optimizer steps, logging, dev accuracy, checkpoints)
-> save (final checkpoint and adapter). The run dir (``output_dir``) ends up holding config.yaml,
ds_config.json, metrics.jsonl, checkpoints/step_N/ and adapter/ (plain PEFT, safetensors).

Shapes: B = batch.micro_size questions per rank, T tokens, F mel frames.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from aqa.backbones import get_backbone
from aqa.backbones.lora import apply_lora
from aqa.config import ConfigError, save_config, to_dict
from aqa.data.cache import build_feature_cache
from aqa.data.dataset import QADataset, ShardedSampler, collate_examples
from aqa.data.manifest import load_manifest
from aqa.eval.dev import evaluate
from aqa.runtime import checkpoint as ckpt
from aqa.runtime import distributed
from aqa.runtime.engine import (
    accumulation_steps,
    build_engine,
    model_dtype,
    resolve_precision,
    seed_everything,
    total_steps,
)
from aqa.runtime.loaders import micro_batches, micro_batches_per_epoch, train_loader
from aqa.runtime.logging import RunLogger, progress_bar
from aqa.runtime.nonfinite import NonFiniteLoss
from aqa.runtime.setup import check_run_dir, require_answers
from aqa.sft.config import SFTConfig, load_sft_config
from aqa.sft.step import optimizer_step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA SFT under DeepSpeed ZeRO-2.")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/qwen2_audio/sft.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 lora.r=16")
    distributed.add_launcher_args(parser)  # the deepspeed launcher appends --local_rank=N
    return parser.parse_args(argv)


def train(cfg: SFTConfig) -> dict:
    # ================================================================ setup
    # -- processes: rank and device from the launcher's environment; gloo on CPU, nccl on GPU
    info = distributed.init()
    distributed.set_cpu_threads(info)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision, info.device)
    dtype = model_dtype(precision)
    run_dir = Path(cfg.output_dir)
    ckpt_root = run_dir / ckpt.CHECKPOINTS
    resume_dir = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_root)
    check_run_dir(run_dir, resume_dir, cfg.checkpoint.resume)

    # -- model: the backbone from its directory, LoRA on the language model (audio side only if configured)
    backbone = get_backbone(cfg.backbone).from_pretrained(cfg.model_path, device=info.device, dtype=dtype,
                                                          prompt=cfg.prompt)
    model = apply_lora(backbone, cfg.lora)  # only LoRA tensors require grad now
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    # -- data: manifests, the feature cache (each rank extracts its share once), sampler and loader
    data_dir = Path(cfg.data_dir)
    train_m = load_manifest(data_dir / f"{cfg.train_split}.jsonl")
    require_answers(train_m)
    dev_m = load_manifest(data_dir / f"{cfg.dev_split}.jsonl") if cfg.dev_split else None
    cache = build_feature_cache([m for m in (train_m, dev_m) if m is not None],
                                cfg.cache_dir or run_dir / "feature_cache", backbone.extract_features,
                                backbone.feature_settings(), rank=info.rank, world_size=info.world_size,
                                barrier=distributed.barrier, progress=cfg.progress and info.is_main)
    train_ds = QADataset(train_m, cache, augment=cfg.augment, spec_augment_key=backbone.spec_augment_key,
                         seed=cfg.seed)  # option shuffling + SpecAugment, seeded per (epoch, item)
    dev_ds = QADataset(dev_m, cache) if dev_m is not None else None  # canonical order, no augmentation
    sampler = ShardedSampler(len(train_ds), rank=info.rank, world_size=info.world_size, shuffle=True,
                             seed=cfg.seed)
    loader = train_loader(train_ds, sampler, cfg.batch.micro_size, cfg.num_workers, collate_examples)
    accumulation = accumulation_steps(cfg.batch.global_size, cfg.batch.micro_size, info.world_size)
    total = total_steps(cfg, micro_batches_per_epoch(sampler, cfg.batch.micro_size), accumulation)
    stop_step = min(total, cfg.checkpoint.stop_at_step or total)

    # -- engine: AdamW + warmup/cosine from the optim section, ZeRO-2 from the DeepSpeed JSON
    engine, scheduler, ds_config = build_engine(model, cfg.deepspeed_config, cfg.batch, cfg.optim,
                                                info.world_size, precision, total)

    # -- resume: weights, optimizer, schedule, sampler position and every RNG exactly as saved
    state = ckpt.TrainState(world_size=info.world_size)
    if resume_dir is not None:
        state = ckpt.load_checkpoint(engine, resume_dir)
        ckpt.restore_rng(state.rng)
    logger = RunLogger(run_dir, enabled=info.is_main, report_to=cfg.logging.report_to, config=to_dict(cfg),
                       project=cfg.logging.project, run_name=cfg.logging.run_name,
                       resume_step=state.global_step if resume_dir is not None else None)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
        print(f"sft: {info.world_size} rank(s) on {info.device.type}, {precision}, {n_train:,} of {n_all:,} "
              f"parameters train; {len(train_ds)} questions, {total} steps of {cfg.batch.global_size} "
              f"({accumulation} x {cfg.batch.micro_size} per rank)"
              + (f"; resumed from {resume_dir.name}" if resume_dir else ""), flush=True)

    def save(step: int) -> Path:
        state.global_step, state.rng = step, ckpt.capture_rng()
        adapter_state = ckpt.trainable_state(engine, engine.module)  # collective: fp32 masters from ZeRO
        return ckpt.save_checkpoint(engine, ckpt_root, state, adapter_state, engine.module,
                                    keep_last=cfg.checkpoint.keep_last)

    def dev_eval(step: int) -> dict:
        metrics = evaluate(backbone, engine.module, dev_ds, cfg.eval.batch_size, cfg.eval.limit,
                               progress=cfg.progress)
        logger.log(step, metrics, kind="eval")
        return metrics

    # ================================================================ loop
    stream = micro_batches(loader, sampler, state)
    bar = progress_bar(total, initial=engine.global_steps, enabled=info.is_main and cfg.progress, desc="sft")
    logger.attach(bar)
    loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of finite micro-batch losses, their count]
    last_saved, last_eval, dev_metrics = state.global_step, None, {}
    tick, last_log = time.perf_counter(), state.global_step
    while engine.global_steps < stop_step:
        # -- one optimizer step: `accumulation` micro-batches per rank, loss on the answer tokens only;
        #    a NaN/inf loss on any rank is counted and its step skipped (or the run stops, per config)
        stats = optimizer_step(engine, backbone, stream, accumulation, state, cfg.nonfinite_loss,
                                   cfg.max_nonfinite, info.device, dtype)
        loss_sum += torch.tensor([stats.loss_sum, stats.finite], dtype=torch.float64)
        step = engine.global_steps
        bar.update(1)

        # -- log: loss averaged over the micro-batches of every rank since the last line
        if step % cfg.logging.every_steps == 0 or step == stop_step:
            summed = distributed.all_reduce_sum(loss_sum)  # [loss sum, micro-batches]
            elapsed = time.perf_counter() - tick
            logger.log(step, {
                "loss": float(summed[0] / summed[1]) if summed[1] else float("nan"),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "epoch": state.epoch + state.consumed / sampler.num_samples,
                "samples_per_s": cfg.batch.global_size * (step - last_log) / max(elapsed, 1e-9),
                "nonfinite": state.nonfinite_steps, "skipped_steps": engine.skipped_steps,
            })
            loss_sum.zero_()
            tick, last_log = time.perf_counter(), step

        # -- dev accuracy from the option-letter logits, every N steps
        if dev_ds is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            dev_metrics, last_eval = dev_eval(step), step

        # -- checkpoint every N steps (DeepSpeed state + train state + adapter)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            save(step)
            last_saved = step
    bar.close()

    # ================================================================ save
    step = engine.global_steps
    if dev_ds is not None and cfg.eval.at_end and step == total and last_eval != step:
        dev_metrics = dev_eval(step)
    if last_saved != step:
        save(step)
    adapter_state = ckpt.trainable_state(engine, engine.module)
    if info.is_main:
        ckpt.save_adapter(engine.module, run_dir / ckpt.ADAPTER, adapter_state)
        print(f"sft: step {step}/{total}; adapter in {run_dir / ckpt.ADAPTER}", flush=True)
    summary = {"step": step, "total_steps": total, "nonfinite": state.nonfinite_steps,
               "skipped_steps": engine.skipped_steps, **{f"dev_{k}": v for k, v in dev_metrics.items()}}
    logger.summary(summary)
    logger.close()
    distributed.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_sft_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, ckpt.CheckpointError, NonFiniteLoss, FileNotFoundError) as err:
        if distributed.is_main():
            print(f"error: {err}", file=sys.stderr, flush=True)
        distributed.cleanup()
        return 2 if isinstance(err, ConfigError) else 1
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
