"""Check that a backbone built from a config has exactly a checkpoint's tensor names and shapes.

    python -m aqa.check_checkpoint --backbone kimi_audio --config CONFIG.json --index PARAMS.json

The model is built on the meta device (no memory, no weights read) and its ``state_dict`` is
compared with the index: a names-and-shapes listing (``{"model": {name: shape}, ...}``) or a
release's ``model.safetensors.index.json`` (shapes then come from the shard headers beside it).
Every part of the backbone prints ``matched N/M``; any missing, unexpected or misshapen tensor is
named and the exit status is 1.

Each backbone registers a checker here: ``CHECKERS[name] = "module:function"``, where the function
takes ``(config_path, index_path)`` and returns a list of :class:`PartCheck`. Checkers are imported
only when asked for, so adding one costs nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Shapes = dict[str, list[int]]

# backbone name -> "module:function" returning list[PartCheck]
CHECKERS: dict[str, str] = {
    "kimi_audio": "aqa.backbones.kimi_audio.checkpoint:check_release",
    "beats": "aqa.sed.check:check_beats",
}
# checkers that can take the config from the index itself (its cfg), so --config may be left out
CONFIG_OPTIONAL = {"beats"}


@dataclass
class PartCheck:
    """One part of a backbone (LM, audio encoder, tokenizer) against its checkpoint tensors.

    ``built``: names/shapes of our module. ``index``: what the checkpoint holds. ``unused``: checkpoint
    names we deliberately do not load (matched by ``is_unused``), reported with ``unused_reason``.
    """

    part: str
    built: Shapes
    index: Shapes
    is_unused: Callable[[str], bool] = lambda name: False
    unused_reason: str = ""
    unused: list[str] = field(init=False)
    missing: list[str] = field(init=False)
    unexpected: list[str] = field(init=False)
    misshapen: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.unused = sorted(n for n in self.index if n not in self.built and self.is_unused(n))
        self.missing = sorted(n for n in self.built if n not in self.index)
        self.unexpected = sorted(n for n in self.index if n not in self.built and not self.is_unused(n))
        self.misshapen = sorted(n for n in self.built if n in self.index
                                and list(self.index[n]) != list(self.built[n]))

    @property
    def matched(self) -> int:
        return sum(1 for n in self.built if n in self.index and list(self.index[n]) == list(self.built[n]))

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshapen)

    def report(self) -> list[str]:
        head = f"{self.part}: matched {self.matched}/{len(self.built)}"
        if self.unused:
            head += f" ({len(self.unused)} {self.unused_reason})"
        lines = [head]
        lines += [f"  MISSING    {n} {self.built[n]} (the model needs it; the checkpoint lacks it)" for n in self.missing]
        lines += [f"  UNEXPECTED {n} {self.index[n]} (in the checkpoint; the model has no such tensor)"
                  for n in self.unexpected]
        lines += [f"  MISSHAPEN  {n}: checkpoint {self.index[n]} vs model {self.built[n]}" for n in self.misshapen]
        return lines


def module_shapes(module, prefix: str = "") -> Shapes:
    """``state_dict`` names (with ``prefix``) -> shapes of a module (meta tensors are fine)."""
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def get_checker(name: str) -> Callable[[Path, Path], list[PartCheck]]:
    if name not in CHECKERS:
        raise SystemExit(f"no checkpoint checker for backbone '{name}'. Known: {', '.join(sorted(CHECKERS))}.")
    module, _, func = CHECKERS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def run_check(backbone: str, config: str | Path | None, index: str | Path) -> tuple[bool, list[str]]:
    """Run the backbone's checker; returns (all parts ok, report lines)."""
    parts = get_checker(backbone)(None if config is None else Path(config), Path(index))
    lines = [line for part in parts for line in part.report()]
    ok = all(p.ok for p in parts)
    lines.append("all checks passed" if ok else
                 f"FAILED: {', '.join(p.part for p in parts if not p.ok)} do not match the checkpoint")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare a backbone's tensor names/shapes with a checkpoint index.")
    parser.add_argument("--backbone", required=True, help=f"one of: {', '.join(sorted(CHECKERS))}")
    parser.add_argument("--config", default=None,
                        help=f"the checkpoint's config.json (optional for {', '.join(sorted(CONFIG_OPTIONAL))})")
    parser.add_argument("--index", required=True,
                        help="names/shapes JSON (as in tests/fixtures/) or a release's model.safetensors.index.json")
    args = parser.parse_args(argv)
    if args.config is None and args.backbone not in CONFIG_OPTIONAL:
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
