"""Benchmark: option-logit scoring against generate-then-parse, and K option orders against one.

    python bench/infer_speed.py [--config configs/demo/qwen2_audio_infer.yaml] [--questions 64] [--k 8]
                                [--batch-size N] [--device cpu|cuda] [--dtype float32|bfloat16] [spec key=value ...]

A random-init Qwen2-Audio of ``aqa.backbones.qwen2_audio_tiny.TinyQwen2AudioSpec`` sizes (override any, e.g. a 7B shape on a
GPU: hidden_size=4096 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=32
intermediate_size=11008 audio_d_model=1280 audio_layers=32 audio_heads=20 audio_ffn_dim=5120
chunk_seconds=30) scores the same questions three ways, in the config's batch size:
option logits with K=1, option logits with K orders (prefix shared), and greedy generation of
``max_new_tokens`` followed by answer parsing. A random model never says <|im_end|>, so generation
runs the full budget, as a verbose real answer would. The last line holds both ratios:
``logits_vs_generate`` (questions/s; target >= 5) and ``k{K}_vs_k1_time`` (target <= 2).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from aqa.backbones.qwen2_audio import Qwen2AudioBackbone
from aqa.backbones.qwen2_audio_tiny import TinyQwen2AudioSpec, build_tiny_qwen2_audio
from aqa.config import load_config
from aqa.data.example import Example
from aqa.eval.orders import option_orders
from aqa.eval.predict import InferConfig
from aqa.rl.answer_parsing import parse_answer

WORDS = ["dog bark", "siren", "rain", "church bell", "humpback whale", "door knock", "car horn", "thunder"]


def make_examples(bb: Qwen2AudioBackbone, n: int, seed: int) -> list[Example]:
    """``n`` questions with 4 options over 2-5 s noise clips (features extracted up front, as the cache would)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in tqdm(range(n), desc="features", leave=False):
        wave = (rng.standard_normal(int(16000 * rng.uniform(2, 5))) * 0.1).astype(np.float32)
        choices = list(rng.choice(WORDS, size=4, replace=False))
        out.append(Example(id=f"q{i}", question="Which sound is heard first in the recording?", choices=choices,
                           answer_index=0, features=bb.extract_features(wave)))
    return out


def timed(fn, batches, device: torch.device) -> float:
    """Seconds for ``fn`` over every batch. Callers warm every mode up first (see ``main``): the first
    call with a new sequence length pays one-off kernel selection, which is not scoring speed."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/qwen2_audio_infer.yaml",
                        help="inference YAML: batch_size, max_new_tokens and prompt are taken from it")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="questions per batch (default: the config's)")
    parser.add_argument("--k", type=int, default=8, help="option orders compared against one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 keeps timings stable on a machine shared with other jobs")
    parser.add_argument("spec", nargs="*", help="model size overrides, e.g. hidden_size=4096")
    args = parser.parse_args(argv)
    cfg = load_config(InferConfig, args.config, [f"batch_size={args.batch_size}"] if args.batch_size else [])
    spec = load_config(TinyQwen2AudioSpec, None, args.spec)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    model, processor = build_tiny_qwen2_audio(spec, args.seed, device=device, dtype=getattr(torch, args.dtype))
    bb = Qwen2AudioBackbone(model, processor, cfg.prompt)
    examples = make_examples(bb, args.questions, args.seed)
    batches = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params, {args.device} {args.dtype}, {args.questions} questions, "
          f"batch {cfg.batch_size}, generate {cfg.max_new_tokens} new tokens")

    def logits(batch, k):
        orders = [option_orders(len(ex.choices), k, random.Random(ex.id)) for ex in batch]
        return bb.option_logits(bb.model, batch, orders)

    def generate(batch):
        texts = bb.generate_answers(bb.model, batch, cfg.max_new_tokens)
        return [parse_answer(t, ex.choices) for t, ex in zip(texts, batch)]

    modes = {"k1": lambda b: logits(b, 1), "kn": lambda b: logits(b, args.k), "gen": generate}
    for fn in tqdm(modes.values(), desc="warm-up", leave=False):
        timed(fn, batches, device)
    t1 = timed(modes["k1"], batches, device)
    tk = timed(modes["kn"], batches, device)
    tg = timed(modes["gen"], batches, device)
    n = len(examples)
    print(f"option logits K=1:      {n / t1:8.1f} questions/s")
    print(f"option logits K={args.k}:      {n / tk:8.1f} questions/s (prefix shared)")
    print(f"generate-then-parse:    {n / tg:8.1f} questions/s")
    print(f"logits_vs_generate={tg / t1:.2f}x (target >= 5)  k{args.k}_vs_k1_time={tk / t1:.2f}x (target <= 2)")


if __name__ == "__main__":
    main()
