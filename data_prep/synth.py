"""The embedded default data set: synthetic soundscapes in the DCASE raw layout, converted to manifests.

    python -m data_prep.synth --out data/demo [--seed N] [--train N --dev N --eval N]
                              [--config configs/data/synth.yaml] [key=value ...]

Writes ``OUT/raw/`` (question JSONs, WAVs, an AudioSet-Strong-style TSV and label map), then
``OUT/<split>.jsonl``, ``OUT/quarantine.jsonl`` and ``OUT/dataset.json`` through the DCASE converter,
and prints a summary of the result. The same seed gives the same bytes.
"""

from __future__ import annotations

import sys
import time

from aqa.config import ConfigError
from aqa.data.convert import ConversionError, converter_parser, run_cli
from aqa.data.summary import summarize
from aqa.data.synth import build, load_synth_config


def main(argv: list[str] | None = None) -> int:
    parser = converter_parser("python -m data_prep.synth", __doc__)
    parser.add_argument("--config", default=None, help="generator YAML (default configs/data/synth.yaml)")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    for split in ("train", "dev", "eval"):
        parser.add_argument(f"--{split}", type=int, default=None, metavar="N", help=f"questions in {split}")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value (e.g. noise_db=-40)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    for split in ("train", "dev", "eval"):
        if getattr(args, split) is not None:
            overrides.append(f"sizes.{split}={getattr(args, split)}")
    try:
        cfg = load_synth_config(args.config, overrides)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def run() -> None:
        start = time.perf_counter()
        try:
            build(args.out, cfg, progress=not args.no_progress)
        except FileExistsError as err:
            raise ConversionError(str(err)) from err
        print(f"built {args.out} in {time.perf_counter() - start:.1f} s (seed {cfg.seed})\n")
        print(summarize(args.out))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
