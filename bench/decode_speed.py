"""Benchmark: the rollout decode step against the memory-bandwidth bound.

    python bench/decode_speed.py [--questions 8] [--generations 6] [--max-new-tokens 16] [--clip-seconds 10]
                                 [--device cpu|cuda] [--dtype float32|bfloat16] [--seven-b]
                                 [--bandwidth-gbs 3350] [--repeats 3] [--no-merge-lora] [--lora-dtype model|float32]
                                 [spec key=value ...]

A random-init Qwen2-Audio (tiny, or ``--seven-b``: Qwen2-Audio-7B's shapes, as ``bench/sft_step.py``) with LoRA
r 8 on every LM linear layer samples G completions for each of B questions, with the eager loop
(``shared_prefix``: a dynamic cache of B*G rows, one Python step per token), with the static engine
(``static_decode``: one cache row per question, a CUDA graph on CUDA; ``static``, the LoRA branch in every
LoRA'd layer) and with the static engine over merged LoRA weights (``merged``: ``grpo.rollout.merge_lora``, one
matmul per LoRA'd layer). A decode step's time is (time for T new tokens - time for 1) / (T - 1): the prefill and
the first draw cancel.

The LoRA weights are cast to the model's dtype (``--lora-dtype model``), as DeepSpeed's bf16 engine casts every
parameter in the recipe; ``--lora-dtype float32`` keeps PEFT's own fp32 adapter weights on a bf16 model (the
LoRA branch then also casts its input and output: two more kernels per LoRA'd layer).

The bound: a decode step must read every weight of the language model and its head once, plus the keys and
values it attends to (the static layout: each question's prompt once, and its G completions' tokens), so it
takes at least ``bytes / bandwidth``. ``--bandwidth-gbs`` is the device's memory bandwidth (H100 SXM: 3350,
H200: 4800). The last line holds ``decode_ms_per_step`` (static), ``bound_ms`` and their ratio, then
``merged_ms_per_step`` and its ratio (unless ``--no-merge-lora``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aqa.backbones import shared_prefix as sp
from aqa.backbones.base import SamplingConfig
from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.backbones.qwen2_audio import Qwen2AudioBackbone, eval_mode, unwrap
from aqa.backbones.qwen2_audio_tiny import (
    SEVEN_B_SPEC,
    SEVEN_B_VOCAB,
    TinyQwen2AudioSpec,
    build_tiny_qwen2_audio,
)
from aqa.backbones.static_decode import StaticDecoder
from aqa.config import load_config
from aqa.data.example import Example


def lm_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter a decode step reads: the language model (LoRA included) and the LM head."""
    hf = unwrap(model)
    params = {id(p): p for p in hf.model.language_model.parameters()}
    params.update({id(p): p for p in hf.get_output_embeddings().parameters()})
    embed = hf.model.language_model.embed_tokens.weight  # a lookup reads B*G rows, not the table
    return sum(p.numel() * p.element_size() for k, p in params.items() if k != id(embed))


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keys and values one cached token holds over all layers."""
    cfg = unwrap(model).config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="B (the recipe's per-device batch)")
    parser.add_argument("--generations", type=int, default=6, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="T (the recipe's)")
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seven-b", action="store_true", help="Qwen2-Audio-7B shapes (GPU, bf16)")
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="device memory bandwidth, GB/s")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine and length (median)")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the eager loop (slow at 7B shapes)")
    parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the static engine over merged LoRA weights (grpo.rollout.merge_lora)")
    parser.add_argument("--lora-dtype", choices=["model", "float32"], default="model",
                        help="LoRA weights in the model's dtype (as the recipe's DeepSpeed bf16) or PEFT's fp32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("spec", nargs="*", help="model size overrides, e.g. hidden_size=4096")
    args = parser.parse_args(argv)
    spec = load_config(TinyQwen2AudioSpec, None, (SEVEN_B_SPEC if args.seven_b else []) + args.spec)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    model, processor = build_tiny_qwen2_audio(spec, 0, device=device, dtype=dtype)
    if args.seven_b:
        model.resize_token_embeddings(SEVEN_B_VOCAB)
    bb = Qwen2AudioBackbone(model, processor)
    apply_lora(bb, LoraConfig(r=8, alpha=16, dropout=0.0))
    if args.lora_dtype == "model":
        bb.model.to(dtype)
    rng = np.random.default_rng(0)
    seconds = min(args.clip_seconds, spec.chunk_seconds)
    examples = [Example(id=f"q{i}", question="Which sound is heard first in the recording?",
                        choices=["dog barking", "car horn", "rain", "speech"], answer_index=0,
                        features=bb.extract_features((0.1 * rng.standard_normal(int(16000 * seconds)))
                                                     .astype(np.float32)))
                for i in range(args.questions)]
    hf = unwrap(bb.model)
    rules = sp.token_rules(bb.tokenizer, hf)
    prompt = bb.generate(bb.model, examples, 1, SamplingConfig(max_new_tokens=1)).prompt  # [B, P], audio
    B, P = prompt.input_ids.shape
    G, T = args.generations, args.max_new_tokens
    decoders = {"static": StaticDecoder(), "merged": StaticDecoder(merge_lora=True), "eager": None}

    def run(engine: str, steps: int) -> tuple[float, int]:
        sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with eval_mode(bb.model), torch.no_grad():
            ids, _ = sp.sample(hf, prompt, G, sampling, rules, decoder=decoders[engine])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, ids.shape[-1]

    ms = {}
    engines = ["static"] + (["merged"] if args.merge_lora else []) + (["eager"] if args.eager else [])
    for engine in engines:
        run(engine, T)  # warm-up: kernel selection, the static cache and (CUDA) the graph capture
        run(engine, 1)
        full = [run(engine, T) for _ in range(args.repeats)]
        one = [run(engine, 1)[0] for _ in range(args.repeats)]
        steps = int(np.median([n for _, n in full]))
        ms[engine] = 1000 * (float(np.median([t for t, _ in full])) - float(np.median(one))) / max(steps - 1, 1)

    weights = lm_bytes(bb.model)
    run_ = decoders["static"]._run
    slots = run_.slots if run_ is not None else P
    kv = kv_bytes_per_token(bb.model, dtype) * B * (slots + G * T / 2)  # the prompt once, half the completions (mean)
    bound_ms = 1000 * (weights + kv) / (args.bandwidth_gbs * 1e9)
    lora_dtype = next(p.dtype for n, p in bb.model.named_parameters() if "lora_A" in n)
    print(f"model: LM + head {weights / 1e9:.2f} GB, {args.device} {args.dtype}, LoRA weights {lora_dtype}; B={B} "
          f"questions x G={G} = {B * G} sequences, prompt {P} tokens ({slots} cache slots), {T} new tokens; KV read "
          f"per step {kv / 1e9:.2f} GB")
    for engine in engines:
        extra = ""
        if engine == "merged":
            merged = decoders["merged"].merged
            extra = f"  ({len(merged.buffers)} merged layers, {merged.nbytes / 1e9:.2f} GB of buffers)"
        print(f"{engine:>6}: decode_ms_per_step={ms[engine]:.2f}{extra}")
    print(f"decode_ms_per_step={ms['static']:.2f} bound_ms={bound_ms:.2f} (at {args.bandwidth_gbs:.0f} GB/s) "
          f"ratio={ms['static'] / bound_ms:.1f}x"
          + (f" merged_ms_per_step={ms['merged']:.2f} merged_ratio={ms['merged'] / bound_ms:.1f}x"
             if args.merge_lora else "")
          + (f" eager_ms_per_step={ms['eager']:.2f}" if args.eager else ""))


if __name__ == "__main__":
    main()
