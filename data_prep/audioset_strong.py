"""AudioSet-Strong annotations rewritten as temporal multiple-choice questions.

    python -m data_prep.audioset_strong --tsv audioset_train_strong.tsv --labels mid_to_display_name.tsv \\
        --audio-root DIR --out data/as_strong [--seed N] [--split train] [--config YAML] [key=value ...]

Per clip: counting, sequencing, duration and frequency questions with three rule-made distractors each
(see ``aqa.data.temporal_qa``). Audio is ``<segment_id>.wav`` or ``.flac`` under ``--audio-root``; a clip
without audio is quarantined with the reason. The same ``--seed`` gives the same questions.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aqa.config import ConfigError
from aqa.data.convert import converter_parser, run_cli
from aqa.data.sources.audioset_strong import convert_audioset_strong
from aqa.data.temporal_qa import load_temporal_qa_config


def main(argv: list[str] | None = None) -> int:
    parser = converter_parser("python -m data_prep.audioset_strong", __doc__)
    parser.add_argument("--tsv", required=True, type=Path, help="strong-label TSV with a header row")
    parser.add_argument("--labels", required=True, type=Path, help="mid_to_display_name.tsv (no header)")
    parser.add_argument("--audio-root", required=True, type=Path, help="folder holding <segment_id>.wav/.flac")
    parser.add_argument("--split", default="train", choices=["train", "dev", "eval"], help="split to write")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--config", default=None, help="YAML (default configs/data/audioset_strong.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. duration_step_s=1.0)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    try:
        cfg = load_temporal_qa_config(args.config, overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_cli(lambda: convert_audioset_strong(
        args.tsv, args.labels, args.audio_root, args.out, cfg, split=args.split, progress=not args.no_progress
    ))


if __name__ == "__main__":
    sys.exit(main())
