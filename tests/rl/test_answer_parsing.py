"""Free text -> option index: letters first, then whole-word option text."""

import pytest

from aqa.rl.answer_parsing import is_bare_answer, normalize, parse_answer, strip_letter_prefix

CHOICES = ["dog bark", "dog", "siren", "A. rain"]


@pytest.mark.parametrize("text, index", [
    ("B", 1), ("(C)", 2), ("C.", 2), ("D) rain", 3), ("(B) dog", 1), ("The answer is c", 2),
    ("Answer: (D)", 3), ("option B", 1), ("B: dog", 1),
    ("A dog bark", 0),  # "A" followed by a word is an article: the text decides, the longer option wins
    ("the answer is a dog", 1), ("The answer is a siren.", 2), ("option c!", 2),
    ("a siren", 2), ("It sounds like rain.", 3), ("Dog!", 1),
    ("", None), ("nothing here", None), ("dog bark and siren", None), ("E", None),
])
def test_parse_answer(text, index):
    assert parse_answer(text, CHOICES) == index


def test_bare_answers_and_helpers():
    assert is_bare_answer("B", CHOICES) and is_bare_answer("(B)", CHOICES) and is_bare_answer("B.", CHOICES)
    assert is_bare_answer("(B) dog", CHOICES) and is_bare_answer("D. rain", CHOICES)
    assert not is_bare_answer("(B) siren", CHOICES)  # letter and text disagree
    assert not is_bare_answer("B is the answer", CHOICES) and not is_bare_answer("E", CHOICES)
    assert strip_letter_prefix("B. Humpback whale") == "Humpback whale"
    assert strip_letter_prefix("Bowhead") == "Bowhead"
    assert normalize("  Café,  NOISE! ") == "cafe noise"
