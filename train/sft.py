"""Supervised fine-tuning (LoRA, or full with ``finetune=full``) of an audio-language model for multiple-choice
audio QA.

    deepspeed train/sft.py --config configs/qwen2_audio/sft.yaml [key=value ...]     # GPUs of this node
    deepspeed --hostfile hosts train/sft.py --config ...                               # several nodes
    torchrun --nproc_per_node 2 train/sft.py --config ...
    python train/sft.py --config configs/demo/qwen2_audio_sft.yaml max_steps=10        # one process

The recipe reads top to bottom: setup (processes, model + LoRA, data, DeepSpeed engine, resume) ->
loop (micro-batches, loss on the answer tokens, optimizer steps, logging, dev accuracy, checkpoints)
-> save (final checkpoint and adapter or model). The run dir (``output_dir``) ends up holding config.yaml,
ds_config.json, metrics.jsonl, checkpoints/step_N/ and adapter/ (plain PEFT, safetensors) or, with
``finetune=full``, model/ (a plain HF directory, safetensors).

Shapes: B = batch.micro_size questions per rank, T tokens, F mel frames.
"""

from __future__ import annotations

import sys

from aqa.backbones import get_backbone
from aqa.backbones.full import MODEL, apply_full, save_model
from aqa.backbones.lora import apply_lora
from aqa.data.dataset import ShardedSampler, collate_examples, qa_datasets
from aqa.eval.dev import evaluate
from aqa.runtime import checkpoint as ckpt
from aqa.runtime import distributed
from aqa.runtime.engine import accumulation_steps, build_engine, total_steps
from aqa.runtime.loaders import micro_batches, micro_batches_per_epoch, train_loader
from aqa.runtime.logging import progress_bar
from aqa.runtime.nonfinite import check_loss, confirm_skipped
from aqa.runtime.recipe import LossWindow, crossed, finish, open_run, recipe_main, resume_state, start_run
from aqa.sft.config import SFTConfig
from aqa.sft.step import enable_gradient_checkpointing, sft_loss


def train(cfg: SFTConfig) -> dict:
    # ================================================================ setup
    # -- processes (rank and device from the launcher), seeds, precision, the checkpoint to resume
    run = start_run(cfg)
    info = run.info

    # -- model: the backbone from its directory, LoRA on the language model (audio side only if configured),
    #    or with finetune=full the language model's own weights (and the audio side if configured)
    backbone = get_backbone(cfg.backbone).from_pretrained(cfg.model_path, device=run.device, dtype=run.dtype,
                                                          prompt=cfg.prompt)
    if cfg.gradient_checkpointing:  # activations recomputed in the backward: memory for a larger micro-batch
        enable_gradient_checkpointing(backbone)
    full = cfg.finetune == "full"
    model = apply_full(backbone, cfg.full) if full else apply_lora(backbone, cfg.lora)  # what requires grad
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())

    # -- data: train (option shuffling + SpecAugment, seeded per (epoch, item)) and dev (canonical order)
    #    over one feature cache each rank fills its share of; a sampler per rank, resumable mid-epoch
    train_ds, dev_ds = qa_datasets(cfg.data_dir, cfg.train_split, cfg.dev_split,
                                   cfg.cache_dir or run.run_dir / "feature_cache", backbone.extract_features,
                                   backbone.feature_settings(), augment=cfg.augment,
                                   spec_augment_key=backbone.spec_augment_key, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size, barrier=distributed.barrier,
                                   progress=cfg.progress and info.is_main)
    sampler = ShardedSampler(len(train_ds), rank=info.rank, world_size=info.world_size, shuffle=True,
                             seed=cfg.seed, lengths=train_ds.lengths() if cfg.group_by_length else None,
                             group_size=cfg.batch.micro_size)  # optionally micro-batches of similar clip length
    loader = train_loader(train_ds, sampler, cfg.batch.micro_size, cfg.num_workers, collate_examples)
    accumulation = accumulation_steps(cfg.batch.global_size, cfg.batch.micro_size, info.world_size)
    total = total_steps(cfg, micro_batches_per_epoch(sampler, cfg.batch.micro_size), accumulation)
    stop_step = min(total, cfg.checkpoint.stop_at_step or total)

    # -- engine: AdamW + warmup/cosine from the optim section, ZeRO-2 from the DeepSpeed JSON; resume
    engine, scheduler, ds_config = build_engine(model, cfg.deepspeed_config, cfg.batch, cfg.optim,
                                                info.world_size, run.precision, total)
    state = resume_state(engine, run)
    logger = open_run(cfg, run, state, ds_config)
    if info.is_main:
        print(f"sft: {info.world_size} rank(s) on {run.device.type}, {run.precision}, {n_train:,} of {n_all:,} "
              f"parameters train; {len(train_ds)} questions, {total} steps of {cfg.batch.global_size} "
              f"({accumulation} x {cfg.batch.micro_size} per rank)"
              + (f"; resumed from {run.resume_dir.name}" if run.resume_dir else ""), flush=True)

    def save(step: int) -> None:
        state.global_step, state.rng = step, ckpt.capture_rng()
        if full:  # DeepSpeed's files hold the trained weights and the optimizer; model/ is written at the end
            ckpt.save_checkpoint(engine, run.ckpt_root, state, keep_last=cfg.checkpoint.keep_last)
            return
        adapter_state = ckpt.trainable_state(engine, engine.module)  # collective: fp32 masters from ZeRO
        ckpt.save_checkpoint(engine, run.ckpt_root, state, adapter_state, engine.module,
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
    window = LossWindow(state.global_step)
    last_saved, last_eval, dev_metrics = state.global_step, None, {}
    while engine.global_steps < stop_step:
        # -- one optimizer step: `accumulation` micro-batches per rank, forward and backward; DeepSpeed
        #    steps on the last. A NaN/inf loss on any rank is counted and the whole step skipped (its NaN
        #    gradients trip DeepSpeed's overflow check, confirmed below), or the run stops, per config.
        skipped_before, nonfinite = engine.skipped_steps, 0
        for _ in range(accumulation):
            examples = next(stream)  # B questions with cached features
            loss = sft_loss(backbone, engine, examples, run.device, run.dtype)  # CE on the answer tokens only
            if check_loss(loss, [e.id for e in examples], cfg.nonfinite_loss, state.nonfinite_steps,
                          cfg.max_nonfinite, engine.global_steps):
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
                "samples_per_s": cfg.batch.global_size * steps_per_s,
                "nonfinite": state.nonfinite_steps, "skipped_steps": engine.skipped_steps,
            })

        # -- dev accuracy from the option-letter logits, every N steps
        if dev_ds is not None and crossed(step, 1, cfg.eval.every_steps):
            dev_metrics, last_eval = dev_eval(step), step

        # -- checkpoint every N steps (DeepSpeed state + train state + adapter)
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
    if full:  # ZeRO-2 keeps whole weights on every rank: the main one writes them
        if info.is_main:
            save_model(backbone, engine.module, run.run_dir / MODEL)
            print(f"sft: step {step}/{total}; model in {run.run_dir / MODEL}", flush=True)
    else:
        adapter_state = ckpt.trainable_state(engine, engine.module)  # collective
        if info.is_main:
            ckpt.save_adapter(engine.module, run.run_dir / ckpt.ADAPTER, adapter_state)
            print(f"sft: step {step}/{total}; adapter in {run.run_dir / ckpt.ADAPTER}", flush=True)
    return finish(logger, {"step": step, "total_steps": total, "nonfinite": state.nonfinite_steps,
                           "skipped_steps": engine.skipped_steps, **{f"dev_{k}": v for k, v in dev_metrics.items()}})


def main(argv: list[str] | None = None) -> int:
    return recipe_main("SFT (LoRA or full) under DeepSpeed ZeRO-2.", SFTConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
