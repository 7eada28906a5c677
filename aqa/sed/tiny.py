"""A tiny random-init BEATs SED written as a normal SED directory (for tests and the CPU demo).

    python -m aqa.sed.tiny --out DIR --labels mid_to_display_name.tsv [--drop NAME ...] \\
        [--config configs/cascade/beats/tiny.json] [--seed 0]

The sizes come from a BEATs config JSON (``configs/cascade/beats/tiny.json``: 2 layers of width 64, the
real 16x16 patches, so rows are still 160 ms and 8 frequency patches wide); the class count is set from
the label map. The directory is then loaded by exactly the code that loads a converted official checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from aqa.sed.beats import BeatsModel
from aqa.sed.config import BeatsConfig, load_beats_config
from aqa.sed.labels import LabelMap, LabelMapError, read_display_names
from aqa.sed.weights import save_sed_dir

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cascade" / "beats" / "tiny.json"


def build_tiny_beats(cfg: BeatsConfig, num_classes: int, seed: int = 0) -> BeatsModel:
    """A random-init BEATs of ``cfg``'s sizes with a ``num_classes`` predictor (deterministic per seed)."""
    cfg = dataclasses.replace(cfg, finetuned_model=True, predictor_class=num_classes)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return BeatsModel(cfg)
    finally:
        torch.random.set_rng_state(gen_state)  # leave the caller's random stream as it was


def write_tiny_beats(out_dir: str | Path, labels: LabelMap, config: str | Path | BeatsConfig = DEFAULT_CONFIG,
                     seed: int = 0) -> Path:
    """Write a tiny SED directory for ``labels``; returns its path."""
    cfg = config if isinstance(config, BeatsConfig) else load_beats_config(config)
    if len(labels) == 0:
        raise LabelMapError("a SED model needs at least one class; the label map is empty.")
    return save_sed_dir(build_tiny_beats(cfg, len(labels), seed), labels, out_dir)


def labels_from_names(names: dict[str, str], drop: list[str]) -> LabelMap:
    """Classes in the file's order, without those whose MID or display name is in ``drop`` (any case)."""
    dropped = {d.strip().lower() for d in drop}
    return LabelMap.from_pairs([(m, n) for m, n in names.items()
                                if m.lower() not in dropped and n.lower() not in dropped])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random-init BEATs SED directory.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", required=True, help="mid_to_display_name.tsv or class_labels_indices.csv")
    parser.add_argument("--drop", action="append", default=[], help="a display name or MID to leave out (repeatable)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="BEATs config JSON with the tiny sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        labels = labels_from_names(read_display_names(args.labels), args.drop)
        out = write_tiny_beats(args.out, labels, args.config, args.seed)
    except (LabelMapError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote tiny BEATs SED ({len(labels)} classes) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
