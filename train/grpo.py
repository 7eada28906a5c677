"""GRPO after SFT: sample G answers per question, reward the right ones, push the policy towards them.

    deepspeed train/grpo.py --config configs/qwen2_audio/grpo.yaml [key=value ...]     # GPUs of this node
    deepspeed --num_gpus 2 train/grpo.py --config configs/demo/qwen2_audio_grpo.yaml   # two CPU ranks
    python train/grpo.py --config configs/demo/qwen2_audio_grpo.yaml max_steps=4       # one process

The recipe reads top to bottom: setup (processes, the SFT model with a fresh GRPO adapter, data,
DeepSpeed engine, resume) -> loop over rounds (rollouts with one prefill per question, rewards,
group advantages, reference log-probs with the adapter off, clipped loss with KL, optimizer steps,
logging, checkpoints) -> save (final checkpoint and the adapter stacked onto the SFT one). The run
dir holds config.yaml, ds_config.json, metrics.jsonl, checkpoints/step_N/ and adapter/ (plain PEFT
on the base model, safetensors). With ``finetune=full`` the policy's own weights train, the reference is
a frozen copy of the starting model (one more model in memory), and the run writes model/ instead.

Shapes: B = batch.per_device questions per rank, G = grpo.num_generations, T completion tokens.
"""

from __future__ import annotations

import sys
import time

from aqa.backbones import get_backbone
from aqa.backbones.full import MODEL, apply_full, frozen_reference, save_model
from aqa.data.dataset import ShardedSampler, collate_examples, qa_datasets
from aqa.eval.dev import evaluate
from aqa.grpo.config import (
    GRPOConfig,
    chunks_per_micro_batch,
    engine_batch,
    total_rounds,
    total_steps,
    update_chunk,
)
from aqa.grpo.engines import build_rollout_engine
from aqa.grpo.policy import fold_sft_adapter, grpo_adapter_config, policy_from_sft, save_stacked_adapter
from aqa.grpo.rollout import is_noop_round, sample_group, score_groups
from aqa.grpo.step import group_loss, loss_metrics, rollout_metrics
from aqa.runtime import checkpoint as ckpt
from aqa.runtime import distributed
from aqa.runtime.engine import build_engine
from aqa.runtime.loaders import micro_batches, micro_batches_per_epoch, train_loader
from aqa.runtime.logging import progress_bar
from aqa.runtime.nonfinite import check_loss, confirm_skipped
from aqa.runtime.recipe import crossed, finish, open_run, recipe_main, resume_state, start_run


def train(cfg: GRPOConfig) -> dict:
    # ================================================================ setup
    # -- processes (rank and device from the launcher), seeds, precision, the checkpoint to resume
    run = start_run(cfg)
    info = run.info
    G, iters = cfg.grpo.num_generations, cfg.grpo.num_iterations

    # -- model: SFT adapter folded into the weights + a fresh GRPO adapter; the reference is this model
    #    with the GRPO adapter disabled (no second copy). finetune=full: the (SFT) model's own weights train
    #    and the reference is a frozen copy of them, the memory of one more model
    backbone = get_backbone(cfg.backbone).from_pretrained(cfg.model_path, device=run.device, dtype=run.dtype,
                                                          prompt=cfg.prompt)
    full, frozen_ref = cfg.finetune == "full", None
    if full:
        if cfg.sft_adapter:
            fold_sft_adapter(backbone, cfg.sft_adapter)
        model = apply_full(backbone, cfg.full)
        if cfg.grpo.beta > 0:
            frozen_ref, ref_bytes = frozen_reference(model)
            if info.is_main:
                print(f"grpo: finetune=full keeps a frozen reference copy for the KL term: {ref_bytes / 2**30:.2f} "
                      f"GiB more per rank ({run.dtype}); beta=0 needs none", flush=True)
    else:
        model = policy_from_sft(backbone, cfg.sft_adapter, cfg.lora)
    rollouts = build_rollout_engine(cfg.grpo.rollout)  # static cache + CUDA graph, or the eager loop
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # -- data: answered train questions, options shuffled per (epoch, question), so per group
    train_ds, dev_ds = qa_datasets(cfg.data_dir, cfg.train_split, cfg.dev_split,
                                   cfg.cache_dir or run.run_dir / "feature_cache", backbone.extract_features,
                                   backbone.feature_settings(), augment=cfg.augment,
                                   spec_augment_key=backbone.spec_augment_key, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size, barrier=distributed.barrier,
                                   progress=cfg.progress and info.is_main)
    sampler = ShardedSampler(len(train_ds), rank=info.rank, world_size=info.world_size, shuffle=True,
                             seed=cfg.seed)
    loader = train_loader(train_ds, sampler, cfg.batch.per_device, cfg.num_workers, collate_examples)
    accumulation = cfg.batch.gradient_accumulation
    # DeepSpeed micro-batches per micro-batch of questions: it is sampled at once, then scored and trained on in
    # chunks of update_chunk(cfg) questions
    n_chunks = chunks_per_micro_batch(cfg)
    micro_per_epoch = micro_batches_per_epoch(sampler, cfg.batch.per_device)
    rounds = total_rounds(cfg, micro_per_epoch)
    total = total_steps(cfg, micro_per_epoch)  # optimizer steps: exactly max_steps when set
    stop_step = min(total, cfg.checkpoint.stop_at_step or total)

    # -- engine: AdamW + warmup/cosine, ZeRO-2; DeepSpeed accumulates `accumulation` micro-batches per step,
    #    each one pass per chunk of update_chunk(cfg) questions.
    #    Resume: GRPO adapter, optimizer, schedule, sampler position and every RNG (so rollouts) as saved
    engine, scheduler, ds_config = build_engine(model, cfg.deepspeed_config, engine_batch(cfg, info.world_size),
                                                cfg.optim, info.world_size, run.precision, total)
    state = resume_state(engine, run)
    logger = open_run(cfg, run, state, ds_config)
    if info.is_main:
        print(f"grpo: {info.world_size} rank(s) on {run.device.type}, {run.precision}, {n_train:,} "
              f"{'trained' if full else 'GRPO adapter'} parameters; {len(train_ds)} questions, {rounds} rounds x {iters} step(s) of {accumulation} x "
              f"{cfg.batch.per_device} questions x G={G} per rank"
              + (f", trained in chunks of {update_chunk(cfg)}" if n_chunks > 1 else "")
              + (f"; resumed from {run.resume_dir.name}" if run.resume_dir else ""), flush=True)

    def save(step: int) -> None:
        state.global_step, state.rng = step, ckpt.capture_rng()
        if full:  # DeepSpeed's files hold the trained weights and the optimizer; model/ is written at the end
            ckpt.save_checkpoint(engine, run.ckpt_root, state, keep_last=cfg.checkpoint.keep_last)
            return
        adapter_state = ckpt.trainable_state(engine, engine.module)  # collective: fp32 masters from ZeRO
        tag_dir = ckpt.save_checkpoint(engine, run.ckpt_root, state, keep_last=cfg.checkpoint.keep_last)
        if info.is_main:  # the stacked adapter, loadable on the base model like the final one
            save_stacked_adapter(cfg.sft_adapter, adapter_state, grpo_adapter_config(engine), tag_dir / ckpt.ADAPTER)

    def dev_eval(step: int) -> dict:
        metrics = evaluate(backbone, engine.module, dev_ds, cfg.eval.batch_size, cfg.eval.limit,
                           progress=cfg.progress)
        logger.log(step, metrics, kind="eval")
        return metrics

    # ================================================================ loop
    stream = micro_batches(loader, sampler, state)
    bar = progress_bar(total, initial=state.global_step, enabled=info.is_main and cfg.progress, desc="grpo")
    logger.attach(bar)
    window: list[dict] = []  # per-round metrics since the last log line
    last_saved, last_eval, dev_metrics = state.global_step, None, {}
    tick = time.perf_counter()
    while state.global_step < stop_step:
        # -- rollouts: `accumulation` micro-batches sampled with the current policy by the rollout engine, one
        #    prefill per question, G completions per decode step; rewards gathered over ranks -> advantages [B, G]
        engine.train()
        groups = [sample_group(backbone, engine, next(stream), cfg.grpo, rollouts) for _ in range(accumulation)]
        metrics = rollout_metrics(groups)

        # -- reference log-probs [B, G, T] (GRPO adapter off) and, for num_iterations > 1, the sampling
        #    policy's, both once per round. A round whose every group has equal rewards carries no advantage
        #    signal, but the beta * KL term still pulls a drifted policy back: it steps like any other round
        #    (so the step count and the LR schedule stay in lock-step) and is counted as a no-op round.
        noop = is_noop_round(groups)
        state.noop_rounds += int(noop)
        score_groups(backbone, engine, groups, cfg.grpo, frozen_ref, n_chunks)
        losses, stats = [], []
        n_steps = min(iters, stop_step - state.global_step)  # max_steps is exact: the last round may stop early
        for _ in range(n_steps):  # each pass over the round is one optimizer step
            skipped_before, nonfinite = engine.skipped_steps, 0
            for group in groups:
                # one forward/backward per chunk of questions (one DeepSpeed micro-batch each, always n_chunks of
                # them): the weighted chunk losses average to the micro-batch's loss, so this is its gradient
                # with a chunk's activations in memory
                bad, total = False, 0.0
                for part, weight in group.split(n_chunks):
                    loss, st = group_loss(backbone, engine, part, cfg.grpo)  # clipped ratio - beta KL
                    loss = loss * weight
                    ids = [e.id for e in part.rollout.examples]
                    bad |= check_loss(loss, ids, cfg.nonfinite_loss, state.nonfinite_steps, cfg.max_nonfinite,
                                      state.global_step)
                    if not bad:
                        total += loss.item() / n_chunks
                        if weight > 0:
                            stats.append(st)
                    engine.backward(loss)
                    engine.step()
                if bad:  # counted once per micro-batch; its NaN gradients make DeepSpeed skip the step
                    state.nonfinite_steps += 1
                    nonfinite += 1
                else:
                    losses.append(total)
            confirm_skipped(engine, skipped_before, nonfinite)  # as SFT: a NaN step really was skipped
        metrics.update(loss_metrics(losses, stats), noop=float(noop), noop_rounds=state.noop_rounds,
                       lr=scheduler.get_last_lr()[0], grad_norm=float(engine.get_global_grad_norm() or 0.0))
        state.global_step += n_steps
        step = state.global_step
        bar.update(n_steps)
        window.append(metrics)

        # -- log: reward mean/std, zero-std groups, KL, clip fraction, completion length (window means)
        if crossed(step, n_steps, cfg.logging.every_steps) or step >= stop_step:
            keys = {k for m in window for k in m}
            row = {k: sum(m[k] for m in window if k in m) / sum(1 for m in window if k in m) for k in sorted(keys)}
            row.update(epoch=state.epoch + state.consumed / sampler.num_samples, nonfinite=state.nonfinite_steps,
                       rollouts_per_s=len(window) * accumulation * cfg.batch.per_device * G * info.world_size
                       / max(time.perf_counter() - tick, 1e-9))
            logger.log(step, row)
            window, tick = [], time.perf_counter()

        # -- dev accuracy from the option-letter logits, every N steps
        if dev_ds is not None and crossed(step, n_steps, cfg.eval.every_steps):
            dev_metrics, last_eval = dev_eval(step), step

        # -- checkpoint every N steps (DeepSpeed state + train state + stacked adapter)
        if crossed(step, n_steps, cfg.checkpoint.every_steps):
            save(step)
            last_saved = step
    bar.close()

    # ================================================================ save
    step = state.global_step
    if dev_ds is not None and cfg.eval.at_end and step >= total and last_eval != step:
        dev_metrics = dev_eval(step)
    if last_saved != step:
        save(step)
    if full:  # ZeRO-2 keeps whole weights on every rank: the main one writes them
        if info.is_main:
            save_model(backbone, engine.module, run.run_dir / MODEL)
            print(f"grpo: step {step}/{total}; model in {run.run_dir / MODEL}", flush=True)
    else:
        adapter_state = ckpt.trainable_state(engine, engine.module)
        if info.is_main:
            save_stacked_adapter(cfg.sft_adapter, adapter_state, grpo_adapter_config(engine),
                                 run.run_dir / ckpt.ADAPTER)
            print(f"grpo: step {step}/{total}; adapter (SFT + GRPO, on the base model) in "
                  f"{run.run_dir / ckpt.ADAPTER}", flush=True)
    return finish(logger, {"step": step, "total_steps": total, "nonfinite": state.nonfinite_steps,
                           "noop_rounds": state.noop_rounds, "skipped_steps": engine.skipped_steps,
                           **{f"dev_{k}": v for k, v in dev_metrics.items()}})


def main(argv: list[str] | None = None) -> int:
    return recipe_main("GRPO from an SFT adapter (or, with finetune=full, an SFT model) under DeepSpeed ZeRO-2.",
                       GRPOConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
