"""Fine-tune BEATs for sound event detection on strong labels (frame-level BCE on 160 ms rows).

    deepspeed train/sed.py --config configs/cascade/sed.yaml [key=value ...]
    torchrun --nproc_per_node 2 train/sed.py --config ...
    python train/sed.py --config configs/demo/cascade_sed.yaml max_steps=10        # one process

Setup (processes, model with a head for the trained classes, strong labels over manifest audio, fbank
cache, DeepSpeed engine, resume) -> loop (micro-batches, masked BCE, optimizer steps, logging, dev
loss/F1, checkpoints) -> save. The run dir (``output_dir``) ends up holding config.yaml, ds_config.json,
metrics.jsonl, checkpoints/step_N/ and model/: a SED directory (config.json, model.safetensors,
labels.json) that calibration and data_prep.sed_events take as --sed.

Shapes: B = batch.micro_size clips per rank, R rows of 160 ms (16 fbank frames each), C classes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from aqa.config import ConfigError, save_config, to_dict
from aqa.data.cache import build_feature_cache
from aqa.data.dataset import ShardedSampler
from aqa.data.manifest import load_manifest
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
from aqa.runtime.nonfinite import NonFiniteLoss, check_loss
from aqa.runtime.setup import check_run_dir
from aqa.sed import train as sed
from aqa.sed.labels import LabelMapError
from aqa.sed.strong import StrongLabelError, load_strong_clips
from aqa.sed.weights import SedCheckpointError, save_sed_dir

MODEL_DIR = "model"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="BEATs SED fine-tuning on strong labels under DeepSpeed.")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/cascade/sed.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 optim.lr=1e-4")
    distributed.add_launcher_args(parser)  # the deepspeed launcher appends --local_rank=N
    return parser.parse_args(argv)


def train(cfg: sed.SedTrainConfig) -> dict:
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

    # -- model: the init SED, its head re-made for the trained class set (rows kept by MID), all weights train
    model, labels, kept = sed.prepare_model(cfg.init_from, cfg.data, cfg.model, cfg.seed)
    model = model.to(device=info.device, dtype=dtype).train()
    patch = model.cfg.input_patch_size

    # -- data: strong-label clips of the manifests, their fbanks cached once (ranks split the work)
    train_clips, train_report = load_strong_clips(cfg.data.train_manifest, cfg.data.train_tsv, labels)
    dev_clips, dev_report = ([], None) if cfg.data.dev_manifest is None else \
        load_strong_clips(cfg.data.dev_manifest, cfg.data.dev_tsv, labels)
    extract, settings = sed.fbank_extractor(model.cfg)
    manifests = [load_manifest(p) for p in (cfg.data.train_manifest, cfg.data.dev_manifest) if p is not None]
    cache = build_feature_cache(manifests, cfg.cache_dir or run_dir / "fbank_cache", extract, settings,
                                rank=info.rank, world_size=info.world_size, barrier=distributed.barrier,
                                progress=cfg.progress and info.is_main)
    def dataset(clips, train: bool) -> sed.StrongSegmentDataset:  # train: random crops of segment_rows rows
        return sed.StrongSegmentDataset(clips, cache, len(labels), cfg.data.segment_rows, cfg.data.min_overlap,
                                        patch, train=train, seed=cfg.seed)

    train_ds = dataset(train_clips, True)
    dev_ds = dataset(dev_clips, False) if dev_clips else None
    sampler = ShardedSampler(len(train_ds), rank=info.rank, world_size=info.world_size, shuffle=True, seed=cfg.seed)
    loader = train_loader(train_ds, sampler, cfg.batch.micro_size, cfg.num_workers, sed.collate_segments)
    accumulation = accumulation_steps(cfg.batch.global_size, cfg.batch.micro_size, info.world_size)
    total = total_steps(cfg, micro_batches_per_epoch(sampler, cfg.batch.micro_size), accumulation)
    stop_step = min(total, cfg.checkpoint.stop_at_step or total)

    # -- engine: AdamW + warmup/cosine from the optim section, ZeRO from the DeepSpeed JSON
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
        print(f"sed: {info.world_size} rank(s) on {info.device.type}, {precision}; {len(labels)} classes "
              f"({kept} head rows kept from {cfg.init_from}); train: " + "; ".join(train_report.lines())
              + (f"; dev: {dev_report.clips} clips" if dev_report else "")
              + f"; {total} steps of {cfg.batch.global_size} clips"
              + (f"; resumed from {resume_dir.name}" if resume_dir else ""), flush=True)

    def save(step: int) -> Path:
        state.global_step, state.rng = step, ckpt.capture_rng()
        return ckpt.save_checkpoint(engine, ckpt_root, state, keep_last=cfg.checkpoint.keep_last)

    def dev_eval(step: int) -> dict:
        metrics = sed.evaluate(engine.module, dev_ds, cfg.eval.batch_size, cfg.eval.threshold, info.device, dtype)
        logger.log(step, metrics, kind="eval")
        return metrics

    # ================================================================ loop
    stream = micro_batches(loader, sampler, state)
    bar = progress_bar(total, initial=engine.global_steps, enabled=info.is_main and cfg.progress, desc="sed")
    logger.attach(bar)
    loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of finite micro-batch losses, their count]
    last_saved, last_eval, dev_metrics = state.global_step, None, {}
    tick, last_log = time.perf_counter(), state.global_step
    while engine.global_steps < stop_step:
        # -- one optimizer step: `accumulation` micro-batches per rank; a NaN/inf loss anywhere is counted
        #    and DeepSpeed skips the step (or the run stops, per nonfinite_loss)
        for _ in range(accumulation):
            batch = next(stream)  # fbank [B, R*16, 128], frame_mask [B, R*16], targets [B, R, C]
            loss, _, _ = sed.row_bce(engine, batch, info.device, dtype)
            if check_loss(loss, batch.ids, cfg.nonfinite_loss, state.nonfinite_steps, cfg.max_nonfinite,
                              engine.global_steps):
                state.nonfinite_steps += 1
            else:
                loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            engine.backward(loss)
            engine.step()
        step = engine.global_steps
        bar.update(1)

        # -- log: loss averaged over the micro-batches of every rank since the last line
        if step % cfg.logging.every_steps == 0 or step == stop_step:
            summed = distributed.all_reduce_sum(loss_sum)
            elapsed = time.perf_counter() - tick
            logger.log(step, {
                "loss": float(summed[0] / summed[1]) if summed[1] else float("nan"),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "epoch": state.epoch + state.consumed / sampler.num_samples,
                "clips_per_s": cfg.batch.global_size * (step - last_log) / max(elapsed, 1e-9),
                "nonfinite": state.nonfinite_steps, "skipped_steps": engine.skipped_steps,
            })
            loss_sum.zero_()
            tick, last_log = time.perf_counter(), step

        # -- dev BCE and segment F1, every N steps
        if dev_ds is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
            dev_metrics, last_eval = dev_eval(step), step

        # -- checkpoint every N steps (DeepSpeed state + train state)
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
    weights = sed.full_state_dict(engine, engine.module)  # collective: fp32 masters from ZeRO
    if info.is_main:
        save_sed_dir(engine.module, labels, run_dir / MODEL_DIR, state_dict=weights)
        print(f"sed: step {step}/{total}; SED directory in {run_dir / MODEL_DIR}", flush=True)
    summary = {"step": step, "total_steps": total, "nonfinite": state.nonfinite_steps,
               "skipped_steps": engine.skipped_steps, **{f"dev_{k}": v for k, v in dev_metrics.items()}}
    logger.summary(summary)
    logger.close()
    distributed.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = sed.load_sed_train_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, ckpt.CheckpointError, NonFiniteLoss, FileNotFoundError, StrongLabelError,
            LabelMapError, SedCheckpointError) as err:
        if distributed.is_main():
            print(f"error: {err}", file=sys.stderr, flush=True)
        distributed.cleanup()
        return 2 if isinstance(err, ConfigError) else 1
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
