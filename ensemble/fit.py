"""Fit the learnable ensemble on members' dev predictions and apply it to their eval predictions.

    python ensemble/fit.py [--config configs/ensemble.yaml] [--dev A.jsonl B.jsonl ...]
                           [--eval A_eval.jsonl B_eval.jsonl ...] [--names a b ...] [--out DIR] [key=value ...]

Members come from the config unless --dev names them (then --eval and --names, in the same order, replace
the config's too); --out replaces ``out``. key=value overrides reach the rest (``fit.steps=200``).
Writes DIR/ensemble.json, dev.jsonl, eval.jsonl, metrics.json, submission.csv and PNG plots, and prints
the members, the baselines and the fitted ensemble side by side. All logic lives in aqa.ensemble.run.
"""

from __future__ import annotations

import argparse
import re
import sys

from aqa.config import load_config
from aqa.ensemble.run import EnsembleConfig, format_table, members_from_paths, run_ensemble

# A key=value override looks like ``fit.lr=0.1``; a path such as ``runs/x=1.jsonl`` does not (it has a "/").
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    # Overrides are pulled out first: --dev/--eval take any number of files and would swallow them.
    overrides = [a for a in argv if OVERRIDE.match(a)]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ensemble.yaml", help="YAML with members, out and fit settings")
    parser.add_argument("--dev", nargs="+", help="members' dev predictions.jsonl (replace the config's members)")
    parser.add_argument("--eval", nargs="+", help="members' eval predictions.jsonl, in the --dev order")
    parser.add_argument("--names", nargs="+", help="member names, in the --dev order (default: their model field)")
    parser.add_argument("--out", help="output directory (replaces the config's out)")
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    if (args.eval or args.names) and not args.dev:
        parser.error("--eval and --names go with --dev (they replace the config's members).")

    cfg = load_config(EnsembleConfig, args.config, overrides)
    if args.dev:
        cfg.members = members_from_paths(args.dev, args.eval, args.names)
    if args.out:
        cfg.out = args.out

    summary = run_ensemble(cfg)

    print(format_table(summary))
    print(f"\nweights: {', '.join(f'{n}={w:.3f}' for n, w in zip(summary['members'], summary['weights']))}")
    print(f"outputs: {cfg.out}/ (ensemble.json, metrics.json, dev.jsonl"
          + (", eval.jsonl, submission.csv" if summary["eval"] else "; no --eval, so no eval.jsonl or submission")
          + (f", {len(summary['plots'])} plots)" if summary["plots"] else ")"))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError: bad inputs, not bugs
        raise SystemExit(f"ensemble/fit.py: {err}") from None
