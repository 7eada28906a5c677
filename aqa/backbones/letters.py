"""Option letters for every chat LM: the answer lead, letter token ids and the letter logits at the
answer position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aqa.data.prompts import LETTERS, PromptConfig
from aqa.eval.orders import ScoringError


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
