"""The qwen2_audio backbone on a tiny random model written to disk: load path, features, collate, LoRA."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aqa.backbones import get_backbone
from aqa.backbones.lora import AdapterError, LoraConfig, apply_lora, load_adapter, merge_lora
from aqa.backbones.qwen2_audio_tiny import SPECIAL_TOKENS
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig
from tests.helpers import assert_seeded, audio_example, load_plainly, noise


@pytest.fixture()
def backbone(tiny_qwen2_audio):
    return get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)


def _examples(bb, n=3):
    choices = ["dog bark", "siren", "rain", "bell"]
    return [audio_example(bb, i, noise(1.0 + i, i), choices[: 4 - i % 3], 1) for i in range(n)]


def test_tiny_writes_a_normal_hf_dir_that_loads_with_plain_transformers(tiny_qwen2_audio, tiny, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "preprocessor_config.json", "generation_config.json")
    model, proc = load_plainly(tiny_qwen2_audio, files, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor)
    ids = proc.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # real relative order, right after BPE
    assert model.config.audio_token_index == proc.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    # encoder window matches the front end: 5 s -> 500 frames -> 250 positions
    assert proc.feature_extractor.nb_max_frames == 2 * model.config.audio_config.max_source_positions == 500
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "text", "text": "Q?"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nQ?<|im_end|>\n<|im_start|>assistant\n")
    # same seed -> same weights; another seed -> different weights
    assert_seeded(tiny_qwen2_audio, tiny.write("qwen2_audio", tmp_path / "a", seed=0),
                  tiny.shared("qwen2_audio", seed=1))



def test_tiny_cli_asks_the_registry_and_takes_overrides_after_the_options(tiny_qwen2_audio, tmp_path, capsys):
    tiny_dir = tiny_qwen2_audio
    from aqa.backbones import backbones
    from aqa.tiny import main

    assert {n for n, cls in backbones().items() if cls.tiny_spec() is not None} == {
        "kimi_audio", "qwen2_5_omni", "qwen2_audio", "text_llm"}
    main(["qwen2_audio", "--out", str(tmp_path / "cli"), "--seed", "0"])
    assert f"wrote tiny qwen2_audio to {tmp_path / 'cli'}" in capsys.readouterr().out
    first, cli = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert first.keys() == cli.keys() and all(torch.equal(first[k], cli[k]) for k in first)
    # spec overrides before, between and after the options
    main(["qwen2_audio", "intermediate_size=96", "--out", str(tmp_path / "small"), "num_hidden_layers=1", "--seed",
          "1", "hidden_size=32"])
    spec = json.loads((tmp_path / "small" / "tiny_spec.json").read_text())
    assert (spec["seed"], spec["intermediate_size"], spec["num_hidden_layers"], spec["hidden_size"]) == (1, 96, 1, 32)

def test_features_and_prompt_ids_equal_the_processor(backbone):
    wave = noise(2.3)
    ex = Example(id="q", question="Which?", choices=["a cat", "a dog"], answer_index=0,
                 features=backbone.extract_features(wave))
    assert backbone.spec_augment_key == "input_features"
    assert ex.features["input_features"].shape == (128, 500)
    assert int(ex.features["feature_length"]) == 230
    text = backbone._chat_prefix(ex, ex.choices)
    ref = backbone.processor(text=text, audio=wave, return_tensors="pt")
    ours = backbone._expand_audio(backbone._encode(text), ex)
    assert ours == ref["input_ids"][0].tolist()
    np.testing.assert_allclose(ex.features["input_features"], ref["input_features"][0].numpy(), atol=1e-6)
    assert int(ex.features["feature_length"]) == int(ref["feature_attention_mask"].sum())


def test_collate_labels_only_the_target_and_end_of_turn(backbone):
    backbone.prompt = PromptConfig(target_format="({letter}) {text}")
    examples = _examples(backbone)
    batch = backbone.collate(examples)
    tok = backbone.tokenizer
    for row in range(len(examples)):
        labeled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tok.decode(labeled) == "(B) siren<|im_end|>"
        # the labels sit on exactly the last real tokens of the row
        n_real = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row][n_real - len(labeled) : n_real].tolist() == labeled
        assert (batch["labels"][row][n_real:] == -100).all()
    assert batch["input_features"].shape == (3, 128, 500)
    loss = backbone.loss(backbone.model, batch)
    loss.backward()
    assert torch.isfinite(loss) and backbone.model.lm_head.weight.grad.abs().sum() > 0


def test_collate_refuses_unanswered_and_featureless_examples(backbone):
    ex = _examples(backbone, 1)[0]
    ex.answer_index = None
    with pytest.raises(ValueError, match="no answer"):
        backbone.collate([ex])
    ex = Example(id="bare", question="Q?", choices=["a", "b"], answer_index=0)
    with pytest.raises(ValueError, match="extract_features"):
        backbone.collate([ex])


def _lora_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def test_lora_targets_hit_only_the_language_model_unless_asked(tiny_qwen2_audio):
    cls = get_backbone("qwen2_audio")
    bb = cls.from_pretrained(tiny_qwen2_audio)
    apply_lora(bb, LoraConfig(r=2))
    hit = _lora_modules(bb.model)
    assert len(hit) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(".language_model." in n for n in hit)
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    bb = cls.from_pretrained(tiny_qwen2_audio)
    apply_lora(bb, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    assert sorted({n.rsplit(".", 1)[1] for n in _lora_modules(bb.model)}) == ["q_proj", "v_proj"]
    assert all(".language_model." in n for n in _lora_modules(bb.model))  # not the encoder's q/v_proj

    bb = cls.from_pretrained(tiny_qwen2_audio)
    apply_lora(bb, LoraConfig(r=2, include_audio=True))
    hit = _lora_modules(bb.model)
    assert any(".audio_tower." in n for n in hit) and any("multi_modal_projector" in n for n in hit)

    with pytest.raises(ValueError, match="match no linear layer"):
        cls.from_pretrained(tiny_qwen2_audio).lora_target_modules(names=["no_such_proj"])


def test_adapter_round_trip_merge_and_wrong_base(tiny_qwen2_audio, tiny, tmp_path):
    cls = get_backbone("qwen2_audio")
    bb = cls.from_pretrained(tiny_qwen2_audio)
    apply_lora(bb, LoraConfig(r=4, dropout=0.0))
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change the outputs
            torch.nn.init.normal_(p, std=0.5)
    bb.model.save_pretrained(tmp_path / "adapter")
    examples = _examples(bb, 2)
    trained = bb.option_logits(bb.model, examples)

    fresh = cls.from_pretrained(tiny_qwen2_audio)
    base = fresh.option_logits(fresh.model, examples)
    load_adapter(fresh, tmp_path / "adapter")
    loaded = fresh.option_logits(fresh.model, examples)
    assert not torch.allclose(base[0], trained[0], atol=1e-4)
    for a, b in zip(trained, loaded):
        torch.testing.assert_close(a, b)
    merge_lora(fresh)
    assert not _lora_modules(fresh.model)
    for a, b in zip(trained, fresh.option_logits(fresh.model, examples)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    other_dir = tiny.shared("qwen2_audio", hidden_size=32)
    with pytest.raises(AdapterError, match="trained on another base"):
        load_adapter(cls.from_pretrained(other_dir), tmp_path / "adapter")
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        load_adapter(cls.from_pretrained(tiny_qwen2_audio), tmp_path)


def test_missing_or_foreign_model_dir_errors(tmp_path):
    cls = get_backbone("qwen2_audio")
    with pytest.raises(FileNotFoundError, match="aqa.tiny"):
        cls.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=re.escape("'llama' model")):
        cls.from_pretrained(tmp_path)


def test_batched_greedy_generation_equals_one_at_a_time(backbone):
    examples = _examples(backbone, 2)
    examples[0].question = "Which?"  # different prompt lengths, so the batch is left-padded
    both = backbone.generate_answers(backbone.model, examples, 5)
    assert both == [backbone.generate_answers(backbone.model, [ex], 5)[0] for ex in examples]
    assert all(isinstance(t, str) and t for t in both)
