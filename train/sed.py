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

import sys

from aqa.data.cache import build_feature_cache
from aqa.data.dataset import ShardedSampler
from aqa.data.manifest import load_manifest
from aqa.runtime import checkpoint as ckpt
from aqa.runtime import distributed
from aqa.runtime.engine import accumulation_steps, build_engine, total_steps
from aqa.runtime.loaders import micro_batches, micro_batches_per_epoch, train_loader
from aqa.runtime.logging import progress_bar
from aqa.runtime.nonfinite import check_loss, confirm_skipped
from aqa.runtime.recipe import LossWindow, crossed, finish, open_run, recipe_main, resume_state, start_run
from aqa.sed import train as sed
from aqa.sed.strong import load_strong_clips
from aqa.sed.weights import save_sed_dir

MODEL_DIR = "model"


def train(cfg: sed.SedTrainConfig) -> dict:
    # ================================================================ setup
    # -- processes (rank and device from the launcher), seeds, precision, the checkpoint to resume
    run = start_run(cfg)
    info = run.info

    # -- model: the init SED, its head re-made for the trained class set (rows kept by MID), all weights train
    model, labels, kept = sed.prepare_model(cfg.init_from, cfg.data, cfg.model, cfg.seed)
    model = model.to(device=run.device, dtype=run.dtype).train()
    patch = model.cfg.input_patch_size

    # -- data: strong-label clips of the manifests, their fbanks cached once (ranks split the work)
    train_clips, train_report = load_strong_clips(cfg.data.train_manifest, cfg.data.train_tsv, labels)
    dev_clips, dev_report = ([], None) if cfg.data.dev_manifest is None else \
        load_strong_clips(cfg.data.dev_manifest, cfg.data.dev_tsv, labels)
    extract, settings = sed.fbank_extractor(model.cfg)
    manifests = [load_manifest(p) for p in (cfg.data.train_manifest, cfg.data.dev_manifest) if p is not None]
    cache = build_feature_cache(manifests, cfg.cache_dir or run.run_dir / "fbank_cache", extract, settings,
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

    # -- engine: AdamW + warmup/cosine from the optim section, ZeRO from the DeepSpeed JSON; resume
    engine, scheduler, ds_config = build_engine(model, cfg.deepspeed_config, cfg.batch, cfg.optim,
                                                info.world_size, run.precision, total)
    state = resume_state(engine, run)
    logger = open_run(cfg, run, state, ds_config)
    if info.is_main:
        print(f"sed: {info.world_size} rank(s) on {run.device.type}, {run.precision}; {len(labels)} classes "
              f"({kept} head rows kept from {cfg.init_from}); train: " + "; ".join(train_report.lines())
              + (f"; dev: {dev_report.clips} clips" if dev_report else "")
              + f"; {total} steps of {cfg.batch.global_size} clips"
              + (f"; resumed from {run.resume_dir.name}" if run.resume_dir else ""), flush=True)

    def save(step: int) -> None:
        state.global_step, state.rng = step, ckpt.capture_rng()
        ckpt.save_checkpoint(engine, run.ckpt_root, state, keep_last=cfg.checkpoint.keep_last)

    def dev_eval(step: int) -> dict:
        metrics = sed.evaluate(engine.module, dev_ds, cfg.eval.batch_size, cfg.eval.threshold, run.device,
                               run.dtype)
        logger.log(step, metrics, kind="eval")
        return metrics

    # ================================================================ loop
    stream = micro_batches(loader, sampler, state)
    bar = progress_bar(total, initial=engine.global_steps, enabled=info.is_main and cfg.progress, desc="sed")
    logger.attach(bar)
    window = LossWindow(state.global_step)
    last_saved, last_eval, dev_metrics = state.global_step, None, {}
    while engine.global_steps < stop_step:
        # -- one optimizer step: `accumulation` micro-batches per rank, forward and backward; DeepSpeed
        #    steps on the last. A NaN/inf loss anywhere is counted and the step skipped (confirmed), or the
        #    run stops, per nonfinite_loss.
        skipped_before, nonfinite = engine.skipped_steps, 0
        for _ in range(accumulation):
            batch = next(stream)  # fbank [B, R*16, 128], frame_mask [B, R*16], targets [B, R, C]
            loss, _, _ = sed.row_bce(engine, batch, run.device, run.dtype)  # masked frame-level BCE
            if check_loss(loss, batch.ids, cfg.nonfinite_loss, state.nonfinite_steps, cfg.max_nonfinite,
                          engine.global_steps):
                state.nonfinite_steps += 1
                nonfinite += 1
            else:
                window.add(loss.item())
            engine.backward(loss)
            engine.step()
        confirm_skipped(engine, skipped_before, nonfinite)
        step = engine.global_steps
        bar.update(1)

        # -- log: loss averaged over the micro-batches of every rank since the last line
        if crossed(step, 1, cfg.logging.every_steps) or step == stop_step:
            loss_mean, steps_per_s = window.close(step)
            logger.log(step, {
                "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "epoch": state.epoch + state.consumed / sampler.num_samples,
                "clips_per_s": cfg.batch.global_size * steps_per_s,
                "nonfinite": state.nonfinite_steps, "skipped_steps": engine.skipped_steps,
            })

        # -- dev BCE and segment F1, every N steps
        if dev_ds is not None and crossed(step, 1, cfg.eval.every_steps):
            dev_metrics, last_eval = dev_eval(step), step

        # -- checkpoint every N steps (DeepSpeed state + train state)
        if crossed(step, 1, cfg.checkpoint.every_steps):
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
        save_sed_dir(engine.module, labels, run.run_dir / MODEL_DIR, state_dict=weights)
        print(f"sed: step {step}/{total}; SED directory in {run.run_dir / MODEL_DIR}", flush=True)
    return finish(logger, {"step": step, "total_steps": total, "nonfinite": state.nonfinite_steps,
                           "skipped_steps": engine.skipped_steps, **{f"dev_{k}": v for k, v in dev_metrics.items()}})


def main(argv: list[str] | None = None) -> int:
    return recipe_main("BEATs SED fine-tuning on strong labels under DeepSpeed.", sed.SedTrainConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
