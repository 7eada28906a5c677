"""Check that a backbone built from a config has exactly a checkpoint's tensor names and shapes.

    python -m aqa.check_checkpoint --backbone kimi_audio --config CONFIG.json --index PARAMS.json

The model is built on the meta device (no memory, no weights read) and its ``state_dict`` is
compared with the index: a names-and-shapes listing (``{"model": {name: shape}, ...}``) or a
release's ``model.safetensors.index.json`` (shapes then come from the shard headers beside it).
Every part of the backbone prints ``matched N/M``; any missing, unexpected or misshapen tensor is
named and the exit status is 1.

The checkers are the backbones' own (``Backbone.checkpoint_checker()``, for those that have one) plus
BEATs', the cascade's sound event detector, which is not a backbone and is named here. The shared
machinery (``PartCheck``, ``module_shapes``, the report) is ``aqa.backbones.checkpoint_check``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aqa.backbones import backbones
from aqa.backbones.checkpoint_check import CheckpointChecker, report
from aqa.sed.check import CHECKER as BEATS_CHECKER


def checkers() -> dict[str, CheckpointChecker]:
    """Every checkpoint checker by the name ``--backbone`` takes: the backbones' and BEATs'."""
    found = {name: c for name, cls in backbones().items() if (c := cls.checkpoint_checker()) is not None}
    return {**found, "beats": BEATS_CHECKER}


def get_checker(name: str) -> CheckpointChecker:
    known = checkers()
    if name not in known:
        raise SystemExit(f"no checkpoint checker for backbone '{name}'. Known: {', '.join(sorted(known))}.")
    return known[name]


def run_check(backbone: str, config: str | Path | None, index: str | Path) -> tuple[bool, list[str]]:
    """Run the backbone's checker; returns (all parts ok, report lines)."""
    return report(get_checker(backbone).check(None if config is None else Path(config), Path(index)))


def main(argv: list[str] | None = None) -> int:
    known = checkers()
    config_optional = sorted(name for name, c in known.items() if c.config_optional)
    parser = argparse.ArgumentParser(description="Compare a backbone's tensor names/shapes with a checkpoint index.")
    parser.add_argument("--backbone", required=True, help=f"one of: {', '.join(sorted(known))}")
    parser.add_argument("--config", default=None,
                        help=f"the checkpoint's config.json (optional for {', '.join(config_optional)})")
    parser.add_argument("--index", required=True,
                        help="names/shapes JSON (as in tests/fixtures/) or a release's model.safetensors.index.json")
    args = parser.parse_args(argv)
    if args.config is None and args.backbone not in config_optional:
        print(f"error: --config is required for {args.backbone}", file=sys.stderr)
        return 2
    for path in (args.config, args.index):
        if path is not None and not Path(path).exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    ok, lines = run_check(args.backbone, args.config, args.index)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
