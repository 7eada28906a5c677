"""Prompt text for a multiple-choice question. Letters are assigned here, after any option shuffling."""

from __future__ import annotations

import string
from dataclasses import dataclass

LETTERS = string.ascii_uppercase  # 26 options at most, which validation enforces


@dataclass
class PromptConfig:
    """How a question and its options become text. Every backbone renders through this."""

    # {question} and {options} are filled in; {options} is one line per option, formatted by option_format.
    template: str = "{question}\n{options}\nAnswer with the option's letter."
    option_format: str = "({letter}) {text}"
    # The SFT target: the letter alone ("{letter}") or with its text ("({letter}) {text}").
    target_format: str = "{letter}"


def letters_for(n: int) -> list[str]:
    """The first ``n`` option letters."""
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"{n} options cannot be lettered: 1 to {len(LETTERS)} are supported.")
    return list(LETTERS[:n])


def render_options(choices: list[str], cfg: PromptConfig) -> str:
    return "\n".join(cfg.option_format.format(letter=L, text=c) for L, c in zip(letters_for(len(choices)), choices))


def render_question(question: str, choices: list[str], cfg: PromptConfig) -> str:
    """The user text: the question and its lettered options, in the order given."""
    return cfg.template.format(question=question.strip(), options=render_options(choices, cfg))


def render_target(choices: list[str], answer_index: int, cfg: PromptConfig) -> str:
    """The assistant text that SFT trains on: the right letter, optionally followed by its text."""
    return cfg.target_format.format(letter=LETTERS[answer_index], text=choices[answer_index])
