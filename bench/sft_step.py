"""Benchmark: the LoRA SFT step of train/sft.py (DeepSpeed ZeRO-2) on a random-init Qwen2-Audio; tokens/s and MFU.

    python bench/sft_step.py [--steps 5] [--warmup 2] [--batch 1] [--seven-b] [--peak-tflops 989] [spec key=value ...]
    deepspeed --num_gpus N bench/sft_step.py ...          # the same step on N ranks (ZeRO-2 partitions)

No 7B weights exist here, so ``--seven-b`` builds Qwen2-Audio-7B's shapes (32 x 4096 LM, 32 x 1280 Whisper
encoder, 30 s audio window, 156,032-row vocabulary) with random weights, in bf16 on the GPU; other sizes
come from ``aqa.backbones.qwen2_audio_tiny.TinyQwen2AudioSpec`` overrides. One question per rank per micro-batch with a clip of the
full window, LoRA r 8 on every language-model linear layer, the audio tower frozen: exactly
the forward/backward/step of ``train/sft.py``.

MFU counts the model FLOPs a LoRA step needs: 2 N_lm T forward + 2 N_lm T for the activation gradients
(frozen weights get no weight gradient; LoRA's own are negligible) + 2 N_audio T_audio for the frozen encoder's
forward, over the measured step time and ``--peak-tflops`` (H100 SXM dense bf16: 989). Attention-score
FLOPs are left out (a few % at these lengths), so the figure is slightly low.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.backbones.qwen2_audio import Qwen2AudioBackbone, audio_token_count
from aqa.backbones.qwen2_audio_tiny import TinyQwen2AudioSpec, build_tiny_qwen2_audio
from aqa.config import load_config
from aqa.data.example import Example
from aqa.runtime import distributed
from aqa.runtime.engine import build_engine, model_dtype, resolve_precision
from aqa.sft.config import load_sft_config
from aqa.sft.step import sft_loss

SEVEN_B = ["hidden_size=4096", "num_hidden_layers=32", "num_attention_heads=32", "num_key_value_heads=32",
           "intermediate_size=11008", "max_position_embeddings=8192", "audio_d_model=1280", "audio_layers=32",
           "audio_heads=20", "audio_ffn_dim=5120", "chunk_seconds=30"]
SEVEN_B_VOCAB = 156032


def count(module: torch.nn.Module, skip_embeddings: bool = True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not (skip_embeddings and "embed" in n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="questions per rank per micro-batch")
    parser.add_argument("--seven-b", action="store_true", help="Qwen2-Audio-7B shapes (GPU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("spec", nargs="*", help="TinyQwen2AudioSpec overrides, e.g. hidden_size=128")
    distributed.add_launcher_args(parser)
    args = parser.parse_args(argv)

    info = distributed.init()
    distributed.set_cpu_threads(info)
    precision = resolve_precision("auto", info.device)
    dtype = model_dtype(precision)
    spec = load_config(TinyQwen2AudioSpec, None, (SEVEN_B if args.seven_b else []) + args.spec)
    torch.manual_seed(0)
    model, processor = build_tiny_qwen2_audio(spec, seed=0, device=info.device, dtype=dtype)
    if args.seven_b:  # the tiny BPE cannot have 151k merges; the LM head's size is what costs, so match it
        model.resize_token_embeddings(SEVEN_B_VOCAB)
    backbone = Qwen2AudioBackbone(model, processor)
    n_lm = count(model.model.language_model) + model.lm_head.weight.numel()
    n_audio = count(model.model.audio_tower) + count(model.model.multi_modal_projector)
    peft_model = apply_lora(backbone, LoraConfig(r=8, alpha=16, dropout=0.05))
    cfg = load_sft_config(None, ["model_path=unused", "data_dir=unused", "output_dir=unused",
                                     f"batch.global_size={args.batch * info.world_size}",
                                     f"batch.micro_size={args.batch}"])
    engine, _, _ = build_engine(peft_model, cfg.deepspeed_config, cfg.batch, cfg.optim, info.world_size, precision,
                                total=args.steps + args.warmup)

    # one batch of full-window clips, reused every step: [B] questions, [B, 128, 100 * chunk_seconds] log-mels
    rng = np.random.default_rng(info.rank)
    wave_len = 16000 * spec.chunk_seconds
    examples = [Example(id=f"q{i}", question="Which sound is heard first in the recording?",
                        choices=["dog barking", "car horn", "rain", "speech"], answer_index=i % 4,
                        features=backbone.extract_features((0.1 * rng.standard_normal(wave_len)).astype(np.float32)))
                for i in range(args.batch)]
    tokens = int(backbone.collate(examples)["attention_mask"].sum())  # LM tokens, audio tokens included
    enc_frames = args.batch * (audio_token_count(100 * spec.chunk_seconds) * 2)  # encoder positions before pooling
    def step() -> None:  # as train/sft.py: forward (CE on the answer tokens), backward, DeepSpeed's step
        loss = sft_loss(backbone, engine, examples, info.device, dtype)
        engine.backward(loss)
        engine.step()

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
    flops = 4 * n_lm * tokens + 2 * n_audio * enc_frames  # per rank per step
    if info.is_main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else float("nan")
        print(f"device={info.device.type} ranks={info.world_size} precision={precision} "
              f"lm_params={n_lm / 1e9:.2f}B audio_params={n_audio / 1e9:.2f}B tokens_per_rank={tokens} "
              f"audio_frames={enc_frames}")
        print(f"step_s={dt:.4f} tokens_per_s={tokens * info.world_size / dt:.0f} "
              f"model_tflops_per_rank={flops / dt / 1e12:.1f} mfu={flops / dt / (args.peak_tflops * 1e12):.3f} "
              f"peak_mem_gib={peak:.1f}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
