"""The qwen2_5_omni backbone on a tiny Qwen2.5-Omni written in the released layout (thinker, talker and token2wav
under their prefixes, sharded safetensors): the thinker alone is loaded and the talker's and vocoder's weights are
never read; features, prompts, scoring, GRPO log-probs, LoRA targets, full fine-tuning and the saved thinker."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aqa.backbones import backbone_for_model_type, get_backbone
from aqa.backbones import shared_prefix as sp
from aqa.backbones.base import SamplingConfig
from aqa.backbones.full import FullConfig, apply_full, save_model
from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.eval.orders import option_orders
from tests.helpers import audio_example, noise

OMNI = "qwen2_5_omni"


@pytest.fixture()
def backbone(tiny_qwen2_5_omni):
    return get_backbone(OMNI).from_pretrained(tiny_qwen2_5_omni)


def _examples(bb, n=3):
    specs = [("Which animal calls?", ["dog", "cat", "cow", "owl"], 2.0), ("How many calls?", ["1", "2", "3"], 3.5),
             ("Is there rain?", ["Yes", "No"], 1.2)]
    return [audio_example(bb, i, noise(s, i), c, 1, q) for i, (q, c, s) in enumerate(specs[:n])]


def _all_tensors(model_dir) -> dict[str, torch.Tensor]:
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_file(str(model_dir / shard)))
    return out


def test_tiny_writes_the_released_full_layout(tiny_qwen2_5_omni):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    d = tiny_qwen2_5_omni
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["enable_audio_output"]
    assert {"thinker_config", "talker_config", "token2wav_config"} <= set(config)
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    prefixes = {k.split(".", 1)[0] for k in weight_map}
    assert prefixes == {"thinker", "talker", "token2wav"}
    shards = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, set()).add(key.split(".", 1)[0])
    assert len(shards) > 3 and any(p == {"thinker"} for p in shards.values())
    assert any("thinker" not in p for p in shards.values())  # shards of talker/vocoder weights only
    assert "thinker.lm_head.weight" in weight_map and "thinker.model.layers.0.self_attn.k_proj.bias" in weight_map
    assert any(k.startswith("thinker.audio_tower.") for k in weight_map)
    assert any(k.startswith("thinker.visual.") for k in weight_map)
    # the documented way to load the thinker alone from the full release works on it (and reports talker keys)
    plain = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(d)
    assert type(plain.config).__name__ == "Qwen2_5OmniThinkerConfig"
    ids = json.loads((d / "tokenizer.json").read_text())["added_tokens"]
    named = {t["content"]: t["id"] for t in ids}
    thinker = config["thinker_config"]
    assert named["<|AUDIO|>"] == thinker["audio_token_index"] == named["<|endoftext|>"] + 3  # 151646 - 151643
    assert named["<|audio_bos|>"] == thinker["audio_start_token_id"] and named["<|IMAGE|>"] == named["<|AUDIO|>"] + 9


def test_loads_only_the_thinker_and_never_reads_talker_or_vocoder_weights(tiny_qwen2_5_omni, tmp_path, monkeypatch):
    """Spy on every safetensors handle the loader opens, then make the talker/vocoder-only shards unreadable."""
    import safetensors

    real_open = safetensors.safe_open
    opened, requested = [], []

    class Spy:
        def __init__(self, path, *args, **kwargs):
            opened.append(path.rsplit("/", 1)[-1])
            self._fh = real_open(path, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def get_slice(self, key):
            requested.append(key)
            return self._fh.get_slice(key)

        def get_tensor(self, key):
            requested.append(key)
            return self._fh.get_tensor(key)

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    bb = get_backbone(OMNI).from_pretrained(tiny_qwen2_5_omni)
    monkeypatch.undo()
    weight_map = json.loads((tiny_qwen2_5_omni / "model.safetensors.index.json").read_text())["weight_map"]
    thinker_keys = {k for k in weight_map if k.startswith("thinker.")}
    assert set(requested) == thinker_keys  # every thinker tensor, once, and nothing else
    assert sorted(set(opened)) == sorted({weight_map[k] for k in thinker_keys})
    # the weights are the release's thinker tensors, the output head separate from the embeddings
    saved = _all_tensors(tiny_qwen2_5_omni)
    state = bb.model.state_dict()
    assert torch.equal(state["lm_head.weight"], saved["thinker.lm_head.weight"])
    assert torch.equal(state["model.language_model.layers.1.mlp.up_proj.weight"],
                      saved["thinker.model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(state["model.audio_tower.proj.weight"], saved["thinker.audio_tower.proj.weight"])
    assert bb.model.lm_head.weight.data_ptr() != bb.model.model.language_model.embed_tokens.weight.data_ptr()
    assert not hasattr(bb.model, "talker") and not any("talker" in n for n, _ in bb.model.named_parameters())

    # shards with no thinker tensor replaced by garbage: loading does not notice
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2_5_omni, broken)
    other = sorted(set(weight_map.values()) - {weight_map[k] for k in thinker_keys})
    assert other
    for shard in other:
        (broken / shard).write_bytes(b"not a safetensors file")
    again = get_backbone(OMNI).from_pretrained(broken)
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_a_release_without_a_separate_head_loads_tied_and_missing_weights_fail(tiny_qwen2_5_omni, tmp_path):
    from aqa.backbones.qwen2_5_omni import LoadError

    tied_dir = tmp_path / "tied"
    shutil.copytree(tiny_qwen2_5_omni, tied_dir)
    index = json.loads((tied_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["thinker.lm_head.weight"]
    (tied_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    bb = get_backbone(OMNI).from_pretrained(tied_dir)
    head, embed = bb.model.lm_head.weight, bb.model.model.language_model.embed_tokens.weight
    assert head.data_ptr() == embed.data_ptr() and bb.model.config.tie_word_embeddings

    del index["weight_map"]["thinker.model.norm.weight"]
    (tied_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="lacks thinker weights"):
        get_backbone(OMNI).from_pretrained(tied_dir)


def test_features_prompt_and_audio_tokens_follow_the_processor(backbone):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    wave = noise(2.3)
    ex = audio_example(backbone, 0, wave, ["a cat", "a dog"], 0, "Which?")
    # the processor's feature extractor, padded as the processor pads (max_length), then cut to the valid frames
    fe = backbone.feature_extractor
    ref = fe(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    n = int(ref["attention_mask"][0].sum())
    assert n == 230 and ex.features["input_features"].shape == (128, 230) and int(ex.features["feature_length"]) == n
    np.testing.assert_allclose(ex.features["input_features"], ref["input_features"][0][:, :n], atol=1e-6)
    text = backbone._chat_prefix(ex, ex.choices)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|audio_bos|><|AUDIO|><|audio_eos|>Which?\n(A) a cat\n(B) a dog\nAnswer with the option's "
                    "letter.<|im_end|>\n<|im_start|>assistant\n")
    ids = backbone._expand_audio(backbone._encode(text), ex)
    n_audio = int(_get_feat_extract_output_lengths(torch.tensor(n)))
    assert ids.count(backbone.audio_token_id) == n_audio == 57  # about 25 tokens per second
    assert n_audio == int(backbone.model.model.audio_tower._get_feat_extract_output_lengths(torch.tensor(n))[1])


def test_option_logits_equal_a_plain_forward_on_the_processors_padded_input(backbone):
    """Scoring cuts each clip to its frames; the processor pads every clip to the window: same logits."""
    ex = _examples(backbone, 1)[0]
    ids = backbone._scoring_ids([ex], [[list(range(4))]])[0][0]
    fe = backbone.feature_extractor
    mel = np.zeros((fe.feature_size, fe.nb_max_frames), dtype=np.float32)
    n = int(ex.features["feature_length"])
    mel[:, :n] = ex.features["input_features"]
    mask = torch.zeros(1, fe.nb_max_frames, dtype=torch.long)
    mask[0, :n] = 1
    with torch.no_grad():
        logits = backbone.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                input_features=torch.from_numpy(mel)[None], feature_attention_mask=mask).logits
    want = logits[0, -1, backbone.letter_ids()[:4]]
    torch.testing.assert_close(backbone.option_logits(backbone.model, [ex])[0][0], want, atol=1e-5, rtol=1e-5)


def test_prefix_shared_scoring_equals_every_order_in_full_with_one_audio_pass(backbone):
    examples = _examples(backbone)
    orders = [option_orders(len(ex.choices), 4, random.Random(i)) for i, ex in enumerate(examples)]
    calls = []
    backbone.model.model.audio_tower.register_forward_hook(lambda m, a, o: calls.append(1))
    shared = backbone.option_logits(backbone.model, examples, orders, share_prefix=True)
    assert len(calls) == 1  # one encoder pass for the batch's prefixes, not one per order
    full = backbone.option_logits(backbone.model, examples, orders, share_prefix=False)
    for s, f in zip(shared, full):
        torch.testing.assert_close(s, f, atol=1e-5, rtol=1e-5)


def test_grpo_rollouts_and_logprobs_equal_the_naive_layout(backbone):
    examples = _examples(backbone, 2)
    torch.manual_seed(0)
    rollout = backbone.generate(backbone.model, examples, 3, SamplingConfig(temperature=1.0, max_new_tokens=5,
                                                                             top_k=8))
    assert rollout.completion_ids.shape[:2] == (2, 3) and rollout.prompt.input_ids.shape[0] == 2
    rules = sp.token_rules(backbone.tokenizer, backbone.model)
    real = rollout.completion_ids[rollout.completion_mask.bool()]
    assert not torch.isin(real, torch.tensor(rules.suppress_ids)).any()  # <|AUDIO|> and the rest never sampled
    logp = backbone.completion_logprobs(backbone.model, rollout)
    naive = sp.naive_completion_logprobs(backbone.model, rollout.prompt, rollout.completion_ids,
                                         rollout.completion_mask)
    m = rollout.completion_mask.bool()
    torch.testing.assert_close(logp[m], naive[m], atol=1e-4, rtol=1e-4)
    greedy = backbone.generate_answers(backbone.model, examples, 4)
    assert greedy == [backbone.generate_answers(backbone.model, [ex], 4)[0] for ex in examples]


def test_top_k_keeps_the_k_most_likely_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    out = sp._filter_logits(logits, SamplingConfig(top_k=2), torch.tensor([], dtype=torch.long))
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_lora_on_the_language_model_and_full_finetuning_prefixes(tiny_qwen2_5_omni):
    cls = get_backbone(OMNI)
    bb = cls.from_pretrained(tiny_qwen2_5_omni)
    apply_lora(bb, LoraConfig(r=2))
    hit = [n for n, m in bb.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(hit) == 2 * 7 and all(".language_model.layers." in n for n in hit)
    bb = cls.from_pretrained(tiny_qwen2_5_omni)
    apply_lora(bb, LoraConfig(r=2, include_audio=True))
    hit = [n for n, m in bb.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert any(".audio_tower.layers." in n for n in hit) and any(n.endswith("audio_tower.proj") for n in hit)
    assert not any(".visual." in n for n in hit)

    bb = cls.from_pretrained(tiny_qwen2_5_omni)
    apply_full(bb, FullConfig())
    train = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert train and all(n.startswith(("model.language_model.", "lm_head.")) for n in train)
    assert "lm_head.weight" in train and "model.language_model.embed_tokens.weight" in train
    apply_full(bb, FullConfig(include_audio=True))
    train = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.audio_tower.") for n in train) and not any(".visual." in n for n in train)


def test_a_saved_thinker_loads_plainly_and_names_its_backbone(backbone, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    assert backbone_for_model_type("qwen2_5_omni").name == OMNI
    examples = _examples(backbone, 2)
    with torch.no_grad():
        backbone.model.lm_head.weight.mul_(1.5)  # a "trained" thinker
    want = backbone.option_logits(backbone.model, examples)
    out = save_model(backbone, backbone.model, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_omni_thinker"
    assert backbone_for_model_type("qwen2_5_omni_thinker").name == OMNI
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    plain = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out)
    for name, value in backbone.model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name
    again = get_backbone(OMNI).from_pretrained(out)
    for a, b in zip(want, again.option_logits(again.model, examples)):
        torch.testing.assert_close(a, b)
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        assert not any(k.startswith(("talker.", "token2wav.")) for k in fh.keys())


def test_export_merges_a_lora_adapter_into_a_plain_thinker_without_naming_the_backbone(tiny_qwen2_5_omni, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from aqa.export import backbone_name_for, export_merged

    bb = get_backbone(OMNI).from_pretrained(tiny_qwen2_5_omni)
    apply_lora(bb, LoraConfig(r=2, dropout=0.0))
    torch.manual_seed(0)
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    bb.model.save_pretrained(tmp_path / "adapter")
    examples = _examples(bb, 1)
    want = bb.option_logits(bb.model, examples)[0]
    assert backbone_name_for(tiny_qwen2_5_omni) == OMNI  # the release's model_type names it
    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out)
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(bb.option_logits(merged, examples)[0], want, atol=1e-5, rtol=1e-4)


def test_the_7b_thinker_has_the_released_index_tensor_counts():
    """Built on the meta device with the 7B's published config values, the thinker's state dict splits as the
    release's weight index does: 338 text-model + 1 head + 489 audio + 518 vision = 1,346 ``thinker.`` tensors."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig(
        text_config={"vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 18944,
                     "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        audio_config={"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                      "output_dim": 3584},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]},
    )
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    keys = list(model.state_dict())
    count = {p: sum(k.startswith(p) for k in keys) for p in
             ("model.language_model.", "lm_head.", "model.audio_tower.", "model.visual.")}
    assert count == {"model.language_model.": 338, "lm_head.": 1, "model.audio_tower.": 489, "model.visual.": 518}
    assert len(keys) == 1346
    assert model.lm_head.weight.shape == (152064, 3584)


def test_a_configured_system_turn_replaces_the_templates_default(backbone, tiny):
    from aqa.data.prompts import PromptConfig

    ex = _examples(backbone, 1)[0]
    system = "You are an audio understanding model that answers multiple choice questions based on audio content."
    backbone.prompt = PromptConfig(system=system)
    text = backbone._chat_prefix(ex, ex.choices)
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|audio_bos|>")
    assert "You are a helpful assistant." not in text
    backbone.prompt = PromptConfig()
    assert backbone._chat_prefix(ex, ex.choices).startswith("<|im_start|>system\nYou are a helpful assistant.")
    text_llm = get_backbone("text_llm").from_pretrained(tiny.shared("text_llm"),
                                                        prompt=PromptConfig(system=system, events=False))
    assert text_llm._chat_prefix(ex, ex.choices).startswith(f"<|im_start|>system\n{system}<|im_end|>")
    with pytest.raises(ValueError, match="no system turn"):
        get_backbone("kimi_audio").from_pretrained(tiny.shared("kimi_audio"), prompt=PromptConfig(system=system))
