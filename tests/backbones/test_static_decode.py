"""The static-cache rollout decoder against the eager loop: same greedy tokens, and the log-probs it reports for
its sampled tokens equal the loss's (``completion_logprobs``), in fp32, for every backbone that samples.
Sampling: suppressed ids never drawn, top-p without a sort keeps what the sorted filter keeps, draws follow p.
"""

import pytest
import torch

from aqa.backbones import get_backbone
from aqa.backbones import shared_prefix as sp
from aqa.backbones.base import SamplingConfig
from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.backbones.static_decode import PROMPT_ROUND, StaticDecoder, draw, nucleus_keep
from tests.helpers import audio_example, noise

EOS, PAD = 2, 0
RULES = sp.TokenRules(eos_ids=[EOS], pad_id=PAD, suppress_ids=[0, 1, 3])
GREEDY = dict(temperature=0.7, top_p=1e-9)  # top_p ~ 0 keeps only the most likely token


def _text_lm(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg).eval()


def _prompt(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = sp.left_pad([torch.randint(4, 96, (n,), generator=g).tolist() for n in lengths], PAD)
    return sp.PromptBatch(ids, mask, temperature=0.7)


def _assert_same(model, prompt, G, sampling, rules, decoder):
    """Greedy: the static decoder's tokens and masks equal the eager loop's; its log-probs equal the loss's."""
    eager_ids, eager_mask = sp.sample(model, prompt, G, sampling, rules)
    ids, mask, logp = decoder.sample(model, prompt, G, sampling, rules)
    assert torch.equal(ids, eager_ids) and torch.equal(mask, eager_mask)
    with torch.no_grad():
        ref = sp.completion_logprobs(model, prompt, ids, mask)
    assert torch.allclose(logp * mask, ref * mask, atol=1e-5)
    return ids, mask


def test_text_lm_greedy_equals_eager_and_the_cache_is_reused_then_regrown():
    model = _text_lm()
    decoder = StaticDecoder()
    sampling = SamplingConfig(max_new_tokens=6, **GREEDY)
    _assert_same(model, _prompt([7, 3, 5]), 3, sampling, RULES, decoder)
    first = decoder._run
    _assert_same(model, _prompt([9, 4, 2], seed=1), 3, sampling, RULES, decoder)
    assert decoder._run is first  # a prompt that fits reuses the cache (and, on CUDA, the captured step)
    _assert_same(model, _prompt([PROMPT_ROUND + 5, 30, 2], seed=2), 3, sampling, RULES, decoder)
    assert decoder._run is not first and decoder._run.slots == 2 * PROMPT_ROUND


def test_sampled_tokens_carry_the_loss_logprobs_and_end_at_eos():
    model = _text_lm()
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.6 * model.lm_head.weight.abs().max()  # EOS likely, not certain
    prompt = _prompt([7, 3, 5])
    ids, mask, logp = StaticDecoder().sample(model, prompt, 5, SamplingConfig(0.7, 0.9, 6), RULES,
                                             torch.Generator().manual_seed(1))
    for row, m in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any() and (row[n:] == PAD).all()
        assert EOS not in row[: n - 1].tolist() and (n == ids.shape[-1] or row[n - 1] == EOS)
    assert (mask.sum(-1) < ids.shape[-1]).any()  # some completions did stop early
    assert not torch.isin(ids[mask.bool()], torch.tensor(RULES.suppress_ids)).any()
    with torch.no_grad():
        ref = sp.completion_logprobs(model, prompt, ids, mask)
    assert torch.allclose(logp * mask, ref * mask, atol=1e-5)


def _lora(bb):
    apply_lora(bb, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return bb


@pytest.mark.parametrize("kind", ["qwen2_audio", "kimi_audio"])
def test_audio_backbones_greedy_rollouts_equal_eager(kind, tiny):
    bb = _lora(get_backbone(kind).from_pretrained(tiny.shared(kind)))
    examples = [audio_example(bb, i, noise(1.0 + 2 * i, i), ["dog bark", "siren", "rain"], 1) for i in range(2)]
    sampling = SamplingConfig(max_new_tokens=5, **GREEDY)
    decoder = StaticDecoder()
    eager = bb.generate(bb.model, examples, 3, sampling)
    static = bb.generate(bb.model, examples, 3, sampling, decoder=decoder)
    assert torch.equal(static.completion_ids, eager.completion_ids)
    assert torch.equal(static.completion_mask, eager.completion_mask) and static.texts == eager.texts
    # the decoder's own log-probs (through the model view the backbone hands shared_prefix) equal the loss's
    ids, mask = static.completion_ids, static.completion_mask
    loss_logp = bb.completion_logprobs(bb.model, static)
    model = sp_model(bb)
    _, _, logp = decoder.sample(model, static.prompt, 3, sampling, rules_of(bb, model))
    assert torch.allclose(logp * mask, loss_logp.detach() * mask, atol=1e-5)
    assert ids.shape[:2] == (2, 3)


def sp_model(bb):
    """The causal-LM view ``shared_prefix`` drives for this backbone."""
    if bb.name == "kimi_audio":
        from aqa.backbones.kimi_audio.backbone import unwrap
        from aqa.backbones.kimi_audio.decoder_view import TextStreamView

        return TextStreamView(unwrap(bb.model).lm)
    from aqa.backbones.chat_lm import unwrap

    return unwrap(bb.model)


def rules_of(bb, model):
    return bb._rules() if bb.name == "kimi_audio" else sp.token_rules(bb.tokenizer, model)


def test_text_llm_backbone_greedy_rollouts_equal_eager(tiny_text_llm):
    from aqa.data.example import Example

    bb = _lora(get_backbone("text_llm").from_pretrained(tiny_text_llm))
    examples = [Example(id=f"q{i}", question="What is heard first?", choices=["Dog", "Siren", "Rain"][: 3 - i],
                        answer_index=0, meta={"events": []}) for i in range(2)]
    sampling = SamplingConfig(max_new_tokens=4, **GREEDY)
    eager = bb.generate(bb.model, examples, 2, sampling)
    static = bb.generate(bb.model, examples, 2, sampling, decoder=StaticDecoder())
    assert torch.equal(static.completion_ids, eager.completion_ids)
    assert torch.equal(static.completion_mask, eager.completion_mask)


# -- sampling -----------------------------------------------------------------------------------------------
def _sorted_top_p(probs, top_p):
    """The sorted filter of ``shared_prefix._filter_logits``, as a keep mask."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ~drop)


@pytest.mark.parametrize("top_p", [1e-9, 0.3, 0.8, 0.95, 0.999])
def test_top_p_without_a_sort_keeps_what_the_sorted_filter_keeps(top_p):
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(64, 500, generator=g) * 3).softmax(-1)
    keep, ref = nucleus_keep(probs, top_p), _sorted_top_p(probs, top_p)
    # they may differ only where the mass above a token is top_p to within float32 rounding of a sum
    p = probs.double()
    above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)  # [N, V]
    differ = keep != ref
    assert differ.sum() <= 2 and ((above[differ] - top_p).abs() < 1e-6).all()
    assert keep[torch.arange(64), probs.argmax(-1)].all()


def test_draws_follow_the_filtered_distribution_and_never_a_suppressed_id():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]]).repeat(40000, 1)
    suppress = torch.zeros(6, dtype=torch.bool)
    suppress[5] = True  # the most likely id, banned
    sampling = SamplingConfig(temperature=1.0, top_p=0.8)
    ids, logp = draw(logits, sampling, suppress, torch.Generator().manual_seed(0))
    assert not (ids == 5).any()
    p = logits[0].masked_fill(suppress, float("-inf")).softmax(-1)
    keep = _sorted_top_p(p[None], 0.8)[0]
    expect = p * keep / (p * keep).sum()
    freq = torch.bincount(ids, minlength=6).float() / len(ids)
    assert torch.allclose(freq, expect, atol=0.01)
    assert torch.allclose(logp, logits[0].log_softmax(-1)[ids])  # the unfiltered log-prob, as the loss takes it


def test_top_k_draws_only_among_the_k_most_likely_unsuppressed_ids():
    """``grpo.sampling.top_k`` (AudioMCQ samples with top-k 4) holds on the static engine as on the eager loop."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]]).repeat(40000, 1)
    suppress = torch.zeros(6, dtype=torch.bool)
    suppress[5] = True
    ids, _ = draw(logits, SamplingConfig(temperature=1.0, top_k=2), suppress, torch.Generator().manual_seed(0))
    p = logits[0, :2].softmax(-1)  # ids 0 and 1: the two most likely once 5 is banned
    freq = torch.bincount(ids, minlength=6).float() / len(ids)
    assert set(ids.unique().tolist()) == {0, 1}
    assert torch.allclose(freq[:2], p, atol=0.01)
    eager = sp._filter_logits(logits[:1].clone(), SamplingConfig(temperature=1.0, top_k=2), suppress)
    assert torch.isfinite(eager[0]).nonzero().flatten().tolist() == [0, 1]
