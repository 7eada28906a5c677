"""Label training questions by how much they need their audio, from an audio-free inference pass.

    python inference/run.py --config configs/qwen2_audio/infer.yaml --split train audio=silence output_dir=runs/silent
    python -m data_prep.audio_contribution --manifest data/dcase/train.jsonl \\
           --predictions runs/silent/train/predictions.jsonl [--out DIR]

Right without audio -> weak (``train_weak.jsonl``), wrong -> strong (``train_strong.jsonl``), beside the
manifest or in ``--out``; the counts per part go to ``train_audio_contribution.json``. Then, as AudioMCQ's
weak-to-strong recipe: ``train/sft.py ... train_split=train_weak`` and ``train/grpo.py ... train_split=train_strong``.
Logic lives in ``aqa.data.audio_contribution``.
"""

from __future__ import annotations

import argparse
import sys

from aqa.data.audio_contribution import split_by_audio_contribution
from aqa.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the answered split to label, e.g. data/dcase/train.jsonl")
    parser.add_argument("--predictions", required=True, help="predictions.jsonl of an audio=silence|noise pass over it")
    parser.add_argument("--out", default=None, help="output folder (default: beside the manifest)")
    args = parser.parse_args(argv)
    summary = split_by_audio_contribution(args.manifest, args.predictions, args.out)
    print(f"weak (right without audio): {summary['weak']}, strong: {summary['strong']}")
    for part, n in summary["per_part"].items():
        print(f"  {part}: weak {n['weak']}, strong {n['strong']}")
    print(f"wrote {summary['files']['weak']} and {summary['files']['strong']}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
