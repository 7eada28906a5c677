"""Kimi-Audio's two-stream prompt against the official layout (kimi_audio_io_example.json), the text
tokenizer (tiktoken format), and the SFT collate on a tiny release."""

import json
from pathlib import Path

import pytest
import torch

from aqa.backbones import get_backbone
from aqa.backbones.kimi_audio.config import load_kimi_config
from aqa.backbones.kimi_audio.processor import SpecialIds, inference_prompt, training_sample
from aqa.backbones.kimi_audio.text_tokenizer import KimiTextTokenizer, byte_pair_merge, train_byte_bpe
from aqa.data.prompts import PromptConfig
from tests.helpers import FIXTURES, audio_example, noise

EXAMPLE = FIXTURES / "kimi_audio_io_example.json"

# The example's inputs: question ids 1001..1003, GLM codes 5, 77, 16383, 0 (audio ids minus 152064),
# answer ids 2001, 2002.
QUESTION, CODES, ANSWER = [1001, 1002, 1003], [5, 77, 16383, 0], [2001, 2002]


@pytest.fixture(scope="module")
def ids_7b():
    return SpecialIds.from_config(load_kimi_config(FIXTURES / "kimi_audio_7b_instruct_config.json"))


def test_inference_prompt_equals_the_official_example(ids_7b):
    expected = json.loads(EXAMPLE.read_text())["inference_prompt"]
    s = inference_prompt(QUESTION, CODES, ids_7b)
    assert s.audio_ids == expected["audio_ids"]
    assert s.text_ids == expected["text_ids"]
    assert s.is_continuous == expected["is_continuous"]
    # one 5120-d vector per continuous position
    assert sum(s.is_continuous) == expected["continuous_feature_shapes"][0][1]


def test_training_sample_equals_the_official_example(ids_7b):
    expected = json.loads(EXAMPLE.read_text())["training_sample"]
    s = training_sample(QUESTION, CODES, ANSWER, ids_7b)
    assert s.audio_ids == expected["audio_ids"]
    assert s.text_ids == expected["text_ids"]
    assert s.is_continuous == expected["is_continuous"]
    assert s.text_loss_mask == expected["text_loss_mask"]


def test_scoring_lead_goes_to_the_text_stream_with_a_blank_audio_stream(ids_7b):
    s = inference_prompt(QUESTION, CODES, ids_7b, lead_ids=[7, 8])
    assert s.audio_ids[-3:] == [ids_7b.assistant_msg_start, ids_7b.text_blank, ids_7b.text_blank]
    assert s.text_ids[-2:] == [7, 8]


def test_empty_audio_or_answer_is_refused(ids_7b):
    with pytest.raises(ValueError, match="no semantic tokens"):
        inference_prompt(QUESTION, [], ids_7b)
    with pytest.raises(ValueError, match="answer is empty"):
        training_sample(QUESTION, CODES, [], ids_7b)


def test_bpe_merges_by_lowest_rank_like_tiktoken():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    ranks[b"bc"] = 257
    ranks[b"abc"] = 258
    # "ab" (rank 256) merges before "bc" (257), then "ab"+"c" is a token
    assert byte_pair_merge(b"abc", ranks) == [258]
    assert byte_pair_merge(b"bcd", ranks) == [257, ord("d")]
    assert byte_pair_merge(b"xab", ranks) == [ord("x"), 256]


def test_text_tokenizer_round_trips_through_its_files(tmp_path):
    ranks = train_byte_bpe(["the dog barks before the siren", "which sound is heard first?"], 300)
    tok = KimiTextTokenizer(ranks, {"<|im_msg_end|>": 300, "[PAD]": 301})
    tok.save_pretrained(tmp_path)
    again = KimiTextTokenizer.from_pretrained(tmp_path)
    text = "Which sound is heard first? (A) dog bark\n(B) siren 12 é"
    assert again.encode(text) == tok.encode(text)
    assert again.decode(again.encode(text)) == text
    assert len(again.encode("the dog")) < len(b"the dog")  # merges were learned
    # special names in text stay text; their ids decode only when asked
    assert 300 not in again.encode("<|im_msg_end|>")
    assert again.decode([300]) == "" and again.decode([300], skip_special_tokens=False) == "<|im_msg_end|>"
    assert again.token_id("[PAD]") == 301


@pytest.fixture(scope="module")
def backbone(tiny_kimi_audio):
    return get_backbone("kimi_audio").from_pretrained(tiny_kimi_audio)


def _example(bb, seconds, answer, seed=0):
    return audio_example(bb, seed, noise(seconds, seed), ["dog bark", "siren", "rain"], answer,
                         "Which sound is heard first?")


def test_collate_trains_only_the_answer_and_text_eos(backbone):
    bb = backbone
    exs = [_example(bb, 1.3, 2, seed=0), _example(bb, 5.0, 0, seed=1)]
    batch = bb.collate(exs)
    ids = bb.ids
    for b, ex in enumerate(exs):
        n = int(batch["attention_mask"][b].sum())
        labels = batch["labels"][b, :n]
        answer = bb.tokenizer.encode("ABC"[ex.answer_index])
        assert labels[labels != -100].tolist() == answer + [ids.text_eos]
        assert batch["input_ids"][b, n - 1] == ids.msg_end
        # continuous positions: as many as GLM tokens, and as many as Whisper vectors of the clip's windows
        codes = ex.features["semantic_tokens"]
        assert int(batch["is_continuous_mask"][b].sum()) == len(codes)
        audio = batch["input_ids"][b][batch["is_continuous_mask"][b]]
        assert audio.tolist() == [ids.token_offset + int(c) for c in codes]
    # 1.3 s -> one 4 s window; 5 s -> two windows; vectors = ceil(samples / 1280) per window
    assert batch["whisper_mel"].shape == (3, 128, 400)
    assert batch["whisper_vectors"].tolist() == [17, 50, 13]
    assert int(batch["is_continuous_mask"].sum()) == 17 + 50 + 13


def test_special_ids_come_from_config_and_must_agree_with_the_tokenizer(backbone, tmp_path):
    import shutil

    cfg = backbone.model.config
    assert backbone.ids.media_begin == cfg.kimia_media_begin == backbone.tokenizer.token_id("<|im_media_begin|>")
    assert backbone.ids.media_begin < 1000  # a tiny model uses small ids
    release = Path(backbone.model.name_or_path)
    copy = shutil.copytree(release, tmp_path / "copy")
    raw = json.loads((copy / "config.json").read_text())
    raw["kimia_text_eos"] = raw["kimia_text_blank"]
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="kimia_text_eos=.* but tokenizer_config.json"):
        get_backbone("kimi_audio").from_pretrained(copy)


def test_letters_are_single_text_tokens_and_prompt_config_is_used(backbone):
    letters = backbone.letter_ids()
    assert len(set(letters.tolist())) == 26
    assert all(i < backbone.ids.token_offset for i in letters.tolist())
    bb = get_backbone("kimi_audio")(backbone.model, backbone.tokenizer, backbone.speech_tokenizer,
                                    backbone.whisper_fe, PromptConfig(target_format="({letter}) {text}"))
    batch = bb.collate([_example(bb, 1.0, 1)])
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert bb.tokenizer.decode(labels) == "(B) siren"
    assert torch.equal(batch["text_input_ids"][0][batch["labels"][0] != -100], torch.tensor(labels))
