"""Score a split with option-letter logits (K option orders) or generate-then-parse.

    python inference/run.py --config configs/qwen2_audio/infer.yaml --split dev|eval [key=value ...]

Writes <output_dir>/<split>/predictions.jsonl, submission.csv and (with answers) metrics.json; a rerun
skips questions already scored. All logic lives in aqa.eval.predict.
"""

from __future__ import annotations

import argparse
import sys

from aqa.config import help_text, load_config
from aqa.errors import run_cli
from aqa.eval.predict import InferConfig, format_metrics, run_inference


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(InferConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/qwen2_audio/infer.yaml")
    parser.add_argument("--split", required=True, help="manifest split to score: dev or eval (or train)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. permutations=8 adapter=DIR")
    args = parser.parse_args(argv)
    cfg = load_config(InferConfig, args.config, args.overrides)

    summary = run_inference(cfg, args.split)

    print(f"{args.split}: scored {summary['scored']}, kept {summary['resumed']} from an earlier run")
    if "metrics" in summary:
        print(format_metrics(summary["metrics"]))
        print(f"metrics: {summary['metrics_path']}")
    print(f"predictions: {summary['predictions']}\nsubmission: {summary['submission']}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
