"""Score a split with option-letter logits (K option orders) or generate-then-parse.

    python inference/run.py --config configs/qwen2_audio/infer.yaml --split dev|eval [key=value ...]
    python inference/run.py --config ... --split dev,eval                     (several splits, one process)
    deepspeed --num_gpus 8 inference/run.py --config ... --split dev         (or torchrun --nproc_per_node 8)
    python inference/run.py --config ... --split dev --merge                 (outputs from the part files alone)

Each rank scores its shard into <output_dir>/<split>/parts/; the last rank to finish writes predictions.jsonl,
submission.csv and (with answers) metrics.json. A rerun of the same command scores only what no part file
holds. All logic lives in aqa.eval.runner and aqa.eval.predict.
"""

from __future__ import annotations

import argparse
import sys

from aqa.config import help_text, load_config
from aqa.errors import UserError, run_cli
from aqa.eval.predict import InferConfig
from aqa.eval.runner import format_metrics, merge_split, run_inference
from aqa.runtime.distributed import add_launcher_args, launch_info, set_cpu_threads


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(InferConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/qwen2_audio/infer.yaml")
    parser.add_argument("--split", required=True,
                        help="manifest split to score: dev or eval (or train); several, comma-separated (dev,eval), "
                             "are scored one after another by the one model this process loads")
    parser.add_argument("--merge", action="store_true",
                        help="score nothing: merge the part files into the outputs (every question exactly once)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. permutations=8 adapter=DIR")
    add_launcher_args(parser)  # the deepspeed launcher appends --local_rank=N
    args = parser.parse_args(argv)
    cfg = load_config(InferConfig, args.config, args.overrides)

    splits = [s.strip() for s in args.split.split(",")]
    if "" in splits or len(set(splits)) != len(splits):
        raise UserError(f"--split {args.split!r}: name each split once, comma-separated (e.g. dev,eval).")
    if not args.merge:
        info = launch_info()
        set_cpu_threads(info)  # N ranks on one CPU node share its cores
    loaded: dict = {}  # the scoring model, loaded by the first split that has questions left
    summaries = []
    for split in splits:
        summary = merge_split(cfg, split) if args.merge else run_inference(cfg, split, info, loaded)
        report(split, summary)
        summaries.append(summary)
    return summaries[0] if len(summaries) == 1 else {"splits": summaries}


def report(split: str, summary: dict) -> None:
    """What a split's run did, on the terminal: counts, metrics, throughput and the output files."""
    who = f"rank {summary['rank']}/{summary['ranks']}: " if summary.get("ranks", 1) > 1 else ""
    print(f"{who}{split}: scored {summary['scored']}, kept {summary['resumed']} from an earlier run")
    if summary.get("waiting"):
        print(f"{who}shard done; other ranks are still scoring, and the last to finish writes the outputs")
        return
    if summary.get("outside"):
        print(f"left out {summary['outside']} rows of the part files whose ids are not in this split's questions "
              "(an earlier run with a larger limit, or an older manifest)")
    if "metrics" in summary:
        print(format_metrics(summary["metrics"]))
        print(f"metrics: {summary['metrics_path']}")
    if "run" in summary:
        run = summary["run"]
        print(f"{run['scored']} questions on {run['ranks']} rank(s) in {run['wall_s']:.1f} s: "
              f"{run['questions_per_s']} questions/s")
    print(f"predictions: {summary['predictions']}\nsubmission: {summary['submission']}")

if __name__ == "__main__":
    sys.exit(run_cli(main))
