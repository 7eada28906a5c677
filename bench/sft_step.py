"""Benchmark: the LoRA SFT step of train/sft.py (DeepSpeed ZeRO-2) on a random-init Qwen2-Audio; tokens/s and MFU.

    python bench/sft_step.py [--steps 5] [--warmup 2] [--batch 1] [--seven-b] [--peak-tflops 989]
                             [--clips full|dcase] [--group-by-length] [--gradient-checkpointing] [spec key=value ...]
    deepspeed --num_gpus N bench/sft_step.py ...          # the same step on N ranks (ZeRO-2 partitions)

No 7B weights exist here, so ``--seven-b`` builds Qwen2-Audio-7B's shapes (32 x 4096 LM, 32 x 1280 Whisper
encoder, 30 s audio window, 156,032-row vocabulary) with random weights, in bf16 on the GPU; other sizes
come from ``aqa.backbones.qwen2_audio_tiny.TinyQwen2AudioSpec`` overrides. ``--batch`` questions per rank per
micro-batch, LoRA r 8 on every language-model linear layer, the audio tower frozen: exactly the
forward/backward/step of ``train/sft.py`` (the LM head at the answer positions only).

Clips: ``full`` (every clip fills the window) or ``dcase`` (lengths drawn uniformly from 1-30 s, capped at the
window, as DCASE 2025 T5's clips run; 8 micro-batches per rank cycled), optionally grouped into micro-batches
of similar length as ``group_by_length`` does in the recipe.

MFU counts the model FLOPs a LoRA step needs: 2 N_body T forward + 2 N_body T for the activation gradients
(frozen weights get no weight gradient; LoRA's own are negligible), the LM head's 4 N_head on the answer
positions only, + 2 N_audio T_audio for the frozen encoder's forward (its full window), over the measured step
time and ``--peak-tflops`` (H100 SXM dense bf16: 989). Recomputation under gradient checkpointing and
attention-score FLOPs (a few % at these lengths) are not counted, so the figure is slightly low.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.backbones.qwen2_audio import Qwen2AudioBackbone, audio_token_count
from aqa.backbones.qwen2_audio_tiny import (
    SEVEN_B_SPEC,
    SEVEN_B_VOCAB,
    TinyQwen2AudioSpec,
    build_tiny_qwen2_audio,
)
from aqa.config import load_config
from aqa.data.dataset import ShardedSampler
from aqa.data.example import Example
from aqa.runtime import distributed
from aqa.runtime.engine import build_engine, model_dtype, resolve_precision
from aqa.sft.config import load_sft_config
from aqa.sft.step import enable_gradient_checkpointing, sft_loss


def count(module: torch.nn.Module, skip_embeddings: bool = True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not (skip_embeddings and "embed" in n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="questions per rank per micro-batch")
    parser.add_argument("--seven-b", action="store_true", help="Qwen2-Audio-7B shapes (GPU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--clips", choices=["full", "dcase"], default="full",
                        help="full: every clip fills the window; dcase: 1-30 s, uniform")
    parser.add_argument("--group-by-length", action="store_true", help="micro-batches of similar clip length")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    parser.add_argument("spec", nargs="*", help="TinyQwen2AudioSpec overrides, e.g. hidden_size=128")
    distributed.add_launcher_args(parser)
    args = parser.parse_args(argv)

    info = distributed.init()
    distributed.set_cpu_threads(info)
    precision = resolve_precision("auto", info.device)
    dtype = model_dtype(precision)
    spec = load_config(TinyQwen2AudioSpec, None, (SEVEN_B_SPEC if args.seven_b else []) + args.spec)
    torch.manual_seed(0)
    model, processor = build_tiny_qwen2_audio(spec, seed=0, device=info.device, dtype=dtype)
    if args.seven_b:  # the tiny BPE cannot have 151k merges; the LM head's size is what costs, so match it
        model.resize_token_embeddings(SEVEN_B_VOCAB)
    backbone = Qwen2AudioBackbone(model, processor)
    n_body, n_head = count(model.model.language_model), model.lm_head.weight.numel()
    n_audio = count(model.model.audio_tower) + count(model.model.multi_modal_projector)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    peft_model = apply_lora(backbone, LoraConfig(r=8, alpha=16, dropout=0.05))
    cfg = load_sft_config(None, ["model_path=unused", "data_dir=unused", "output_dir=unused",
                                     f"batch.global_size={args.batch * info.world_size}",
                                     f"batch.micro_size={args.batch}"])
    engine, _, _ = build_engine(peft_model, cfg.deepspeed_config, cfg.batch, cfg.optim, info.world_size, precision,
                                total=args.steps + args.warmup)

    # micro-batches of [B] questions, [B, 128, 100 * chunk_seconds] log-mels: one of full-window clips reused, or 8
    # per rank of DCASE-like lengths (1-30 s, capped at the window) cycled, grouped by length if asked
    rng = np.random.default_rng(info.rank)
    n_micro = 1 if args.clips == "full" else 8
    n_clips = n_micro * args.batch
    seconds = ([float(spec.chunk_seconds)] * n_clips if args.clips == "full"
               else np.minimum(rng.uniform(1.0, 30.0, n_clips), spec.chunk_seconds).tolist())
    examples = [Example(id=f"q{i}", question="Which sound is heard first in the recording?",
                        choices=["dog barking", "car horn", "rain", "speech"], answer_index=i % 4,
                        features=backbone.extract_features(
                            (0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32)))
                for i, s in enumerate(seconds)]
    order = list(range(n_clips))
    if args.group_by_length:
        order = [i for _, i in ShardedSampler(n_clips, seed=0, lengths=seconds, group_size=args.batch)]
    micro = [[examples[i] for i in order[k:k + args.batch]] for k in range(0, n_clips, args.batch)]
    enc_frames = args.batch * (audio_token_count(100 * spec.chunk_seconds) * 2)  # encoder positions before pooling
    sizes = []
    for batch in micro:  # LM tokens (audio included) and answer-target tokens per micro-batch
        collated = backbone.collate(batch)
        sizes.append((int(collated["attention_mask"].sum()), int((collated["labels"][:, 1:] != -100).sum())))
    cursor = [0]

    def step() -> None:  # as train/sft.py: forward (CE on the answer tokens), backward, DeepSpeed's step
        loss = sft_loss(backbone, engine, micro[cursor[0] % len(micro)], info.device, dtype)
        engine.backward(loss)
        engine.step()
        cursor[0] += 1

    for _ in range(args.warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / args.steps
    timed = [sizes[(args.warmup + k) % len(sizes)] for k in range(args.steps)]  # the micro-batches timed
    tokens = sum(t for t, _ in timed) / args.steps
    targets = sum(n for _, n in timed) / args.steps
    flops = 4 * n_body * tokens + 4 * n_head * targets + 2 * n_audio * enc_frames  # per rank per step
    if info.is_main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else float("nan")
        print(f"device={info.device.type} ranks={info.world_size} precision={precision} "
              f"lm_params={(n_body + n_head) / 1e9:.2f}B audio_params={n_audio / 1e9:.2f}B batch={args.batch} "
              f"clips={args.clips} group_by_length={args.group_by_length} "
              f"gradient_checkpointing={args.gradient_checkpointing} tokens_per_rank={tokens:.0f} "
              f"audio_frames={enc_frames}")
        print(f"step_s={dt:.4f} tokens_per_s={tokens * info.world_size / dt:.0f} "
              f"model_tflops_per_rank={flops / dt / 1e12:.1f} mfu={flops / dt / (args.peak_tflops * 1e12):.3f} "
              f"peak_mem_gib={peak:.1f}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
