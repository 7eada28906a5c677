"""Option-letter scores of K option orders per question, the prompt prefix the orders share run once.

The K prompts of a question (one per option order) agree up to the options: system turn, audio or
events, question. :func:`shared_prefix_scores` runs that common prefix once per question, expands its
KV cache to one row per order (``cache.reorder_cache``), runs the K differing suffixes from it with
positions continuing after each question's own prefix, and reads the answer position of each row.
:func:`full_scores` runs every prompt in full, the reference the shared path must equal.

The algorithm is written once here; a backbone says, through :class:`OptionScorer`, how its rows are
compared, cut and padded, how its decoder runs on a prefix and on suffixes (or full rows), and how
letters are read from hidden states. Rows are backbone-private (token lists for the chat LMs,
two-stream rows for Kimi-Audio); batches are whatever ``pad`` returns.

Shapes: B questions, R = sum of orders over questions, P prefix / S suffix / T full positions,
H hidden size, L scores read per row (26 letters).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

# A module import, not ``from aqa.eval.orders import ...``: aqa.eval.orders imports aqa.backbones.letters,
# which loads this package first when orders is imported first; the name is then looked up at call time.
from aqa.eval import orders as eval_orders

Row = TypeVar("Row")


def common_prefix_len(rows: Sequence[Sequence[Hashable]]) -> int:
    """Length of the longest prefix all ``rows`` share."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


@dataclass(frozen=True)
class OptionScorer(Generic[Row]):
    """How one backbone's rows are handled by :func:`shared_prefix_scores` and :func:`full_scores`.

    ``tokens(row)``: what two rows must agree on at a position for it to be shared (``len(row)`` long).
    ``cut(row, start, end)``: the row's positions ``[start, end)``.
    ``pad(rows)``: ``(batch, attention_mask [N, T])`` of N rows, right-padded, the mask on the CPU.
    Masks, positions and ``index`` reach the callables below on the CPU; they move what they use.
    ``prefill(batch, mask)``: run the B prefixes (one per question, inputs given once per question such
    as audio features included) with ``use_cache``; returns the KV cache of B rows.
    ``extend(batch, mask, position_ids, cache, index)``: run R rows and return hidden states ``[R, T, H]``.
    ``index`` ``[R]`` is each row's question. With a cache (R suffixes): ``mask`` ``[R, P + S]`` covers the
    prefix too and ``position_ids`` ``[R, S]`` continue after it. Without (R full rows): ``position_ids``
    is None and per-question inputs go with the rows.
    ``read(hidden, positions)``: hidden ``[R, T, H]`` and one position per row ``[R]`` -> scores ``[R, L]``.
    ``check(prefixes, suffixes)``: raise ValueError when the split put something on the wrong side
    (audio placeholders in the suffixes, continuous audio in the prefix); None checks nothing.
    """

    tokens: Callable[[Row], Sequence[Hashable]]
    cut: Callable[[Row, int, int], Row]
    pad: Callable[[list[Row]], tuple[Any, torch.Tensor]]
    prefill: Callable[[Any, torch.Tensor], Any]
    extend: Callable[[Any, torch.Tensor, torch.Tensor | None, Any, torch.Tensor], torch.Tensor]
    read: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    check: Callable[[list[Row], list[Row]], None] | None = None


def _question_index(rows: list[list[Row]]) -> torch.Tensor:
    """``[R]``: the question of each row, rows in question-major order."""
    return torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(q) for q in rows]))


def full_scores(scorer: OptionScorer[Row], rows: list[list[Row]]) -> torch.Tensor:
    """Every row in full. ``rows[b][k]``: question b's prompt in order k, ending at the answer position.
    Returns scores ``[R, L]``, rows in question-major order."""
    batch, mask = scorer.pad([r for q in rows for r in q])
    hidden = scorer.extend(batch, mask, None, None, _question_index(rows))
    return scorer.read(hidden, mask.sum(1) - 1)


def shared_prefix_scores(scorer: OptionScorer[Row], rows: list[list[Row]], device: torch.device | str) -> torch.Tensor:
    """The prefix common to a question's rows once, its K suffixes from the expanded KV cache.

    ``rows[b][k]`` as for :func:`full_scores`; the cache lives on ``device``. Returns scores ``[R, L]``,
    equal to :func:`full_scores`' up to float rounding.
    """
    # every row keeps at least one suffix token: its answer position is read from the suffix pass
    split = [min(common_prefix_len([scorer.tokens(r) for r in q]), min(len(r) for r in q) - 1) for q in rows]
    prefixes = [scorer.cut(q[0], 0, s) for q, s in zip(rows, split)]
    suffixes = [scorer.cut(r, s, len(r)) for q, s in zip(rows, split) for r in q]
    if scorer.check is not None:
        scorer.check(prefixes, suffixes)
    # 1) prefixes [B, P], right-padded: pad rows still see real tokens before them, so no query row is
    #    fully masked (which would put NaN into the cache)
    p_batch, p_mask = scorer.pad(prefixes)
    cache = scorer.prefill(p_batch, p_mask)
    # 2) the cache expanded to one row per order: [B, ...] -> [R, ...]
    index = _question_index(rows)
    cache.reorder_cache(index.to(device))
    # 3) suffixes [R, S]; positions continue from each question's own prefix length
    s_batch, s_mask = scorer.pad(suffixes)
    start = torch.tensor(split)[index]  # [R]
    positions = start[:, None] + torch.arange(s_mask.shape[1])[None, :]  # [R, S]
    mask = torch.cat([p_mask[index], s_mask], dim=1)  # [R, P + S]
    hidden = scorer.extend(s_batch, mask, positions, cache, index)
    return scorer.read(hidden, s_mask.sum(1) - 1)


def option_scores(scorer: OptionScorer[Row], rows: list[list[Row]], device: torch.device | str,
                  share_prefix: bool = True) -> torch.Tensor:
    """Scores ``[R, L]`` of ``rows`` (as for :func:`full_scores`): the prefix shared when asked and some
    question has more than one order (with one order per question there is nothing to share)."""
    if share_prefix and any(len(q) > 1 for q in rows):
        return shared_prefix_scores(scorer, rows, device)
    return full_scores(scorer, rows)


def canonical_per_question(presented: torch.Tensor, orders: list[list[list[int]]],
                           num_choices: list[int]) -> list[torch.Tensor]:
    """Scores ``[R, L]`` of presented letter slots (rows question-major, ``orders[b]`` the K_b orders of
    question b, which has ``num_choices[b]`` options) -> per question ``[K_b, N_b]`` in canonical option
    order, on the CPU."""
    out, r = [], 0
    for ords, n in zip(orders, num_choices):
        block = presented[r : r + len(ords), :n]  # [K, N] in presented slots
        out.append(eval_orders.to_canonical(block, ords).cpu())
        r += len(ords)
    return out
