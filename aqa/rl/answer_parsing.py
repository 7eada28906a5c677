"""Map free generated text to one of a question's options: by its letter, else by the option's text.

Shared by generate-mode inference and the GRPO rewards. Pure string work, no model.
"""

from __future__ import annotations

import re
import unicodedata

from aqa.data.prompts import LETTERS

# "A. text" / "(A) text" / "A) text" prefixes that some sources and models put before an option
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])[\).:]\s+")


def normalize(text: str) -> str:
    """Lower-case, accents folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def strip_letter_prefix(option: str) -> str:
    """``"B. Humpback whale"`` -> ``"Humpback whale"``; text without such a prefix is returned unchanged."""
    return _LETTER_PREFIX.sub("", option, count=1)


def _letter_index(text: str, n: int) -> int | None:
    letters = LETTERS[:n]
    s = text.strip()
    patterns = [
        rf"^\(?([{letters}])\)?[\s.:,)]*$",  # the whole answer is a letter: "B", "(B)", "B."
        rf"^\(([{letters}])\)",  # "(B) dog"
        rf"^([{letters}])[).:](?:\s|$)",  # "B) dog", "B. dog", "B: dog"
        # "The answer is B", "Answer: (B)", "option B": the cue word in any case; an upper-case letter anywhere,
        # a lower-case one only when nothing but punctuation follows ("the answer is c."), so that
        # "the answer is a dog" is read by its option text, not as option A.
        rf"(?i:\banswer)\s*(?i:is|:)?\s*:?\s*\(?([{letters}])\b\)?",
        rf"(?i:\boption)\s*\(?([{letters}])\b\)?",
        rf"(?i:\banswer\s*(?:is|:)?\s*:?\s*\(?([{letters}])\)?[\s.!,;]*)$",
        rf"(?i:\boption\s*\(?([{letters}])\)?[\s.!,;]*)$",
    ]
    for pattern in patterns:
        m = re.search(pattern, s)
        if m:
            return letters.index(m.group(1).upper())
    return None


def _text_index(text: str, choices: list[str]) -> int | None:
    said = f" {normalize(text)} "
    found = []
    for i, choice in enumerate(choices):
        option = normalize(strip_letter_prefix(choice))
        if option and f" {option} " in said:
            found.append((len(option), i))
    if not found:
        return None
    found.sort(reverse=True)
    # "dog bark" beats "dog" when both appear because the longer one contains the shorter
    longest, index = found[0]
    rivals = [i for length, i in found[1:] if normalize(strip_letter_prefix(choices[i])) not in
              normalize(strip_letter_prefix(choices[index]))]
    return None if rivals else index


def parse_answer(text: str, choices: list[str]) -> int | None:
    """Index of the option that ``text`` names, or None when it names none or several.

    A letter (``B``, ``(B)``, ``B.``, ``answer: B``) wins over option text; option text is matched
    whole-word after normalisation, ignoring an ``"A. "`` prefix on either side.
    """
    if not text or not text.strip():
        return None
    index = _letter_index(text, len(choices))
    if index is not None:
        return index
    return _text_index(strip_letter_prefix(text), choices)


def is_bare_answer(text: str, choices: list[str]) -> bool:
    """True when ``text`` is an answer and nothing else: ``B``, ``(B)``, ``B.``, or the letter followed by
    exactly that option's text (``(B) dog``, ``B. dog``). Used to reward well-formed completions."""
    letters = LETTERS[: len(choices)]
    s = text.strip()
    if re.fullmatch(rf"\(?[{letters}]\)?\.?", s):
        return True
    m = re.fullmatch(rf"(?:\(([{letters}])\)|([{letters}])[.:)])\s+(.+?)\.?", s, flags=re.DOTALL)
    if not m:
        return False
    index = letters.index(m.group(1) or m.group(2))
    return normalize(m.group(3)) == normalize(strip_letter_prefix(choices[index]))
