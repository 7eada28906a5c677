"""The text_llm backbone (the cascade's answerer) on a tiny Qwen2 text model written to disk: event text,
the no-events switch, the tiny writer, collate, option logits with a shared prefix, GRPO rollouts, and a
data path that decodes no audio."""

import json
import re

import numpy as np
import pytest
import torch

from aqa.backbones import get_backbone
from aqa.backbones.chat_lm import IGNORE_INDEX
from aqa.backbones.text_llm_tiny import (
    IM_END,
    QWEN25_ADDED_TOKENS,
    QWEN25_DEFAULT_SYSTEM,
    QWEN25_SPECIAL_TOKENS,
    TinyQwen2TextSpec,
)
from aqa.data.example import Example
from aqa.data.prompts import PromptConfig, render_events
from tests.helpers import assert_seeded, load_plainly, record, write_manifest

EVENTS = [  # out of onset order on purpose
    {"label": "Siren", "onset": 1.25, "offset": 2.0, "score": 0.8},
    {"label": "Dog bark", "onset": 0.1, "offset": 0.74, "score": 0.934},
    {"label": "Rain", "onset": 0.5, "offset": 3.0, "score": 0.15},
]


@pytest.fixture()
def backbone(tiny_text_llm):
    return get_backbone("text_llm").from_pretrained(tiny_text_llm)


def _example(i=0, events=EVENTS, answer=1):
    choices = ["Dog bark", "Siren", "Rain", "Bell"][: 4 - i % 3]
    meta = {} if events is None else {"events": events}
    return Example(id=f"q{i}", question="What is heard first?", choices=choices, answer_index=answer, meta=meta)


# -- event text ---------------------------------------------------------------------------------------------
def test_events_render_by_onset_with_the_configured_format():
    text = render_events(EVENTS, PromptConfig())
    assert text == ("Sound events detected in the audio:\n"
                    "0.1-0.7 s: Dog bark (0.93)\n0.5-3.0 s: Rain (0.15)\n1.2-2.0 s: Siren (0.80)")
    cfg = PromptConfig(event_format="[{label}] {onset:.2f}..{offset:.2f}", events_header="")
    assert render_events(EVENTS[:1], cfg) == "[Siren] 1.25..2.00"


def test_max_events_keeps_the_highest_scores_listed_by_onset():
    text = render_events(EVENTS, PromptConfig(max_events=2, events_header=""))
    assert text.splitlines() == ["0.1-0.7 s: Dog bark (0.93)", "1.2-2.0 s: Siren (0.80)"]


def test_empty_events_give_the_explicit_text():
    assert render_events([], PromptConfig()) == "Sound events detected in the audio:\nNo sound events were detected."
    assert render_events([], PromptConfig(no_events_text="Silence.", events_header="")) == "Silence."


def test_bad_events_and_formats_are_clear_errors():
    with pytest.raises(ValueError, match="lacks \\['score'\\]"):
        render_events([{"label": "x", "onset": 0, "offset": 1}], PromptConfig())
    with pytest.raises(ValueError, match="event_format"):
        render_events(EVENTS, PromptConfig(event_format="{start} {label}"))


def test_the_prompt_holds_events_before_the_question(backbone):
    text = backbone._chat_prefix(_example(), ["Dog bark", "Siren"])
    assert text == (f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                    "Sound events detected in the audio:\n0.1-0.7 s: Dog bark (0.93)\n0.5-3.0 s: Rain (0.15)\n"
                    "1.2-2.0 s: Siren (0.80)\n\nWhat is heard first?\n(A) Dog bark\n(B) Siren\n"
                    "Answer with the option's letter.<|im_end|>\n<|im_start|>assistant\n")
    empty = backbone._chat_prefix(_example(events=[]), ["Dog bark"])
    assert "No sound events were detected.\n\nWhat is heard first?" in empty


def test_no_events_switch_leaves_question_and_options_alone(tiny_text_llm):
    bb = get_backbone("text_llm").from_pretrained(tiny_text_llm, prompt=PromptConfig(events=False))
    for ex in (_example(), _example(events=None)):  # events present or absent: never rendered
        text = bb._chat_prefix(ex, ["Dog bark", "Siren"])
        assert "Sound events" not in text and "Dog bark (0.93)" not in text
        assert "<|im_start|>user\nWhat is heard first?\n(A) Dog bark\n(B) Siren\n" in text


def test_missing_events_name_the_fix(backbone):
    with pytest.raises(ValueError, match="data_prep.sed_events.*prompt.events=false"):
        backbone.collate([_example(events=None)])


def test_bad_event_format_fails_at_load(tiny_text_llm):
    with pytest.raises(ValueError, match="event_format"):
        get_backbone("text_llm").from_pretrained(tiny_text_llm, prompt=PromptConfig(event_format="{when}"))


# -- the tiny model -----------------------------------------------------------------------------------------
def test_tiny_writes_a_normal_hf_dir_that_loads_with_plain_transformers(tiny_text_llm, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
             "chat_template.jinja")
    model, tok = load_plainly(tiny_text_llm, files, AutoModelForCausalLM, AutoTokenizer)
    assert isinstance(model, Qwen2ForCausalLM) and model.config.vocab_size == len(tok)
    ids = tok.convert_tokens_to_ids(QWEN25_SPECIAL_TOKENS + QWEN25_ADDED_TOKENS)
    assert ids == list(range(TinyQwen2TextSpec().vocab_size, TinyQwen2TextSpec().vocab_size + len(ids)))
    assert set(QWEN25_SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert not set(QWEN25_ADDED_TOKENS) & set(tok.all_special_tokens)  # added, not special, as in Qwen2.5
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n")
    # a width-64 model with std 0.02 learns nothing: the writer keeps ~1/sqrt(width)
    assert model.config.initializer_range == pytest.approx(64 ** -0.5)
    assert_seeded(tiny_text_llm, tiny.write("text_llm", tmp_path / "a", seed=0),
                  tiny.write("text_llm", tmp_path / "b", seed=1))


def test_load_refuses_other_models_with_the_fix(tmp_path, tiny_text_llm):
    with pytest.raises(FileNotFoundError, match="aqa.tiny text_llm"):
        get_backbone("text_llm").from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_audio"}))
    with pytest.raises(ValueError, match="not a text causal LM"):
        get_backbone("text_llm").from_pretrained(tmp_path)


# -- the protocol -------------------------------------------------------------------------------------------
def test_no_audio_features_and_lora_on_the_decoder_only(backbone):
    assert backbone.feature_settings() == {} and backbone.extract_features(np.zeros(16000, np.float32)) == {}
    pattern = backbone.lora_target_modules()
    hits = [n for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]
    assert len(hits) == 2 * 7 and "lm_head" not in hits
    narrow = backbone.lora_target_modules(names=["q_proj"])
    assert sum(bool(re.fullmatch(narrow, n)) for n, _ in backbone.model.named_modules()) == 2
    with pytest.raises(ValueError, match="no audio tower"):
        backbone.lora_target_modules(include_audio=True)


def test_collate_labels_only_the_answer_letter_and_im_end(backbone):
    batch = backbone.collate([_example(0), _example(1, events=[])])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    tok = backbone.tokenizer
    for row, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        target = labels[labels != IGNORE_INDEX].tolist()
        assert tok.convert_ids_to_tokens(target) == ["B", IM_END]
        n = int(mask.sum())
        assert row[n - 2 : n].tolist() == target  # the last real tokens
    loss = backbone.loss(backbone.model, batch)
    assert torch.isfinite(loss)


def test_option_logits_shared_prefix_equals_unshared_and_a_plain_forward(backbone):
    exs = [_example(0), _example(1, events=[]), _example(2)]
    orders = [[[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]], [[0, 1, 2], [1, 2, 0]], [[1, 0]]]
    shared = backbone.option_logits(backbone.model, exs, orders, share_prefix=True)
    full = backbone.option_logits(backbone.model, exs, orders, share_prefix=False)
    for s, f, ex, ords in zip(shared, full, exs, orders):
        assert s.shape == (len(ords), len(ex.choices))
        torch.testing.assert_close(s, f, atol=1e-4, rtol=1e-4)
    # canonical order: the presented letter's logit of a plain HF forward lands on the option it showed
    ex, order = exs[0], orders[0][1]
    tok = backbone.tokenizer
    text = backbone._chat_prefix(ex, [ex.choices[j] for j in order])
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        last = backbone.model(input_ids=ids).logits[0, -1]
    letters = tok.convert_tokens_to_ids(["A", "B", "C", "D"])
    for slot, canonical in enumerate(order):
        assert shared[0][1, canonical].item() == pytest.approx(last[letters[slot]].item(), abs=1e-4)


def test_grpo_rollouts_and_logprobs_match_a_plain_forward(backbone):
    from aqa.backbones.base import SamplingConfig

    torch.manual_seed(0)
    exs = [_example(0), _example(1, events=[])]
    rollout = backbone.generate(backbone.model, exs, 3, SamplingConfig(temperature=1.0, max_new_tokens=3))
    assert rollout.completion_ids.shape[:2] == (2, 3) and len(rollout.texts[1]) == 3
    specials = set(backbone.tokenizer.all_special_ids) - set(backbone.tokenizer.convert_tokens_to_ids([IM_END]))
    assert not specials & set(rollout.completion_ids[rollout.completion_mask.bool()].tolist())
    logprobs = backbone.completion_logprobs(backbone.model, rollout)  # [B, G, T]
    b, g = 1, 2
    prompt = rollout.prompt.input_ids[b][rollout.prompt.attention_mask[b].bool()]
    comp = rollout.completion_ids[b, g][rollout.completion_mask[b, g].bool()]
    with torch.no_grad():
        logits = backbone.model(input_ids=torch.cat([prompt, comp])[None]).logits[0]
    ref = logits[len(prompt) - 1 : -1].log_softmax(-1).gather(-1, comp[:, None])[:, 0]
    torch.testing.assert_close(logprobs[b, g, : len(comp)], ref, atol=1e-4, rtol=1e-4)


# -- a data path without audio ------------------------------------------------------------------------------
def _events_manifest(root, n=4):
    """A manifest with meta.events whose audio files do not exist: nothing may try to read them."""
    records = [record(i, part="tsqa", audio=f"missing_{i}.wav", question="What is heard first?",
                      choices=["Dog bark", "Siren"], answer=["Dog bark", "Siren"][i % 2],
                      meta={"events": EVENTS if i % 2 else []}) for i in range(n)]
    return write_manifest(root, "dev", records, audio="no_audio_here")


def test_sft_data_path_builds_no_feature_cache_and_decodes_nothing(backbone, tmp_path):
    from aqa.data.cache import build_feature_cache
    from aqa.data.dataset import QADataset
    from aqa.data.manifest import load_manifest

    m = load_manifest(_events_manifest(tmp_path))
    cache = build_feature_cache([m], tmp_path / "cache", backbone.extract_features, backbone.feature_settings())
    assert cache is None and not (tmp_path / "cache").exists()
    ds = QADataset(m, cache)
    examples = [ds[i] for i in range(len(ds))]
    assert examples[1].features == {} and examples[1].meta["events"] == EVENTS
    assert backbone.collate(examples)["input_ids"].shape[0] == 4


def test_inference_scores_an_events_manifest_without_audio(tiny_text_llm, tmp_path):
    from aqa.eval.predict import InferConfig
    from aqa.eval.runner import run_inference

    _events_manifest(tmp_path / "data")
    for cache_dir in (None, str(tmp_path / "cache")):
        cfg = InferConfig(model_path=str(tiny_text_llm), data_dir=str(tmp_path / "data"),
                          output_dir=str(tmp_path / f"out_{cache_dir is None}"), backbone="text_llm",
                          permutations=2, cache_dir=cache_dir, progress=False)
        summary = run_inference(cfg, "dev")
        rows = [json.loads(line) for line in open(summary["predictions"])]
        assert len(rows) == 4 and all(len(r["option_logits"]) == 2 for r in rows)
        assert summary["metrics"]["counts"] == {"tsqa": 4}


# -- configs ------------------------------------------------------------------------------------------------
def test_cascade_configs_load_with_the_paper_lora_and_demo_paths():
    from aqa.config import load_config
    from aqa.eval.predict import InferConfig
    from aqa.grpo.config import load_grpo_config
    from aqa.sft.config import load_sft_config

    for kind in ("cascade", "demo"):
        name = "cascade/{}.yaml" if kind == "cascade" else "demo/cascade_{}.yaml"
        sft = load_sft_config("configs/" + name.format("sft"))
        grpo = load_grpo_config("configs/" + name.format("grpo"))
        infer = load_config(InferConfig, "configs/" + name.format("infer"))
        assert sft.backbone == grpo.backbone == infer.backbone == "text_llm"
        if kind == "cascade":  # the paper's LoRA, GRPO on the SFT adapter
            assert (sft.finetune, sft.lora.r, sft.lora.alpha, grpo.lora.r, grpo.lora.alpha) == ("lora", 16, 32, 16, 32)
            assert grpo.sft_adapter == f"{sft.output_dir}/adapter"
        else:  # the tiny demo model trains in full; GRPO and inference load the SFT's model/
            assert sft.finetune == grpo.finetune == "full" and grpo.sft_adapter is None and infer.adapter is None
            assert grpo.model_path == infer.model_path == f"{sft.output_dir}/model"
        assert sft.prompt == grpo.prompt == infer.prompt and sft.prompt.events
        assert sft.data_dir == grpo.data_dir == infer.data_dir
        for path in ("configs/" + name.format(s) for s in ("sft", "grpo", "infer")):
            assert open(path).readline().startswith(("# deepspeed", "# python inference/run.py"))
    demo = load_sft_config("configs/demo/cascade_sft.yaml")
    assert (demo.model_path, demo.data_dir, demo.output_dir) == (
        "runs/demo/text_llm_reading/model", "runs/demo/cascade/events", "runs/demo/cascade_sft")
    assert load_config(InferConfig, "configs/demo/cascade_infer.yaml").output_dir == "runs/demo/cascade_sft/infer"
    assert load_sft_config("configs/demo/cascade_sft.yaml", ["prompt.events=false"]).prompt.events is False
