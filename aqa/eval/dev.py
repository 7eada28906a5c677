"""Training-time dev accuracy: option-letter logits in canonical order, split over ranks, scored by the same
:func:`~aqa.eval.metrics.accuracy_by_part` that inference writes into ``metrics.json``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from aqa.eval.metrics import accuracy_by_part
from aqa.runtime import distributed


@torch.no_grad()
def evaluate(backbone: Any, model: nn.Module, dataset, batch_size: int, limit: int | None = None,
             progress: bool = False) -> dict[str, float]:
    """Option-logit accuracy on ``dataset`` (a ``QADataset`` in canonical option order); each rank scores
    every ``world_size``-th question and the rows are gathered, so every rank returns the same numbers.

    Every rank must call it. Returns ``accuracy`` (question-weighted), ``arithmetic_mean`` over parts,
    ``acc_<part>`` per part and ``n``.
    """
    from tqdm.auto import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(distributed.rank(), n, distributed.world_size()))
    rows: list[str] = []  # one JSON row per question: {"part", "correct", "answer"}
    for start in tqdm(range(0, len(mine), batch_size), desc="dev", unit="batch", leave=False,
                      disable=not (progress and distributed.is_main())):
        examples = [dataset[i] for i in mine[start : start + batch_size]]
        logits = backbone.option_logits(model, examples)  # per question [1, N], canonical order
        for ex, row in zip(examples, logits):
            # by text, as inference scores: a repeated option holding the answer's text is right too
            correct = float(ex.choices[int(row[0].argmax())] == ex.choices[ex.answer_index])
            rows.append(json.dumps({"part": ex.meta["part"], "correct": correct, "answer": ex.answer_index}))
    gathered = [json.loads(r) for rank_rows in distributed.all_gather_strings(rows) for r in rank_rows]
    acc = accuracy_by_part(gathered, correct_key="correct")
    nan = float("nan")
    out = {"accuracy": acc["weighted_mean"] if acc["n"] else nan,
           "arithmetic_mean": acc["arithmetic_mean"] if acc["n"] else nan, "n": acc["n"]}
    out.update({f"acc_{part}": value for part, value in acc["per_part"].items()})
    return out
