"""Option orders, backbone-neutral: K orders per question, permutation averaging in canonical order,
and mean/strict accuracy.

Orders: ``order`` is a permutation of ``range(N)``; presented slot ``j`` (letter ``LETTERS[j]``) shows
canonical option ``order[j]``. Canonical order is the manifest's ``choices`` order.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import torch

from aqa.errors import UserError


class ScoringError(UserError, ValueError):
    """Option letters cannot be scored as configured; the message says what to change."""


def option_orders(n: int, k: int, rng: random.Random) -> list[list[int]]:
    """Up to ``k`` distinct orders of ``n`` options, the canonical order first.

    When ``n!`` <= ``k`` every order is returned once (2 options give 2 orders even if k = 8), so a
    question is never scored twice in the same order.
    """
    if k < 1:
        raise ScoringError(f"permutations must be >= 1, got {k}.")
    identity = list(range(n))
    if math.factorial(n) <= k:
        return [identity] + [list(p) for p in itertools.permutations(range(n)) if list(p) != identity]
    orders, seen = [identity], {tuple(identity)}
    while len(orders) < k:
        perm = identity[:]
        rng.shuffle(perm)
        if tuple(perm) not in seen:
            seen.add(tuple(perm))
            orders.append(perm)
    return orders


def to_canonical(presented: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """Presented-slot logits ``[K, N]`` -> canonical-option logits ``[K, N]`` (``out[k, order[k][j]] = in[k, j]``)."""
    index = torch.as_tensor(orders, dtype=torch.long, device=presented.device)  # [K, N]
    if index.shape != presented.shape:
        raise ScoringError(f"orders {tuple(index.shape)} do not match logits {tuple(presented.shape)}.")
    return torch.empty_like(presented).scatter_(1, index, presented)


def average_log_probs(canonical: torch.Tensor) -> torch.Tensor:
    """Mean over K orders of the per-order log-softmax: ``[K, N]`` -> ``[N]`` (log-probabilities)."""
    return torch.log_softmax(canonical.float(), dim=-1).mean(dim=0)


def order_predictions(canonical: torch.Tensor) -> list[int]:
    """Canonical index chosen under each order: ``[K, N]`` -> K ints."""
    return canonical.argmax(dim=-1).tolist()


def order_accuracy(order_preds: Sequence[int], right: int | set[int]) -> tuple[float, float]:
    """(mean, strict) correctness of one question over its orders: the fraction right, and all right.
    ``right``: the answer's canonical index, or every index holding the answer's text (repeated options)."""
    right = {right} if isinstance(right, int) else right
    hits = [p in right for p in order_preds]
    return sum(hits) / len(hits), float(all(hits))


def row_order_accuracy(row: dict) -> tuple[float, float]:
    """(mean, strict) of one predictions row scored in K orders (its ``order_preds``); every option holding the
    answer's text counts as right (repeated options)."""
    right = {i for i, c in enumerate(row["choices"]) if c == row["answer"]}
    return order_accuracy(row["order_preds"], right)
