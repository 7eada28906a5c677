"""The names-and-shapes check of a model against a checkpoint, shared by every checker.

A checker builds each part of its model on the meta device (no memory, no weights read), lists its
``state_dict`` names and shapes with :func:`module_shapes`, and returns one :class:`PartCheck` per part
against the checkpoint's names and shapes. :func:`report` turns the parts into the lines
``python -m aqa.check_checkpoint`` prints. A backbone offers its checker through
``Backbone.checkpoint_checker()``; BEATs (not a backbone) has one in ``aqa.sed.check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Shapes = dict[str, list[int]]


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


@dataclass(frozen=True)
class CheckpointChecker:
    """A model's checkpoint check: ``check(config_path, index_path)`` returns its parts.

    ``config_optional``: the check can take the config from the index itself, so ``config_path`` may be
    None; otherwise the CLI asks for ``--config`` before calling it.
    """

    check: Callable[[Path | None, Path], list[PartCheck]]
    config_optional: bool = False


def module_shapes(module, prefix: str = "") -> Shapes:
    """``state_dict`` names (with ``prefix``) -> shapes of a module (meta tensors are fine)."""
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def report(parts: list[PartCheck]) -> tuple[bool, list[str]]:
    """(all parts ok, the report lines: each part's, then a verdict naming the parts that fail)."""
    lines = [line for part in parts for line in part.report()]
    ok = all(p.ok for p in parts)
    lines.append("all checks passed" if ok else
                 f"FAILED: {', '.join(p.part for p in parts if not p.ok)} do not match the checkpoint")
    return ok, lines
