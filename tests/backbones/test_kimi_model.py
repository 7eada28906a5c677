"""Kimi-Audio's model on a tiny release: MIMO cannot change text logits, the release layout round-trips,
Whisper fusion, the GLM tokenizer, LoRA targets, scoring and generation through the protocol."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from aqa.backbones import get_backbone, shared_prefix
from aqa.backbones.base import SamplingConfig
from aqa.backbones.kimi_audio.audio_lm import load_kimi_audio
from aqa.backbones.kimi_audio.backbone import unwrap
from aqa.backbones.kimi_audio.decoder_view import TextStreamView
from aqa.backbones.kimi_audio.glm_tokenizer import GlmSpeechTokenizer
from aqa.backbones.kimi_audio.weights import CheckpointError
from aqa.backbones.lora import LoraConfig, apply_lora
from tests.helpers import assert_seeded, audio_example, noise, write_wave


@pytest.fixture(scope="module")
def backbone(tiny_kimi_audio):
    return get_backbone("kimi_audio").from_pretrained(tiny_kimi_audio)


def _examples(bb, n=2):
    choices = ["dog bark", "siren", "rain", "bell"]
    return [audio_example(bb, i, noise(1.5 + 3 * i, i), choices[: 2 + i], i % 2, "Which sound is heard first?")
            for i in range(n)]


def test_text_logits_do_not_depend_on_the_mimo_branch(backbone):
    bb = backbone
    model = unwrap(bb.model)
    batch = bb.collate(_examples(bb))
    batch.pop("labels")
    with torch.no_grad():
        plain = model(**batch)  # MIMO skipped
        both = model(**batch, output_audio_logits=True)
        assert plain.audio_logits is None and both.audio_logits is not None
        saved = {n: p.clone() for n, p in model.named_parameters() if "mimo" in n}
        assert any(n.startswith("lm.mimo_output") for n in saved) and any(".mimo_layers." in n for n in saved)
        try:
            for n, p in model.named_parameters():
                if "mimo" in n:
                    p.add_(torch.randn_like(p))
            changed = model(**batch, output_audio_logits=True)
        finally:
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    assert torch.equal(plain.logits, both.logits)
    assert torch.equal(plain.logits, changed.logits)
    assert not torch.allclose(both.audio_logits, changed.audio_logits)


def test_release_layout_round_trips(tiny_kimi_audio, tiny, tmp_path):
    index = json.loads((tiny_kimi_audio / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-{i}-of-3.safetensors" for i in (1, 2, 3)]
    assert sum(n.endswith("rotary_emb.inv_freq") for n in index["weight_map"]) == 6  # 4 trunk + 2 MIMO layers
    model = load_kimi_audio(tiny_kimi_audio)
    state = model.lm.state_dict()
    assert len(state) == 83 and not any("inv_freq" in n for n in state)
    stored = {}
    for shard in set(index["weight_map"].values()):
        stored.update(load_file(str(tiny_kimi_audio / shard)))
    assert all(torch.equal(state[n], stored[n]) for n in state)
    # save as the release lays it out, load again: same tensors, same outputs
    model.save_pretrained(tmp_path / "again", num_shards=2)
    assert (tmp_path / "again" / "whisper-large-v3" / "preprocessor_config.json").is_file()
    again = load_kimi_audio(tmp_path / "again")
    for a, b in ((model.lm, again.lm), (model.whisper, again.whisper)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # same seed, same weights; another seed, other weights
    assert_seeded(tiny_kimi_audio, tiny.write("kimi_audio", tmp_path / "s0", seed=0),
                  tiny.write("kimi_audio", tmp_path / "s1", seed=1), file="model-3-of-3.safetensors")


def test_loading_refuses_a_rope_theta_that_disagrees_with_the_stored_inv_freq(tiny_kimi_audio, tmp_path):
    copy = shutil.copytree(tiny_kimi_audio, tmp_path / "copy")
    raw = json.loads((copy / "config.json").read_text())
    raw["rope_parameters"]["rope_theta"] = 1e6
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"rope_theta ~ 10000"):
        load_kimi_audio(copy)


def test_loading_names_missing_tensors(tiny_kimi_audio, tmp_path):
    copy = shutil.copytree(tiny_kimi_audio, tmp_path / "copy")
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = copy / index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(shard))
    del tensors["model.norm.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="does not hold it"):
        load_kimi_audio(copy)


def test_whisper_features_are_fused_at_continuous_positions(backbone):
    lm = unwrap(backbone.model).lm
    ids = backbone.ids
    audio = torch.tensor([[ids.user_msg_start, ids.media_begin, ids.token_offset + 3, ids.token_offset + 5,
                           ids.media_end]])
    text = torch.full_like(audio, ids.text_blank)
    cont = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.bool)
    feats = torch.randn(2, lm.config.kimia_adaptor_input_dim)
    with torch.no_grad():
        fused = lm.model.embed(audio, text, cont, feats)
        e = lm.model.embed_tokens
        expected = e(audio) + e(text)
        expected[0, 2:4] = (e(audio[0, 2:4]) + lm.model.vq_adaptor(feats)) * math.sqrt(2.0) + e(text[0, 2:4])
    assert torch.allclose(fused, expected, atol=1e-6)
    with pytest.raises(ValueError, match="1 Whisper feature vectors for 2 continuous positions"):
        lm.model.embed(audio, text, cont, feats[:1])


def test_glm_tokens_are_deterministic_block_causal_and_12_5_hz(tiny_kimi_audio):
    glm = GlmSpeechTokenizer.from_pretrained(tiny_kimi_audio / "glm-4-voice-tokenizer")
    loud, quiet = noise(2.0, 1, scale=1.0), noise(3.0, 2, scale=0.01)
    wave = np.concatenate([loud, quiet])
    codes = glm.tokenize(wave)
    # 5 s in 4 s windows: ceil(64000 / 1280) + ceil(16000 / 1280)
    assert codes.shape == (50 + 13,) and codes.dtype == np.int64
    assert np.array_equal(codes, glm.tokenize(wave))
    assert codes.min() >= 0 and codes.max() < glm.config.quantize_vocab_size
    # other audio after 3 s leaves the tokens of the first two 1 s attention blocks unchanged
    other = np.concatenate([loud, quiet[:16000], noise(2.0, 3, scale=0.01)])
    changed = glm.tokenize(other)
    assert np.array_equal(changed[:24], codes[:24])
    assert not np.array_equal(changed, codes)


def test_lora_targets_only_the_trunk_linear_layers(backbone):
    model = unwrap(backbone.model)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    import re

    hits = [n for n in linear if re.fullmatch(backbone.lora_target_modules(), n)]
    assert len(hits) == 4 * 7 and all(n.startswith("lm.model.layers.") for n in hits)
    narrow = [n for n in linear if re.fullmatch(backbone.lora_target_modules(names=["q_proj", "v_proj"]), n)]
    assert len(narrow) == 8 and all(n.endswith(("q_proj", "v_proj")) for n in narrow)
    wide = [n for n in linear if re.fullmatch(backbone.lora_target_modules(include_audio=True), n)]
    assert set(hits) < set(wide)
    assert {"lm.model.vq_adaptor.layers.0", "lm.model.vq_adaptor.layers.3"} < set(wide)
    assert sum(n.startswith("whisper.layers.") for n in wide) == 2 * 6
    assert not any("mimo" in n for n in wide)
    with pytest.raises(ValueError, match="match no linear layer"):
        backbone.lora_target_modules(names=["fc1"])


def test_lora_sft_step_trains_only_lora_and_scores_in_canonical_order(tiny_kimi_audio):
    bb = get_backbone("kimi_audio").from_pretrained(tiny_kimi_audio)
    peft_model = apply_lora(bb, LoraConfig(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".lm.model.layers." in n for n in trainable)
    exs = _examples(bb)
    loss = bb.loss(peft_model, bb.collate(exs))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if n in trainable and "lora_A" in n)
    orders = [[[0, 1], [1, 0]], [[0, 1, 2], [2, 0, 1], [1, 2, 0]]]
    shared = bb.option_logits(peft_model, exs, orders)
    full = bb.option_logits(peft_model, exs, orders, share_prefix=False)
    assert [t.shape for t in shared] == [(2, 2), (3, 3)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared, full))
    single = bb.option_logits(peft_model, exs[1:], [[[2, 0, 1]]])[0]
    assert torch.allclose(single[0], shared[1][1], atol=1e-5)  # the same order scored alone


def test_generation_through_the_text_stream(backbone):
    bb = backbone
    exs = _examples(bb)
    answers = bb.generate_answers(bb.model, exs, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    torch.manual_seed(0)
    rollout = bb.generate(bb.model, exs, num_samples=3, sampling=SamplingConfig(temperature=1.0, max_new_tokens=4))
    assert rollout.completion_ids.shape[:2] == (2, 3) and len(rollout.texts[1]) == 3
    ids = rollout.completion_ids[rollout.completion_mask.bool()]
    assert not bool(((ids >= bb.ids.token_offset) | (ids == bb.ids.text_blank)).any())  # text ids only
    shared = bb.completion_logprobs(bb.model, rollout)
    naive = shared_prefix.naive_completion_logprobs(TextStreamView(unwrap(bb.model).lm), rollout.prompt,
                                                    rollout.completion_ids, rollout.completion_mask)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(shared[mask], naive[mask], atol=1e-4)
    # GRPO's question chunks (batch.update_chunk): the shorter prompt's chunk drops its padding columns (the
    # audio-stream ids and continuous mask with the text ones) and scores as in the whole batch
    first, second = rollout.rows(0, 1), rollout.rows(1, 2)
    assert first.prompt.input_ids.shape[1] < rollout.prompt.input_ids.shape[1]
    assert first.prompt.extra["audio_ids"].shape == first.prompt.input_ids.shape
    chunks = torch.cat([bb.completion_logprobs(bb.model, r) for r in (first, second)])
    assert torch.allclose(chunks[mask], shared[mask], atol=1e-5)


def test_features_go_through_the_feature_cache(backbone, tmp_path):
    from aqa.data.cache import FeatureCache, settings_hash

    path = write_wave(tmp_path / "clip.wav", noise(4.5, 4), subtype="FLOAT")
    cache = FeatureCache(tmp_path / "cache", backbone.feature_settings())
    cache.ensure([path], backbone.extract_features, progress=False)
    cached = cache.get(path)
    direct = backbone.extract_features(noise(4.5, 4))
    assert cached.keys() == direct.keys() == {"whisper_mel", "window_samples", "semantic_tokens"}
    assert all(np.array_equal(cached[k], direct[k]) for k in direct)
    # another speech tokenizer (other codebook) gets another cache directory
    other = dict(backbone.feature_settings())
    other["speech_tokenizer"] = {**other["speech_tokenizer"], "codebook": "0" * 16}
    assert settings_hash(other) != settings_hash(backbone.feature_settings())


def test_a_fed_text_id_0_skips_the_text_stream_per_row_as_the_official_forward(tiny_kimi_audio):
    lm = unwrap(get_backbone("kimi_audio").from_pretrained(tiny_kimi_audio).model).lm.eval()
    trunk, blank = lm.model, lm.config.kimia_text_blank
    audio = torch.full((2, 1), blank)
    text = torch.tensor([[0], [5]])  # a decoding step: row 0 was fed text id 0, row 1 an ordinary id
    with torch.no_grad():
        emb = trunk.embed(audio, text)
        audio_only = trunk.embed_tokens(audio)
        # the official rule on each row alone: skip embed_tokens(text) when the fed text ids sum to 0
        assert torch.equal(emb[0], audio_only[0])
        assert torch.equal(emb[1], audio_only[1] + trunk.embed_tokens(text[1]))
        both = lm(audio, text).logits[:, -1]  # [2, V]
        alone = [lm(audio[i : i + 1], text[i : i + 1]).logits[0, -1] for i in range(2)]
        torch.testing.assert_close(both[0], alone[0])
        torch.testing.assert_close(both[1], alone[1])  # the other row is unchanged by row 0's rule
        added = lm.lm_head(trunk(audio_only[:1] + trunk.embed_tokens(text[:1]))[0])[0, -1]  # the id-0 embedding added
        assert not torch.allclose(both[0], added, atol=1e-4)


def test_exported_config_writes_rope_theta_auto_map_and_the_glm_ema_decay(tiny_kimi_audio, tmp_path):
    release = tiny_kimi_audio
    raw = json.loads((release / "config.json").read_text())  # as plain JSON, the way any other reader sees it
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"]
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"
    glm = json.loads((release / "glm-4-voice-tokenizer" / "config.json").read_text())
    assert glm["quantize_ema_decay"] is not None  # the official code then expects the EMA buffers the file holds
    lm = unwrap(get_backbone("kimi_audio").from_pretrained(release).model).lm
    lm.config.save_pretrained(tmp_path)  # what aqa.export writes for a merged model
    again = json.loads((tmp_path / "config.json").read_text())
    assert again["rope_theta"] == again["rope_parameters"]["rope_theta"] == raw["rope_theta"]
