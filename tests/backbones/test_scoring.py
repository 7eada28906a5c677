"""Option-letter scoring: the right position and letter tokens, canonical-order averaging, and the
prefix-shared path equal to scoring every order in full."""

import random

import numpy as np
import pytest
import torch

from aqa.backbones import get_backbone
from aqa.backbones.letters import gather_letter_logits
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig
from aqa.eval.orders import (
    ScoringError,
    average_log_probs,
    option_orders,
    order_accuracy,
    order_predictions,
    to_canonical,
)
from tests.helpers import audio_example, noise


@pytest.fixture()
def backbone(tiny):
    return get_backbone("qwen2_audio").from_pretrained(tiny.shared("qwen2_audio", seed=1))


def _examples(bb):
    rng = np.random.default_rng(0)
    specs = [("Which animal calls?", ["dog", "cat", "cow", "owl"], 2.0),
             ("How many calls?", ["1", "2", "3"], 3.5),
             ("Is there rain in the recording at all?", ["Yes", "No"], 1.2)]
    return [audio_example(bb, i, noise(s, rng), c, 0, q) for i, (q, c, s) in enumerate(specs)]


def test_gather_reads_the_given_position_and_letter_ids():
    logits = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)  # [R, T, V]
    got = gather_letter_logits(logits, torch.tensor([3, 1]), torch.tensor([6, 0, 2]))
    assert got.tolist() == [[logits[0, 3, 6], logits[0, 3, 0], logits[0, 3, 2]],
                            [logits[1, 1, 6], logits[1, 1, 0], logits[1, 1, 2]]]


def test_letter_ids_are_the_single_letter_tokens(backbone):
    ids = backbone.letter_ids().tolist()
    assert ids == backbone.tokenizer.convert_tokens_to_ids(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    # "(A" is one BPE token in this vocabulary, so a "({letter}) ..." target cannot be scored by letter
    backbone.prompt = PromptConfig(target_format="({letter}) {text}")
    backbone._letter_ids = None
    with pytest.raises(ScoringError, match="not a single token"):
        backbone.letter_ids()
    backbone.prompt = PromptConfig(target_format="{text}")
    with pytest.raises(ScoringError, match="no \\{letter\\}"):
        backbone.letter_ids()


def test_option_logits_come_from_the_set_letter_logits_in_canonical_order(backbone):
    """The LM head is replaced so every position's logits are a known vector: letter j gets 10 + j."""
    hidden = backbone.model.config.text_config.hidden_size
    vocab = backbone.model.config.text_config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    bias = torch.full((vocab,), -50.0)
    letters = backbone.letter_ids()
    bias[letters] = 10.0 + torch.arange(len(letters), dtype=torch.float32)
    head.bias.data = bias
    backbone.model.lm_head = head
    ex = _examples(backbone)[0]
    orders = [[0, 1, 2, 3], [2, 0, 3, 1]]
    got = backbone.option_logits(backbone.model, [ex], [orders])[0]  # [K, N] canonical
    # order [2, 0, 3, 1]: slot A shows option 2, B option 0, C option 3, D option 1
    assert got.tolist() == [[10, 11, 12, 13], [11, 13, 10, 12]]


def test_option_logits_are_the_next_token_logits_after_the_assistant_start(backbone):
    """Same numbers as a plain forward over the processor's own inputs, read at the last position."""
    wave = noise(2.5, 5)  # 40,000 samples
    ex = Example(id="q", question="How many calls?", choices=["1", "2", "3"], answer_index=0,
                 features=backbone.extract_features(wave))
    inputs = backbone.processor(text=backbone._chat_prefix(ex, ex.choices), audio=wave, return_tensors="pt")
    with torch.no_grad():
        logits = backbone.model(**inputs).logits  # [1, T, V]
    want = logits[0, -1, backbone.letter_ids()[:3]]
    wrong_position = logits[0, -2, backbone.letter_ids()[:3]]
    got = backbone.option_logits(backbone.model, [ex])[0][0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, wrong_position, atol=1e-3)


def test_prefix_shared_scoring_equals_scoring_every_order_in_full(backbone):
    examples = _examples(backbone)
    orders = [option_orders(len(ex.choices), 6, random.Random(i)) for i, ex in enumerate(examples)]
    assert [len(o) for o in orders] == [6, 6, 2]
    calls = []
    backbone.model.model.audio_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    shared = backbone.option_logits(backbone.model, examples, orders, share_prefix=True)
    assert calls == [3]  # the audio ran once per question, not once per order
    full = backbone.option_logits(backbone.model, examples, orders, share_prefix=False)
    assert calls == [3, 14]
    for s, f, ex in zip(shared, full, examples):
        assert s.shape == (len(orders[examples.index(ex)]), len(ex.choices))
        torch.testing.assert_close(s, f, atol=1e-5, rtol=1e-5)
    # and a question scored alone gets the same numbers as inside a padded batch
    alone = backbone.option_logits(backbone.model, examples[2:], orders[2:])[0]
    torch.testing.assert_close(alone, shared[2], atol=1e-5, rtol=1e-5)


def test_permutation_averaging_returns_to_canonical_order():
    # canonical option c has score c (0..3); presented slot j of order k shows option orders[k][j]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]]
    presented = torch.tensor([[float(o) for o in order] for order in orders])
    canonical = to_canonical(presented, orders)
    assert canonical.tolist() == [[0, 1, 2, 3]] * 3
    avg = average_log_probs(canonical)
    torch.testing.assert_close(avg, torch.log_softmax(torch.tensor([0.0, 1, 2, 3]), -1))
    # different per-order beliefs average in log-prob space
    two = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    want = (torch.log_softmax(two[0], -1) + torch.log_softmax(two[1], -1)) / 2
    torch.testing.assert_close(average_log_probs(two), want)
    with pytest.raises(ScoringError):
        to_canonical(torch.zeros(2, 3), [[0, 1, 2]])


def test_option_orders_and_order_accuracy():
    orders = option_orders(4, 8, random.Random(0))
    assert orders[0] == [0, 1, 2, 3] and len({tuple(o) for o in orders}) == 8
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert option_orders(4, 8, random.Random(0)) == orders  # seeded
    assert sorted(option_orders(2, 8, random.Random(0))) == [[0, 1], [1, 0]]  # 2! < 8: each order once
    assert len(option_orders(3, 6, random.Random(0))) == 6
    assert option_orders(3, 1, random.Random(0)) == [[0, 1, 2]]
    with pytest.raises(ScoringError):
        option_orders(3, 0, random.Random(0))
    canonical = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [0.0, 5.0, 0.0]])
    assert order_predictions(canonical) == [1, 2, 1]
    assert order_accuracy([1, 2, 1], 1) == (2 / 3, 0.0)
    assert order_accuracy([1, 1], 1) == (1.0, 1.0)
