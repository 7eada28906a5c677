"""Benchmark: inference/run.py over large manifests: resident memory, throughput over the run, two ranks.

    python bench/infer_scale.py [--small 1000] [--large 20000] [--clips 200] [--speed-questions 20000]
                                [--batch-size 32] [--permutations 1] [spec key=value ...]

Builds a synthetic manifest of N questions over a few hundred short clips (questions reuse clips, as in real
sets; every clip lasts the same 1 s, so every part of the run does the same work) and scores it with a tiny
random-init Qwen2-Audio (``SMALLER`` than the tests' ``TinyQwen2AudioSpec``, 1 s audio window; override any
size) through the real command, ``python inference/run.py``, with the feature cache on:

- resident memory: the peak RSS of the whole process (``wait4``) over ``--small`` and over ``--large``
  questions; the target is the large run within 10 % of the small one;
- questions/s over the first and the last quarter of the large run, from the rows its part file gains (the
  parent counts them every 50 ms); the target is the last quarter within 10 % of the first;
- on CPU, ``torchrun --nproc_per_node 2`` against one process over ``--speed-questions`` questions, the
  scoring span (first row to last row) of each; each run uses every core (1 rank x 2 threads, 2 x 1).

The last line holds ``rss_large_vs_small=`` (target <= 1.10), ``qps_last_vs_first_quarter=`` (target
0.90-1.10) and ``speedup_2_ranks=``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from aqa.backbones.qwen2_audio_tiny import TinyQwen2AudioSpec, write_tiny_qwen2_audio
from aqa.config import load_config
from aqa.data.manifest import Record, write_dataset_info, write_jsonl
from aqa.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
# smaller than the test models (about 150 questions/s on 2 CPU cores), so 20k questions take a few minutes
SMALLER = ["chunk_seconds=1", "hidden_size=32", "num_hidden_layers=1", "intermediate_size=64", "num_attention_heads=2",
           "num_key_value_heads=1", "audio_d_model=32", "audio_layers=1", "audio_heads=2", "audio_ffn_dim=64"]
CONFIG = "configs/demo/qwen2_audio_infer.yaml"
WORDS = ["dog bark", "siren", "rain", "church bell", "humpback whale", "door knock", "car horn", "thunder"]
QUESTIONS = ["Which sound is heard first in the recording?", "Which sound is the loudest in this clip?",
             "Which of these sounds does the recording hold?", "What is the last sound that can be heard?"]


def write_data(root: Path, clips: int, sizes: list[int], seed: int) -> None:
    """``clips`` 1 s clips and one manifest ``q<N>.jsonl`` per size; question i asks about clip i % clips."""
    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True)
    t = np.arange(16000) / 16000
    for c in range(clips):
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(audio / f"clip{c:04d}.wav", wave.astype(np.float32), 16000, subtype="PCM_16")
    for n in sizes:
        def records(n=n):
            for i in range(n):
                choices = [WORDS[(i + k) % len(WORDS)] for k in range(4)]
                yield Record(id=f"q{i:06d}", part=("bqa", "tsqa", "cqa")[i % 3], split="dev",
                             audio=f"clip{i % clips:04d}.wav", question=QUESTIONS[i % len(QUESTIONS)],
                             choices=choices, answer=choices[i % 4])
        write_jsonl(root / f"q{n}.jsonl", records())
    write_dataset_info(root, audio)


class Watch:
    """Rows appended to the part files of one output dir, counted every 50 ms: ``(time, total rows)``."""

    def __init__(self, out: Path):
        self.parts = out / "dev" / "parts"
        self.seen: dict[Path, int] = {}
        self.rows = 0
        self.samples: list[tuple[float, int]] = []

    def poll(self) -> None:
        for path in self.parts.glob("part-*.jsonl") if self.parts.is_dir() else []:
            size = path.stat().st_size
            start = self.seen.get(path, 0)
            if size > start:
                with path.open("rb") as fh:
                    fh.seek(start)
                    self.rows += fh.read(size - start).count(b"\n")
                self.seen[path] = size
        if not self.samples or self.samples[-1][1] != self.rows:
            self.samples.append((time.perf_counter(), self.rows))

    def time_at(self, rows: int) -> float:
        """When the count first reached ``rows``."""
        return next(t for t, n in self.samples if n >= rows)


def run(cmd: list[str], out: Path, env: dict[str, str]) -> tuple[Watch, float, int]:
    """Run ``cmd``, watching ``out``'s part files; returns the watch, the wall seconds and the peak RSS (MiB) of
    the command's own process (for a launcher, of the launcher)."""
    watch = Watch(out)
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: this child's own peak RSS
            watch.poll()
            if pid:
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return watch, wall, usage.ru_maxrss // 1024  # KiB on Linux


def infer(args: list[str], *, ranks: int = 1) -> list[str]:
    script = ["inference/run.py", "--config", CONFIG, "--split", "dev", *args]
    if ranks == 1:
        return [sys.executable, *script]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), *script]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000, help="questions of the small run (memory baseline)")
    parser.add_argument("--large", type=int, default=20000, help="questions of the large run")
    parser.add_argument("--clips", type=int, default=200, help="distinct clips the questions reuse")
    parser.add_argument("--speed-questions", type=int, default=20000, help="questions of the 1- vs 2-rank runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--permutations", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("spec", nargs="*", help="tiny model size overrides, e.g. hidden_size=128")
    args = parser.parse_args(argv)
    spec = load_config(TinyQwen2AudioSpec, None, [*SMALLER, *args.spec])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = sorted({args.small, args.large, args.speed_questions})
        write_data(root / "data", args.clips, sizes, args.seed)
        model = write_tiny_qwen2_audio(root / "model", seed=args.seed, spec=spec)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("OMP_NUM_THREADS", None)  # each run splits the cores between its ranks

        def common(n: int, out: Path) -> list[str]:
            (root / "data" / "dev.jsonl").unlink(missing_ok=True)
            (root / "data" / "dev.jsonl").symlink_to(root / "data" / f"q{n}.jsonl")
            return [f"model_path={model}", "adapter=null", f"data_dir={root / 'data'}", f"output_dir={out}",
                    f"cache_dir={root / 'cache'}", f"batch_size={args.batch_size}",
                    f"permutations={args.permutations}", "progress=false", "device=cpu"]

        results = {}
        for name, n, ranks in tqdm([("small", args.small, 1), ("large", args.large, 1),
                                    ("speed_1", args.speed_questions, 1), ("speed_2", args.speed_questions, 2)],
                                   desc="runs", unit="run"):
            out = root / name
            watch, wall, rss = run(infer(common(n, out), ranks=ranks), out, env)
            assert watch.rows == n, (name, watch.rows, n)
            results[name] = (watch, wall, rss, n)

    small, large = results["small"], results["large"]
    watch, n = large[0], large[3]
    q = n // 4
    t1, c1 = next((t, c) for t, c in watch.samples if c > 0)  # the first batch written: scoring has begun
    first = per_second(q - c1, watch.time_at(q) - t1)
    last = per_second(n - 3 * q, watch.time_at(n) - watch.time_at(3 * q))
    spans = {}
    for name in ("speed_1", "speed_2"):
        w = results[name][0]
        t1, c1 = next((t, c) for t, c in w.samples if c > 0)
        done_after_first = results[name][3] - c1  # rows written after the first poll that saw any
        spans[name] = (w.time_at(results[name][3]) - t1) * results[name][3] / done_after_first \
            if done_after_first > 0 else float("nan")
    if not all(math.isfinite(x) and x > 0 for x in (first, last, *spans.values())):
        print("note: a run was too short for the 50 ms polling to time its quarters (nan below); raise --large "
              "and --speed-questions")
    print(f"tiny Qwen2-Audio, {args.clips} clips of 1 s, batch {args.batch_size}, K={args.permutations}, CPU")
    print(f"peak RSS: {small[2]} MiB at {args.small} questions, {large[2]} MiB at {args.large} questions")
    print(f"{args.large} questions in {large[1]:.1f} s: {first:.1f} questions/s over the first quarter, "
          f"{last:.1f} over the last")
    print(f"{args.speed_questions} questions: 1 rank {spans['speed_1']:.1f} s, 2 ranks {spans['speed_2']:.1f} s "
          f"(scoring span; whole commands {results['speed_1'][1]:.1f} s and {results['speed_2'][1]:.1f} s)")
    print(f"rss_large_vs_small={large[2] / small[2]:.3f} (target <= 1.10)  "
          f"qps_last_vs_first_quarter={ratio(last, first):.3f} (target 0.90-1.10)  "
          f"speedup_2_ranks={ratio(spans['speed_1'], spans['speed_2']):.2f}")


def per_second(rows: int, seconds: float) -> float:
    """Rows per second, nan when the polling saw the span as one instant."""
    return rows / seconds if seconds > 0 else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


if __name__ == "__main__":
    main()
