"""What makes the SFT step faster without changing what it computes: the LM head at the answer positions only,
gradient checkpointing, and micro-batches grouped by clip length."""

import numpy as np
import pytest
import torch

from aqa.backbones import get_backbone
from aqa.backbones.chat_lm import unwrap
from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.data.dataset import QADataset, ShardedSampler
from aqa.data.example import Example
from aqa.data.manifest import Manifest
from aqa.sft.step import enable_gradient_checkpointing
from tests.helpers import audio_example, noise, record, write_wave


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _backbone(kind, path, checkpointing=False):
    torch.manual_seed(0)
    bb = get_backbone(kind).from_pretrained(path)
    if checkpointing:
        enable_gradient_checkpointing(bb)
    apply_lora(bb, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    bb.model.train()
    return bb


def _examples(bb, kind):
    if kind == "text_llm":
        return [Example(id=f"q{i}", question="What is heard first?", choices=["Dog", "Siren", "Rain"][: 3 - i],
                        answer_index=i, meta={"events": []}) for i in range(2)]
    return [audio_example(bb, i, noise(1.0 + 2 * i, i), ["dog bark", "siren", "rain"][: 3 - i], i) for i in range(2)]


@pytest.mark.parametrize("kind", ["qwen2_audio", "text_llm"])
def test_answer_position_head_gives_the_full_head_loss_and_gradients(kind, tiny):
    bb = _backbone(kind, tiny.shared(kind))
    batch = bb.collate(_examples(bb, kind))
    results = []
    for loss_fn in (lambda: bb.loss(bb.model, batch), lambda: bb.model(**batch).loss):  # ours, then the HF model's
        bb.model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results.append((loss.item(), _lora_grads(bb.model)))
    (ours, g_ours), (full, g_full) = results
    assert ours == pytest.approx(full, abs=1e-5) and g_ours.keys() == g_full.keys() and g_ours
    for name in g_ours:
        assert torch.allclose(g_ours[name], g_full[name], atol=1e-6), name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_qwen2_audio):
    results = []
    for checkpointing in (False, True):
        bb = _backbone("qwen2_audio", tiny_qwen2_audio, checkpointing)
        assert unwrap(bb.model).model.language_model.gradient_checkpointing is checkpointing
        loss = bb.loss(bb.model, bb.collate(_examples(bb, "qwen2_audio")))
        loss.backward()
        results.append((loss.item(), _lora_grads(bb.model)))
    (plain, g_plain), (ckpt, g_ckpt) = results
    assert plain == pytest.approx(ckpt, abs=1e-6) and g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_ckpt[name], atol=1e-6), name


# -- length grouping ------------------------------------------------------------------------------------------
def _lengths(n, seed=0):
    return np.random.default_rng(seed).uniform(1, 30, n).round(2).tolist()  # DCASE-like: 1-30 s


def _micro_batches(sampler, micro):
    order = [i for _, i in sampler]
    return [order[k:k + micro] for k in range(0, len(order), micro)]


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_micro_batches_hold_similar_lengths_and_each_item_once(world):
    n, micro, lengths = 1000, 4, _lengths(1000)
    samplers = [ShardedSampler(n, rank=r, world_size=world, seed=3, lengths=lengths, group_size=micro)
                for r in range(world)]
    plain = ShardedSampler(n, seed=3)
    per_rank = [_micro_batches(s, micro) for s in samplers]
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(n))  # a permutation
    spread = np.mean([np.ptp([lengths[i] for i in b]) for batches in per_rank for b in batches])
    plain_spread = np.mean([np.ptp([lengths[i] for i in b]) for b in _micro_batches(plain, micro)])
    assert spread < plain_spread / 5
    if world == 2:  # rank 0's and rank 1's j-th micro-batches come from the same global group
        for a, b in zip(*per_rank):
            assert abs(np.mean([lengths[i] for i in a]) - np.mean([lengths[i] for i in b])) < 3.0
    # seeded per epoch, resumable mid-epoch, and epochs differ
    again = ShardedSampler(n, rank=0, world_size=world, seed=3, lengths=lengths, group_size=micro)
    assert again.epoch_order(0) == samplers[0].epoch_order(0) != again.epoch_order(1)
    again.load_state_dict({**samplers[0].state_dict(consumed=40), "epoch": 0})
    assert [i for _, i in again] == samplers[0].epoch_order(0)[40:]
    with pytest.raises(ValueError, match="group_by_length"):
        ShardedSampler(n, rank=0, world_size=world, seed=3).load_state_dict(samplers[0].state_dict())


def test_dataset_lengths_are_clip_seconds_from_the_headers(tmp_path):
    audio = tmp_path / "audio"
    records = []
    for i, seconds in enumerate([1.0, 2.5, 0.5]):
        write_wave(audio / f"c{i}.wav", noise(seconds, i))
        records.append(record(i, question="Which sound?", choices=["dog", "cat"], answer="dog"))
    manifest = Manifest(path=tmp_path / "train.jsonl", audio_root=audio, records=records)
    with_audio = QADataset(manifest, cache=object())  # any cache: an audio model's dataset
    assert with_audio.lengths() == pytest.approx([1.0, 2.5, 0.5])
    text = QADataset(manifest).lengths()
    assert len(text) == 3 and all(v > 0 for v in text)
