"""GRPO rewards: a registry of plain callables ``(completion, example) -> float``, weighted by config.

A reward function sees one decoded completion and the ``Example`` it answers (options in the order
the prompt presented them, so letters refer to that order). Add one with ``@reward("name")``; a
config selects and weights them by name (``rewards: {accuracy: 1.0, format: 0.1}``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aqa.data.example import Example
from aqa.rl.answer_parsing import is_bare_answer, parse_answer

RewardFn = Callable[[str, Example], float]
_REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under ``name``."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward '{name}' is registered twice.")
        _REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> RewardFn:
    if name not in _REWARDS:
        raise ValueError(f"unknown reward '{name}'. Known rewards: {', '.join(sorted(_REWARDS))}. "
                         "Fix the 'rewards' mapping in the GRPO config.")
    return _REWARDS[name]


@reward("accuracy")
def accuracy_reward(completion: str, example: Example) -> float:
    """1.0 when the completion names the right option (letter, ``(A)``, ``A.`` or its text), else 0.0."""
    if example.answer_index is None:
        raise ValueError(f"example {example.id!r} has no answer; GRPO needs train records with answers.")
    return float(parse_answer(completion, example.choices) == example.answer_index)


@reward("format")
def format_reward(completion: str, example: Example) -> float:
    """1.0 when the completion is a bare letter answer (``B``, ``(B)``, ``B.``, or ``(B)`` + that option's text)."""
    return float(is_bare_answer(completion, example.choices))


def check_weights(weights: dict[str, float]) -> None:
    """Fail at start on an unknown reward name or an empty/all-zero selection."""
    for name in weights:
        get_reward(name)
    if not any(w != 0 for w in weights.values()):
        raise ValueError("the GRPO config's 'rewards' gives no reward a non-zero weight; set e.g. accuracy: 1.0.")


def compute_rewards(
    texts: list[list[str]], examples: list[Example], weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the selected rewards.

    ``texts[b][g]`` is completion g of question b. Returns the total ``[B, G]`` float32 and each
    reward's unweighted values ``{name: [B, G]}`` for logging.
    """
    check_weights(weights)
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} completion groups for {len(examples)} examples.")
    parts = {
        name: torch.tensor(
            [[get_reward(name)(t, ex) for t in group] for group, ex in zip(texts, examples)], dtype=torch.float32
        )
        for name in weights
    }
    total = sum(weights[name] * values for name, values in parts.items())
    return total, parts
