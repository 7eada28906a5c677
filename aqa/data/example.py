"""The unit every backbone consumes: a question with its options in presented order and its features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Example:
    """A question as a backbone sees it: options in the order they are presented."""

    id: str
    question: str
    choices: list[str]  # presented order (after any shuffling)
    answer_index: int | None  # index into ``choices``; None when unknown (eval split)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # from ``extract_features`` (cached)
    meta: dict[str, Any] = field(default_factory=dict)  # record meta (e.g. SED events for text backbones)
