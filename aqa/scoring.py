"""Option-letter scoring, backbone-neutral: letter token ids, picking letter logits at the answer
position, option orders, permutation averaging in canonical order, and mean/strict accuracy.

Orders: ``order`` is a permutation of ``range(N)``; presented slot ``j`` (letter ``LETTERS[j]``) shows
canonical option ``order[j]``. Canonical order is the manifest's ``choices`` order.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import torch

from aqa.data.prompts import LETTERS, PromptConfig


class ScoringError(ValueError):
    """Option letters cannot be scored as configured; the message says what to change."""


def answer_lead(cfg: PromptConfig) -> str:
    """The part of ``target_format`` before the letter: appended to the assistant start when scoring."""
    if "{letter}" not in cfg.target_format:
        raise ScoringError(
            f"prompt.target_format {cfg.target_format!r} has no {{letter}}: option-logit scoring reads the "
            "letter's logit. Use a format such as '{letter}' or '{letter}. {text}'."
        )
    return cfg.target_format.split("{letter}", 1)[0]


def letter_token_ids(encode: Callable[[str], list[int]], prefix: str, n_letters: int = len(LETTERS)) -> list[int]:
    """Token id of each letter ``A..`` as it appears right after ``prefix`` (the assistant start + lead).

    ``encode`` maps text to ids without adding special tokens. Each letter must add exactly one token
    to ``prefix`` and leave the prefix's own tokens unchanged (no merge across the boundary), and the
    ids must differ; otherwise the letter's logit would not be the answer's probability, so this fails.
    Returns ``[n_letters]`` ids.
    """
    base = encode(prefix)
    ids = []
    for letter in LETTERS[:n_letters]:
        full = encode(prefix + letter)
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise ScoringError(
                f"option letter {letter!r} is not a single token after {prefix[-30:]!r} (it encodes as "
                f"{full[len(base) - 1:]} after {base[-1:]}): the tokenizer merges it with its neighbours. Use a "
                "prompt.target_format that starts the answer with the bare letter, such as '{letter}'."
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ScoringError(f"option letters share token ids {ids}; this tokenizer cannot score letters.")
    return ids


def gather_letter_logits(logits: torch.Tensor, positions: torch.Tensor, letter_ids: torch.Tensor) -> torch.Tensor:
    """Letter logits at each row's answer position.

    logits ``[R, T, V]``, positions ``[R]`` (index of the token whose next-token logits are read),
    letter_ids ``[L]`` -> ``[R, L]`` float32.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_answer = logits[rows, positions.to(logits.device)]  # [R, V]
    return at_answer[:, letter_ids.to(logits.device)].float()


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


def order_accuracy(order_preds: Sequence[int], answer_index: int) -> tuple[float, float]:
    """(mean, strict) correctness of one question over its orders: the fraction right, and all right."""
    hits = [p == answer_index for p in order_preds]
    return sum(hits) / len(hits), float(all(hits))
