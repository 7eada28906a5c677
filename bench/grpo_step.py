"""Benchmark: one GRPO step with the shared prefix against the naive (r1-aqa) layout, same model and batch.

    python bench/grpo_step.py [--questions 8] [--generations 6] [--max-new-tokens 8] [--steps 3]
                              [--device cpu|cuda] [--dtype float32|bfloat16] [--seven-b] [--no-memory]
                              [--lora-dtype model|float32] [--no-merge-lora] [--update-chunk N]
                              [--layouts naive static ...] [spec key=value ...]

A random-init Qwen2-Audio of ``aqa.backbones.qwen2_audio_tiny.TinyQwen2AudioSpec`` sizes (override any, e.g. a 7B shape on a
GPU: hidden_size=4096 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=32
intermediate_size=11008 audio_d_model=1280 audio_layers=32 audio_heads=20 audio_ffn_dim=5120
chunk_seconds=30) with LoRA runs the same GRPO step both ways: sample G completions, rewards,
advantages, reference log-probs (adapter disabled), policy log-probs, loss, backward, optimizer step.

- naive: the prompt and its audio repeated G times for generation, the reference and the policy;
- shared: one prefill per question, its KV cache expanded to G, the eager decode loop
  (``aqa/backbones/shared_prefix.py``);
- static: shared, sampled by the static rollout engine (``aqa/backbones/static_decode.py``: one cache row per
  question, one step for all G, a CUDA graph on CUDA), what ``train/grpo.py`` runs;
- merged: static over merged LoRA weights (``grpo.rollout.merge_lora``: the buffers refreshed in place before
  each rollout, one matmul per LoRA'd layer; the reference and the policy log-probs through the unmerged model,
  as in every layout). ``--no-merge-lora`` leaves it out.

``--update-chunk N`` scores and trains the shared, static and merged layouts in chunks of N questions, as
``batch.update_chunk`` does in the recipe (the naive layout stays whole, as r1-aqa runs it): the memory of the
policy pass is a chunk's. ``--layouts`` runs a subset, e.g. ``--layouts static`` at the report's batch, where
the naive layout does not fit.

``--seven-b`` builds Qwen2-Audio-7B's shapes (as ``bench/sft_step.py``; use a GPU, bf16). A random model rarely
says <|im_end|>, so completions run (nearly) the full token budget in every layout. Peak memory is taken for
each layout in its own process (CUDA: allocated; CPU: resident set growth; ``--no-memory`` skips it); times
are medians of steps that alternate between the layouts in one process. Per layout it prints the step time,
its phase split (sampling / reference log-probs / policy forward + backward + optimizer step) and the sampling
time per new token; the last line holds ``speedup=X.XX`` (naive / static; target >= 3), the shared layout's and
``merged_speedup`` (naive / merged).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

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
from aqa.rl.advantages import group_advantages
from aqa.rl.loss import grpo_loss
from aqa.rl.rewards import compute_rewards

WORDS = ["dog bark", "siren", "rain", "church bell", "humpback whale", "door knock", "car horn", "thunder"]


def make_examples(bb: Qwen2AudioBackbone, n: int, seed: int, seconds: tuple[float, float]) -> list[Example]:
    """``n`` questions with 4 options over noise clips of ``seconds`` (min, max) length (features extracted up
    front, as the cache would). Qwen2-Audio gives 25 audio tokens per second of clip."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        wave = (rng.standard_normal(int(16000 * rng.uniform(*seconds))) * 0.1).astype(np.float32)
        choices = list(rng.choice(WORDS, size=4, replace=False))
        out.append(Example(id=f"q{i}", question="Which sound is heard first in the recording?", choices=choices,
                           answer_index=int(rng.integers(4)), features=bb.extract_features(wave)))
    return out


class PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or resident set size sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    def _watch(self, base: int) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - base)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._thread = threading.Thread(target=self._watch, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


LAYOUTS = ("naive", "shared", "static", "merged")
PHASES = ("sample", "reference", "update")


def grpo_step(bb: Qwen2AudioBackbone, optimizer: torch.optim.Optimizer, examples: list[Example],
              prompt: sp.PromptBatch, G: int, sampling: SamplingConfig, layout: str, seed: int,
              decoders: dict[str, StaticDecoder], device: torch.device, chunk: int | None = None) -> dict[str, float]:
    """One full GRPO step in ``layout``; returns seconds per phase and the new tokens sampled. ``prompt`` is
    encoded once up front for every layout (tokenizing is not what differs). ``chunk``: questions per
    reference and policy pass outside the naive layout (None: all)."""
    hf = unwrap(bb.model)
    rules = sp.token_rules(bb.tokenizer, hf)
    logprobs_fn = sp.naive_completion_logprobs if layout == "naive" else sp.completion_logprobs
    clock = Clock(device)
    torch.manual_seed(seed)  # the same samples in the naive and shared layouts
    with eval_mode(bb.model):
        if layout == "naive":
            ids, mask = sp.naive_sample(hf, prompt, G, sampling, rules)  # [B, G, T]
        else:
            ids, mask = sp.sample(hf, prompt, G, sampling, rules, decoder=decoders.get(layout))  # shared: eager loop
    sample_s = clock.lap()
    texts = [bb.tokenizer.batch_decode(g, skip_special_tokens=True) for g in ids.cpu()]
    rewards, _ = compute_rewards(texts, examples, {"accuracy": 1.0})  # [B, G]
    adv = group_advantages(rewards, eps=1e-4)
    clock.lap()
    B = ids.shape[0]
    size = B if layout == "naive" or not chunk else chunk
    parts = [slice(s, min(s + size, B)) for s in range(0, B, size)]

    def logprobs(rows: slice) -> torch.Tensor:  # [b, G, T] for questions rows
        return logprobs_fn(hf, prompt.rows(rows.start, rows.stop), ids[rows], mask[rows])

    with torch.no_grad(), bb.model.disable_adapter():  # the reference: same weights, adapter off
        ref = torch.cat([logprobs(rows) for rows in parts])
    reference_s = clock.lap()
    for rows in parts:  # equal chunks (or one): the mean of their losses is the batch's
        loss, _ = grpo_loss(logprobs(rows), None, ref[rows], adv.values[rows], mask[rows], epsilon=0.2, beta=0.1)
        (loss / len(parts)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"sample": sample_s, "reference": reference_s, "update": clock.lap(), "tokens": ids.shape[-1]}


class Clock:
    """Seconds between laps, the device synchronized at each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        dt, self.last = now - self.last, now
        return dt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="B: questions per step (the report's batch)")
    parser.add_argument("--generations", type=int, default=6, help="G: completions per question")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (after one warm-up each)")
    parser.add_argument("--clip-seconds", type=float, nargs=2, default=[2.0, 5.0], metavar=("MIN", "MAX"),
                        help="clip lengths (the tiny model's window is 5 s; DCASE clips run to 30 s)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 keeps timings stable on a machine shared with other jobs")
    parser.add_argument("--seven-b", action="store_true", help="Qwen2-Audio-7B shapes (GPU, bf16)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-layout peak-memory processes")
    parser.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the static layout over merged LoRA weights (grpo.rollout.merge_lora)")
    parser.add_argument("--lora-dtype", choices=["model", "float32"], default="model",
                        help="the LoRA weights' dtype: the model's, as under DeepSpeed (default), or PEFT's own fp32")
    parser.add_argument("--update-chunk", type=int, default=None,
                        help="questions per reference and policy pass outside the naive layout, as batch.update_chunk "
                             "(must divide --questions; default: all at once)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                        help="the layouts to run (speedups need naive and static)")
    parser.add_argument("--memory-of", choices=LAYOUTS, help=argparse.SUPPRESS)  # internal: a child
    parser.add_argument("spec", nargs="*", help="model size overrides, e.g. hidden_size=4096")
    args = parser.parse_args(argv)
    spec = load_config(TinyQwen2AudioSpec, None, (SEVEN_B_SPEC if args.seven_b else []) + args.spec)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    layouts = tuple(x for x in LAYOUTS if x in args.layouts and (args.merge_lora or x != "merged"))
    if args.update_chunk is not None and (args.update_chunk < 1 or args.questions % args.update_chunk):
        parser.error(f"--update-chunk must divide --questions ({args.questions}): the chunks' mean loss is the batch's "
                     "only when they hold as many questions")

    # -- peak memory: each layout in its own process first, so one's freed memory cannot hide the other's
    #    peak (and, on a GPU, this process holds no model meanwhile)
    peaks = {layout: float("nan") for layout in layouts}
    if args.memory_of is None and not args.no_memory:
        for layout in layouts:
            child = subprocess.run([sys.executable, __file__, "--memory-of", layout,
                                    *(argv if argv is not None else sys.argv[1:])],
                                   check=True, stdout=subprocess.PIPE, text=True)
            peaks[layout] = json.loads(child.stdout.strip().splitlines()[-1])["peak"]

    model, processor = build_tiny_qwen2_audio(spec, args.seed, device=device, dtype=getattr(torch, args.dtype))
    if args.seven_b:  # the tiny BPE cannot have 151k merges; the LM head's size is what costs, so match it
        model.resize_token_embeddings(SEVEN_B_VOCAB)
    bb = Qwen2AudioBackbone(model, processor)
    apply_lora(bb, LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0))
    if args.lora_dtype == "model":  # as DeepSpeed's bf16 engine casts every parameter in the recipe
        bb.model.to(getattr(torch, args.dtype))
    bb.model.train()
    optimizer = torch.optim.AdamW([p for p in bb.model.parameters() if p.requires_grad], lr=1e-6)
    examples = make_examples(bb, args.questions, args.seed, tuple(args.clip_seconds))
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    prompt = bb.generate(bb.model, examples, 2, SamplingConfig(max_new_tokens=1)).prompt  # [B, P], audio

    # kept across steps, as the recipe's rollout engine keeps its decoder
    decoders = {"static": StaticDecoder(), "merged": StaticDecoder(merge_lora=True)}

    def step(layout: str, i: int) -> Callable[[], dict[str, float]]:
        return lambda: grpo_step(bb, optimizer, examples, prompt, args.generations, sampling, layout,
                                 args.seed + i, decoders, device, args.update_chunk)

    if args.memory_of is not None:  # the child: a warm-up step and one more, under the memory watch
        with PeakMemory(device) as mem:
            step(args.memory_of, -1)()
            step(args.memory_of, 0)()
        print(json.dumps({"peak": mem.peak}))
        return

    # -- time: one warm-up each (one-off kernel selection and graph capture are not step time), then the
    #    layouts alternate step by step, so load from other jobs on a shared machine falls on all alike; medians
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.device} {args.dtype}; "
          f"B={args.questions} questions, G={args.generations}, prompt {prompt.input_ids.shape[1]} tokens "
          f"(audio included), {args.max_new_tokens} new tokens"
          + (f"; reference and policy passes in chunks of {args.update_chunk}" if args.update_chunk else ""))
    runs: dict[str, list[dict[str, float]]] = {layout: [] for layout in layouts}
    for layout in layouts:
        step(layout, -1)()
    for i in tqdm(range(args.steps), desc="steps", leave=False):
        for layout in layouts:
            runs[layout].append(step(layout, i)())
    sec = {}
    for layout in layouts:
        med = {k: float(np.median([r[k] for r in runs[layout]])) for k in (*PHASES, "tokens")}
        sec[layout] = float(np.median([sum(r[k] for k in PHASES) for r in runs[layout]]))
        split = " ".join(f"{k}={med[k]:.3f}s ({med[k] / sec[layout]:.0%})" for k in PHASES)
        print(f"{layout:>6}: {sec[layout]:8.3f} s/step  {split}  sample_ms_per_token="
              f"{1000 * med['sample'] / max(med['tokens'], 1):.2f}  " + memory_text(peaks[layout]))
    print(summary(args.generations, sec, peaks))


def summary(G: int, sec: dict[str, float], peaks: dict[str, float]) -> str:
    """The last line: the speedups over the naive layout of the layouts that ran, and the peak-memory ratio."""
    if "naive" not in sec or "static" not in sec:
        return f"grpo_step G={G}: " + " ".join(f"{k}={v:.3f}s" for k, v in sec.items()) + " (speedups need the naive " \
            "and static layouts)"
    ratio = "not measured" if math.isnan(peaks["naive"]) else f"{peaks['naive'] / max(peaks['static'], 1):.2f}x"
    return (f"grpo_step G={G}: naive/static peak memory={ratio}"
            + (f" shared_speedup={sec['naive'] / sec['shared']:.2f}" if "shared" in sec else "")
            + f" speedup={sec['naive'] / sec['static']:.2f}"
            + (f" merged_speedup={sec['naive'] / sec['merged']:.2f}" if "merged" in sec else ""))


def memory_text(peak: float) -> str:
    """A layout's peak memory growth, or that it was not measured (``--no-memory``: NaN)."""
    return "peak memory not measured (--no-memory)" if math.isnan(peak) else f"peak memory +{peak / 2**20:8.1f} MiB"


if __name__ == "__main__":
    main()
