"""Tiny random-init models written as normal checkpoint directories, for tests and the CPU demo.

    python -m aqa.tiny NAME --out DIR [--seed N] [key=value ...]

A tiny model is not a special code path: its backbone writes it with the files a real checkpoint has
and loads it with exactly the code that loads the 7B; only its sizes differ. NAME is any registered
backbone that has a tiny writer (``Backbone.tiny_spec`` / ``Backbone.write_tiny``); the ``key=value``
overrides are fields of its spec dataclass (e.g. ``hidden_size=128``) and may come anywhere after NAME,
before or after the options.
"""

from __future__ import annotations

import argparse

from aqa.backbones import backbones
from aqa.config import load_config


def main(argv: list[str] | None = None) -> None:
    writers = {name: cls for name, cls in backbones().items() if cls.tiny_spec() is not None}
    parser = argparse.ArgumentParser(description="Write a tiny random-init model as a HF directory.")
    parser.add_argument("backbone", choices=sorted(writers))
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="spec overrides, e.g. hidden_size=128")
    # intermixed: overrides may follow --out/--seed (plain parse_args leaves them unrecognized there)
    args = parser.parse_intermixed_args(argv)
    backbone = writers[args.backbone]
    spec = load_config(backbone.tiny_spec(), None, args.overrides)
    out = backbone.write_tiny(args.out, seed=args.seed, spec=spec)
    print(f"wrote tiny {args.backbone} to {out}")


if __name__ == "__main__":
    main()
