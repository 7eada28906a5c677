"""GRPO rewards: accuracy by letter forms and option text, format, weighting; garbage scores 0."""

import pytest
import torch

from aqa.data.example import Example
from aqa.rl.rewards import compute_rewards, get_reward

CHOICES = ["a dog barking", "rain", "a car horn", "dog"]


@pytest.mark.parametrize(
    "text,reward",
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("(B) rain", 1.0),
        ("rain", 1.0),
        ("Rain.", 1.0),
        ("The answer is (B).", 1.0),
        ("I hear rain falling.", 1.0),
        ("A", 0.0),
        ("(C) a car horn", 0.0),
        ("a car horn", 0.0),
    ],
)
def test_accuracy_by_letter_forms_and_option_text(text, reward):
    assert get_reward("accuracy")(text, _ex(1)) == reward


@pytest.mark.parametrize("text", ["", "   ", "zxq!!", "E", "(F)", "<|AUDIO|><|AUDIO|>", "rain or a car horn"])
def test_garbage_scores_zero(text):
    assert get_reward("accuracy")(text, _ex(1)) == 0.0
    assert get_reward("format")(text, _ex(1)) == 0.0


def test_format_reward_wants_the_answer_alone():
    fmt = get_reward("format")
    assert fmt("B", _ex(1)) == 1.0 and fmt("(C) a car horn", _ex(1)) == 1.0
    assert fmt("The answer is B", _ex(1)) == 0.0
    assert fmt("(C) rain", _ex(1)) == 0.0  # letter and text disagree


def _ex(answer_index):
    return Example(id="q", question="What?", choices=CHOICES, answer_index=answer_index)


def test_accuracy_reward():
    acc = get_reward("accuracy")
    assert acc("(B)", _ex(1)) == 1.0
    assert acc("A", _ex(1)) == 0.0
    assert acc("garbage ###", _ex(1)) == 0.0
    with pytest.raises(ValueError, match="no answer"):
        acc("B", _ex(None))


def test_compute_rewards_weighted():
    texts = [["B", "The answer is B", "nonsense"], ["(A) a dog barking", "rain", "C"]]
    examples = [_ex(1), _ex(0)]
    total, parts = compute_rewards(texts, examples, {"accuracy": 1.0, "format": 0.5})
    assert torch.equal(parts["accuracy"], torch.tensor([[1.0, 1, 0], [1, 0, 0]]))
    assert torch.equal(parts["format"], torch.tensor([[1.0, 0, 0], [1, 0, 1]]))
    assert torch.allclose(total, torch.tensor([[1.5, 1.0, 0.0], [1.5, 0.0, 0.5]]))


def test_unknown_or_empty_rewards_fail_with_the_fix():
    with pytest.raises(ValueError, match="Known rewards"):
        compute_rewards([["A"]], [_ex(0)], {"acuracy": 1.0})
    with pytest.raises(ValueError, match="non-zero weight"):
        compute_rewards([["A"]], [_ex(0)], {"accuracy": 0.0})
