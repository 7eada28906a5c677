"""Options and answers as source files write them: letter prefixes stripped, answers matched strictly.

Source answers are matched, never guessed: an answer that names no option stays as written, so the
record is quarantined with "answer not among the choices" instead of silently getting a wrong label.
"""

from __future__ import annotations

import re
from typing import Any

from aqa.data.prompts import LETTERS
from aqa.data.validate import RecordError

# "A. text", "A) text", "(A) text", "A: text". The letter must be followed by punctuation and a space,
# so an option that merely starts with a capital ("A dog") is never cut.
_PREFIX = re.compile(r"^\s*\(?([A-Za-z])(?:\)|[.):])\s+(\S.*)$", re.DOTALL)
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?[.):]?\s*$")


def option_texts(raw: Any, field: str = "choice") -> list[str]:
    """The raw option list as trimmed strings; ``RecordError`` when it is not a list of texts."""
    if not isinstance(raw, list):
        raise RecordError(f"field '{field}' must be a list of option texts, got {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise RecordError(f"option {i + 1} must be text, got {type(item).__name__}")
        out.append(str(item).strip())
    return out


def strip_letter_prefixes(choices: list[str]) -> tuple[list[str], bool]:
    """Drop ``A. `` style prefixes when every option carries its own letter in order (A, B, C, ...).

    Returns ``(texts, stripped)``. Options lettered out of order, or only some of them, are left as they
    are: then the letters are part of the text, not labels.
    """
    matches = [_PREFIX.match(c) for c in choices]
    if not choices or len(choices) > len(LETTERS):
        return list(choices), False
    for i, m in enumerate(matches):
        if m is None or m.group(1).upper() != LETTERS[i]:
            return list(choices), False
    return [m.group(2).strip() for m in matches], True


def match_answer(answer: Any, raw_choices: list[str], choices: list[str]) -> str | None:
    """The option text ``answer`` names, given the options as written and after prefix stripping.

    Accepts the option text (as written or stripped), a bare letter (``B``, ``(B)``, ``B.``), or a
    lettered text (``B. Door``) whose text matches option B. ``None``/empty gives None. Anything else is
    returned as written (trimmed), for validation to quarantine.
    """
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RecordError(f"field 'answer' must be option text, got {type(answer).__name__}")
    text = str(answer).strip()
    if not text:
        return None
    if text in choices:
        return text
    if text in raw_choices:
        return choices[raw_choices.index(text)]
    bare = _BARE_LETTER.match(text)
    if bare:
        idx = LETTERS.index(bare.group(1).upper())
        if idx < len(choices):
            return choices[idx]
    lettered = _PREFIX.match(text)
    if lettered:
        idx = LETTERS.index(lettered.group(1).upper())
        rest = lettered.group(2).strip()
        if idx < len(choices) and rest.casefold() == choices[idx].casefold():
            return choices[idx]
        if rest in choices:
            return rest
    # Case-only differences ("door" vs "Door") are the same answer when exactly one option matches.
    folded = [c for c in choices if c.casefold() == text.casefold()]
    if len(folded) == 1:
        return folded[0]
    return text


def raw_choices_meta(raw: Any, choices: list[str]) -> dict[str, list[str]]:
    """``{"raw_choices": [...]}``: the source's option strings exactly as written, kept beside the cleaned
    ``choices`` when the two differ (letter prefixes, spaces), so a submission can write the official text
    verbatim. Empty when they are the same."""
    verbatim = [str(c) for c in raw] if isinstance(raw, list) else []
    return {"raw_choices": verbatim} if len(verbatim) == len(choices) and verbatim != choices else {}
