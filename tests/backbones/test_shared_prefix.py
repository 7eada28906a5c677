"""Shared-prefix rollouts and log-probs against the naive layout (prompt and audio repeated G times).

A tiny text Qwen2ForCausalLM and a tiny Qwen2-Audio with LoRA are built in-process; the equality
checks run in float64 so 1e-5 is a statement about the algorithm, not about rounding.
"""

import pytest
import torch
from torch import nn

from aqa.backbones import shared_prefix as sp
from aqa.backbones.base import SamplingConfig
from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.backbones.qwen2_audio import Qwen2AudioBackbone, unwrap
from aqa.backbones.qwen2_audio_tiny import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    IM_START,
    TinyQwen2AudioSpec,
    build_tiny_qwen2_audio,
)
from aqa.rl.loss import grpo_loss
from tests.helpers import audio_example, noise

EOS, PAD = 2, 0
RULES = sp.TokenRules(eos_ids=[EOS], pad_id=PAD, suppress_ids=[0, 1, 3])


def _text_lm(seed=0, dtype=torch.float64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def _text_prompt():
    ids, mask = sp.left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]], PAD)
    return sp.PromptBatch(ids, mask, temperature=0.9)


def _completions(B, G, T, seed=0):
    """Random completions with an EOS at a random place (or none), right-padded after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 96, (B, G, T), generator=g)
    ends = torch.randint(0, T + 2, (B, G), generator=g)  # >= T: no EOS, the completion was cut
    pos = torch.arange(T)
    ids = torch.where(pos == ends[..., None], torch.full_like(ids, EOS), ids)
    mask = (pos <= ends[..., None]).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, PAD)), mask


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_text_lm_logprobs_loss_and_grads_equal_naive():
    model = _text_lm()
    prompt = _text_prompt()
    ids, mask = _completions(3, 4, 6)
    adv = torch.randn(3, 4, dtype=torch.float64)
    old_shift = torch.randn(3, 4, 6, dtype=torch.float64) * 0.1  # old policy a little off: ratios != 1
    ref_shift = torch.randn(3, 4, 6, dtype=torch.float64) * 0.05
    results = []
    for fn in (sp.completion_logprobs, sp.naive_completion_logprobs):
        model.zero_grad()
        logp = fn(model, prompt, ids, mask)
        loss, _ = grpo_loss(logp, logp.detach() + old_shift, logp.detach() + ref_shift, adv, mask,
                            epsilon=0.2, beta=0.1)
        loss.backward()
        results.append((logp.detach(), loss.item(), _grads(model)))
    (a, la, ga), (b, lb, gb) = results
    assert torch.allclose(a * mask, b * mask, atol=1e-10)
    assert la == pytest.approx(lb, abs=1e-10)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters()))
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=0), name
    # the prefix gets gradient too (embeddings of prompt tokens)
    assert ga["model.embed_tokens.weight"][5:20].abs().sum() > 0


def test_greedy_sampling_equals_hf_generate_with_left_padding():
    model = _text_lm(dtype=torch.float32)
    prompt = _text_prompt()
    # top_p ~ 0 keeps only the most likely token: sampling becomes greedy decoding
    sampling = SamplingConfig(temperature=1.0, top_p=1e-9, max_new_tokens=7)
    ids, mask = sp.sample(model, prompt, 2, sampling, RULES)
    ref = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, do_sample=False,
                         max_new_tokens=7, eos_token_id=EOS, pad_token_id=PAD, suppress_tokens=[0, 1, 3])
    ref = ref[:, prompt.input_ids.shape[1]:]
    for b in range(3):
        for g in range(2):
            n = int(mask[b, g].sum())
            assert ids[b, g, :n].tolist() == ref[b, :n].tolist()
    naive_ids, _ = sp.naive_sample(model, prompt, 2, sampling, RULES)
    assert torch.equal(naive_ids, ids)


def test_sampled_mask_ends_at_eos_and_pads_after():
    model = _text_lm(dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.6 * model.lm_head.weight.abs().max()  # EOS likely, not certain
    ids, mask = sp.sample(model, _text_prompt(), 5, SamplingConfig(max_new_tokens=6), RULES,
                       torch.Generator().manual_seed(1))
    assert ids.shape[:2] == (3, 5)
    for row, m in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert (row[n:] == PAD).all()
        assert EOS not in row[: n - 1].tolist()
        assert n == ids.shape[-1] or row[n - 1] == EOS
    assert (mask.sum(-1) < ids.shape[-1]).any()  # some completions did stop early


def _audio_backbone(dtype=torch.float64):
    model, processor = build_tiny_qwen2_audio(TinyQwen2AudioSpec(), seed=0)
    bb = Qwen2AudioBackbone(model.to(dtype), processor)
    apply_lora(bb, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter so policy != reference
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return bb


def _audio_examples(bb, n=2):
    choices = ["dog bark", "siren", "rain", "bell"]
    return [audio_example(bb, i, noise(1.0 + i, i), choices[: 4 - i % 2], 1) for i in range(n)]


def test_audio_grpo_loss_and_grads_equal_naive_r1aqa_layout():
    bb = _audio_backbone()
    hf = unwrap(bb.model)
    examples = _audio_examples(bb)
    torch.manual_seed(0)
    rollout = bb.generate(bb.model, examples, 3, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=5))
    B, G, T = rollout.completion_ids.shape
    assert (B, G) == (2, 3) and rollout.prompt.input_ids.shape[0] == 2  # the prompt is not repeated G times
    adv = torch.tensor([[1.0, -0.5, -0.5], [0.3, 0.3, -0.6]], dtype=torch.float64)
    results = []
    for name in ("shared", "naive"):
        bb.model.zero_grad()

        def logprobs(name=name):
            if name == "shared":
                return bb.completion_logprobs(bb.model, rollout)
            return sp.naive_completion_logprobs(hf, rollout.prompt, rollout.completion_ids, rollout.completion_mask)

        with torch.no_grad(), bb.model.disable_adapter():  # the reference: the same model, adapter off
            ref = logprobs()
        logp = logprobs()
        loss, stats = grpo_loss(logp, None, ref, adv, rollout.completion_mask, epsilon=0.2, beta=0.1)
        loss.backward()
        results.append((loss.item(), stats.kl, _grads(bb.model)))
    (la, kla, ga), (lb, klb, gb) = results
    assert kla > 0  # the adapter changes the policy, so the KL term is live
    assert la == pytest.approx(lb, abs=1e-10) and kla == pytest.approx(klb, abs=1e-10)
    assert ga.keys() == gb.keys() and all("lora_" in n for n in ga) and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=0), name
    assert any(ga[n].abs().sum() > 0 for n in ga)


def test_question_chunks_score_and_train_as_the_whole_batch():
    """``Rollout.rows``: GRPO's update in question chunks (``batch.update_chunk``). Each chunk drops the padding
    columns none of its prompts needs, yet scores its questions exactly as the whole batch does; the mean of the
    chunks' losses (what DeepSpeed's accumulation takes) has the whole batch's gradient."""
    bb = _audio_backbone()
    examples = _audio_examples(bb, n=4)  # clips of 1 to 4 s: prompts of four lengths
    torch.manual_seed(0)
    rollout = bb.generate(bb.model, examples, 3, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=4))
    adv = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).view(4, 3)
    with torch.no_grad(), bb.model.disable_adapter():
        ref = bb.completion_logprobs(bb.model, rollout)

    def loss_of(part, rows):
        logp = bb.completion_logprobs(bb.model, part)
        return logp, grpo_loss(logp, None, ref[rows], adv[rows], part.completion_mask, epsilon=0.2, beta=0.1)[0]

    bb.model.zero_grad()
    whole_logp, whole = loss_of(rollout, slice(0, 4))
    whole.backward()
    want = _grads(bb.model)
    bb.model.zero_grad()
    parts = [rollout.rows(0, 2), rollout.rows(2, 4)]
    # the first chunk holds the two shortest prompts: its batch is narrower than the whole one
    assert parts[0].prompt.input_ids.shape[1] < rollout.prompt.input_ids.shape[1]
    assert parts[1].prompt.input_ids.shape[1] == rollout.prompt.input_ids.shape[1]
    chunk_logps = []
    for i, part in enumerate(parts):
        logp, loss = loss_of(part, slice(2 * i, 2 * i + 2))
        (loss / len(parts)).backward()
        chunk_logps.append(logp.detach())
    mask = rollout.completion_mask.bool()
    assert torch.allclose(torch.cat(chunk_logps)[mask], whole_logp.detach()[mask], atol=1e-10, rtol=0)
    got = _grads(bb.model)
    assert got.keys() == want.keys() and want
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-10, rtol=1e-8), name


def test_policy_that_prefers_special_tokens_never_samples_them():
    bb = _audio_backbone(dtype=torch.float32)
    hf = unwrap(bb.model)
    tok = bb.tokenizer
    media = tok.convert_tokens_to_ids([AUDIO, AUDIO_BOS, AUDIO_EOS, IM_START])
    # An output layer that puts almost all mass on <|AUDIO|> and the other media/chat markers.
    head = hf.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[media] = 30.0
    hf.set_output_embeddings(biased)
    examples = _audio_examples(bb)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=6)

    # Without suppression this policy does sample them (so the check below can fail) ...
    rules = sp.token_rules(tok, hf)
    assert set(media) <= set(rules.suppress_ids)
    prompt = bb.generate(bb.model, examples, 2, sampling).prompt
    unsafe = sp.TokenRules(rules.eos_ids, rules.pad_id, suppress_ids=[])
    raw, _ = sp.sample(hf, prompt, 4, sampling, unsafe, torch.Generator().manual_seed(0))
    assert torch.isin(raw, torch.tensor(media)).float().mean() > 0.9
    # ... and with the backbone's rules it never does, and the rollout can be read back.
    torch.manual_seed(0)
    rollout = bb.generate(bb.model, examples, 4, sampling)
    real = rollout.completion_ids[rollout.completion_mask.bool()]
    assert real.numel() > 0
    assert not torch.isin(real, torch.tensor(rules.suppress_ids)).any()
    logp = bb.completion_logprobs(bb.model, rollout)
    naive = sp.naive_completion_logprobs(hf, rollout.prompt, rollout.completion_ids, rollout.completion_mask)
    assert torch.isfinite(logp[rollout.completion_mask.bool()]).all()
    assert torch.allclose(logp * rollout.completion_mask, naive * rollout.completion_mask, atol=1e-4)


def test_zero_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        sp.sample(_text_lm(dtype=torch.float32), _text_prompt(), 2, SamplingConfig(temperature=0.0, max_new_tokens=3), RULES)
