"""Training-time dev accuracy: option-letter logits in canonical order, split over ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from aqa.runtime import distributed


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(backbone: Any, model: nn.Module, dataset, batch_size: int, limit: int | None = None,
             progress: bool = False) -> dict[str, float]:
    """Option-logit accuracy on ``dataset`` (canonical option order), split over ranks and summed.

    Every rank must call it. Returns ``accuracy`` (question-weighted), ``arithmetic_mean`` over parts,
    ``acc_<part>`` per part and ``n``.
    """
    from tqdm.auto import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    parts = sorted({dataset.manifest.records[i].part for i in range(n)})
    mine = list(range(distributed.rank(), n, distributed.world_size()))
    hits = torch.zeros(len(parts), dtype=torch.float64)
    counts = torch.zeros(len(parts), dtype=torch.float64)
    for start in tqdm(range(0, len(mine), batch_size), desc="dev", unit="batch", leave=False,
                      disable=not (progress and distributed.is_main())):
        examples = [dataset[i] for i in mine[start : start + batch_size]]
        logits = backbone.option_logits(model, examples)  # per question [1, N], canonical order
        for ex, row in zip(examples, logits):
            p = parts.index(ex.meta["part"])
            counts[p] += 1
            hits[p] += float(int(row[0].argmax()) == ex.answer_index)
    hits, counts = distributed.all_reduce_sum(hits), distributed.all_reduce_sum(counts)
    per_part = {part: float(hits[i] / counts[i]) for i, part in enumerate(parts) if counts[i] > 0}
    out = {"accuracy": float(hits.sum() / counts.sum()) if counts.sum() else float("nan"),
           "arithmetic_mean": sum(per_part.values()) / len(per_part) if per_part else float("nan"),
           "n": int(counts.sum())}
    out.update({f"acc_{part}": acc for part, acc in per_part.items()})
    return out
