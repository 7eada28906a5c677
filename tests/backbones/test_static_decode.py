"""The static-cache rollout decoder against the eager loop: same greedy tokens, and the log-probs it reports for
its sampled tokens equal the loss's (``completion_logprobs``), in fp32, for every backbone that samples.
Sampling: suppressed ids never drawn, top-p without a sort keeps what the sorted filter keeps, draws follow p.
Merged LoRA (``merge_lora``): no weight changes, the same tokens and log-probs as the LoRA branch, refreshed
after an optimizer step, and a step kept for one mode never replayed in the other.
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
    ids, mask, logp = StaticDecoder().sample(model, prompt, 5, SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=6), RULES,
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


# -- merged LoRA ------------------------------------------------------------------------------------------
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_lm(seed=0, std=0.2, **lora):
    """A PEFT LoRA model on the text LM, every LM linear adapted, LoRA B random (as if trained)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(_text_lm(seed), PeftLoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LM_TARGETS,
                                                             **lora}))
    _randomize_lora_b(model, seed, std)
    return model.eval()


def _randomize_lora_b(model, seed, std):
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_bit_identical(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k].detach(), before[k])]
    assert not changed, changed[:5]


def _no_patch_left(model):
    return not any("forward" in m.__dict__ for m in model.modules())


def _gpt2_lora():
    """Conv1D layers (weights stored [in, out]): PEFT's fan_in_fan_out."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    return get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                fan_in_fan_out=True))


@pytest.mark.parametrize("case", ["fp32", "bf16 model, fp32 adapter", "fan_in_fan_out"])
def test_merged_layers_compute_what_the_lora_layers_compute(case):
    from aqa.backbones.lora import MergedLora, lora_linears

    if case == "fan_in_fan_out":
        peft = _gpt2_lora()
    else:
        peft = _peft_lm()
        if case.startswith("bf16"):
            peft.get_base_model().to(torch.bfloat16)
            for layer in lora_linears(peft):
                layer.lora_A.float(), layer.lora_B.float()  # PEFT's own default on a bf16 model
    _randomize_lora_b(peft, seed=0, std=0.2)
    peft.eval()
    merged = MergedLora()
    merged.refresh(peft)
    layers = lora_linears(peft)
    assert len(merged.buffers) == len(layers) > 0
    g = torch.Generator().manual_seed(0)
    for layer, buf in zip(layers, merged.buffers):
        base = layer.get_base_layer()
        weight = base.weight
        assert buf.dtype == weight.dtype and buf.shape == weight.shape
        a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
        s = layer.scaling["default"]
        delta, size = s * (b @ a), s * (b.abs() @ a.abs())  # the update and a bound on its rounding's scale
        if layer.fan_in_fan_out:
            delta, size = delta.T, size.T
        exact = weight.detach().double() + delta
        # within an ulp of the exact sum (bf16: the fp32 update rounded once into bf16)
        ulp = 2.0 ** -8 if weight.dtype == torch.bfloat16 else 2.0 ** -23
        assert ((buf.double() - exact).abs() <= ulp * (exact.abs() + a.shape[0] * size)).all()
        x = torch.randn(3, weight.shape[1 if not layer.fan_in_fan_out else 0], generator=g).to(weight.dtype)
        with torch.no_grad():
            lora_out = layer(x).double()
            with merged.patched():
                merged_out = layer(x).double()
        tol = 0.05 if weight.dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(merged_out, lora_out, atol=tol, rtol=tol)
        assert not torch.allclose(base(x).double(), lora_out, atol=tol, rtol=tol)  # LoRA does change the output


def test_merged_rollout_leaves_every_base_and_lora_weight_bit_identical():
    peft = _peft_lm()
    hf = peft.get_base_model()
    before = _snapshot(peft)
    decoder, sampling = StaticDecoder(merge_lora=True), SamplingConfig(temperature=1.0, max_new_tokens=6)
    for seed in range(2):
        decoder.sample(hf, _prompt([7, 3, 5], seed=seed), 3, sampling, RULES, torch.Generator().manual_seed(seed))
    _assert_bit_identical(peft, before)
    assert _no_patch_left(peft) and len(decoder.merged.buffers) == 2 * len(LM_TARGETS)
    # what the test guards against: PEFT's merge() then unmerge() does not give the weights back bit for bit
    peft.merge_adapter()
    peft.unmerge_adapter()
    with pytest.raises(AssertionError):
        _assert_bit_identical(peft, before)


def test_merged_rollout_samples_what_the_lora_branch_samples():
    peft = _peft_lm()
    hf = peft.get_base_model()
    prompt = _prompt([7, 3, 5])
    greedy = SamplingConfig(max_new_tokens=6, **GREEDY)
    ids, mask, logp = StaticDecoder().sample(hf, prompt, 3, greedy, RULES)
    m_ids, m_mask, m_logp = StaticDecoder(merge_lora=True).sample(hf, prompt, 3, greedy, RULES)
    assert torch.equal(m_ids, ids) and torch.equal(m_mask, mask)
    assert torch.allclose(m_logp * mask, logp * mask, atol=1e-5)
    with peft.disable_adapter():  # the adapter matters: without it the greedy tokens differ
        assert not torch.equal(StaticDecoder().sample(hf, prompt, 3, greedy, RULES)[0], ids)
    # sampled: the same draws (one generator seed) give the same tokens, and their log-probs are the loss's
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    ids, mask, _ = StaticDecoder().sample(hf, prompt, 4, sampling, RULES, torch.Generator().manual_seed(3))
    m_ids, m_mask, m_logp = StaticDecoder(merge_lora=True).sample(hf, prompt, 4, sampling, RULES,
                                                                  torch.Generator().manual_seed(3))
    assert torch.equal(m_ids, ids) and torch.equal(m_mask, mask)
    loss_logp = sp.completion_logprobs(hf, sp.PromptBatch(prompt.input_ids, prompt.attention_mask, temperature=1.0),
                                       ids, mask).detach()
    assert torch.allclose(m_logp * mask, loss_logp * mask, atol=1e-5)


def test_merged_rollout_uses_the_active_adapter_only():
    from peft import LoraConfig as PeftLoraConfig

    peft = _peft_lm()
    peft.add_adapter("other", PeftLoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize_lora_b(peft, seed=7, std=0.2)  # both adapters' B random, each its own
    hf = peft.get_base_model()
    prompt = _prompt([7, 3, 5])
    greedy = SamplingConfig(max_new_tokens=6, **GREEDY)
    decoder = StaticDecoder(merge_lora=True)
    out = {}
    for name in ("default", "other"):
        peft.set_adapter(name)
        peft.eval()
        ids, _, logp = StaticDecoder().sample(hf, prompt, 2, greedy, RULES)
        m_ids, _, m_logp = decoder.sample(hf, prompt, 2, greedy, RULES)
        assert torch.equal(m_ids, ids) and torch.allclose(m_logp, logp, atol=1e-5)
        out[name] = ids
    assert not torch.equal(out["default"], out["other"])


def test_merged_weights_are_refreshed_in_place_after_an_optimizer_step():
    peft = _peft_lm()
    hf = peft.get_base_model()
    prompt = _prompt([7, 3, 5])
    greedy = SamplingConfig(max_new_tokens=6, **GREEDY)
    decoder = StaticDecoder(merge_lora=True)
    ids, mask, _ = decoder.sample(hf, prompt, 3, greedy, RULES)
    version, pointers = decoder.merged.version, [b.data_ptr() for b in decoder.merged.buffers]
    run = decoder._run
    optimizer = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=20.0)
    lora_before = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    loss = -(sp.completion_logprobs(hf, prompt, ids, mask) * mask).sum()  # push away from today's tokens
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, lora_before[n]) for n, p in peft.named_parameters() if p.requires_grad)
    new_ids, new_mask, new_logp = decoder.sample(hf, prompt, 3, greedy, RULES)
    ref_ids, ref_mask, ref_logp = StaticDecoder().sample(hf, prompt, 3, greedy, RULES)
    assert torch.equal(new_ids, ref_ids) and torch.allclose(new_logp * ref_mask, ref_logp * ref_mask, atol=1e-5)
    assert not torch.equal(new_ids, ids)  # the step did move the greedy tokens: stale weights would show
    # in place: same buffers, same run (on CUDA the captured step goes on reading them)
    assert decoder.merged.version == version and [b.data_ptr() for b in decoder.merged.buffers] == pointers
    assert decoder._run is run


class _CountingGraph:
    """Stands in for a captured step on CPU: counts replays and runs the step eagerly."""

    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run.step()


def test_a_step_kept_for_one_lora_mode_is_never_replayed_in_the_other():
    from peft import LoraConfig as PeftLoraConfig

    peft = _peft_lm(target_modules=["q_proj", "v_proj"])
    hf = peft.get_base_model()
    prompt = _prompt([7, 3, 5])
    greedy = SamplingConfig(max_new_tokens=4, **GREEDY)
    decoder, graphs = StaticDecoder(), []

    def captured():  # as if the current run's step had been captured
        graphs.append(_CountingGraph(decoder._run))
        decoder._run.graph = graphs[-1]

    def replays():
        return [g.replays for g in graphs]

    expect = decoder.sample(hf, prompt, 2, greedy, RULES)[0]
    captured()
    for merged in (True, False, True):
        decoder.merge_lora = merged
        run, before = decoder._run, replays()
        decoder.sample(hf, prompt, 2, greedy, RULES)
        assert decoder._run is not run and replays() == before  # no step kept for the other mode was replayed
        captured()
        assert torch.equal(decoder.sample(hf, prompt, 2, greedy, RULES)[0], expect)
        assert graphs[-1].replays == 3  # the same mode (and buffers): the kept step is replayed
    # more LoRA layers (same model, same head): the buffers are reallocated, and the step captured over the old
    # ones is not replayed
    peft.add_adapter("more", PeftLoraConfig(r=2, target_modules=["o_proj"]))
    version, run, before = decoder.merged.version, decoder._run, replays()
    assert torch.equal(decoder.sample(hf, prompt, 2, greedy, RULES)[0], expect)  # "more" is not active
    assert decoder.merged.version == version + 1 and decoder._run is not run and replays() == before


def test_merged_rollouts_refuse_what_they_cannot_compute():
    prompt, sampling = _prompt([5, 3]), SamplingConfig(temperature=1.0, max_new_tokens=3)
    peft = _peft_lm(lora_dropout=0.1).train()
    with pytest.raises(ValueError, match="eval mode"):
        StaticDecoder(merge_lora=True).sample(peft.get_base_model(), prompt, 2, sampling, RULES)
    assert _no_patch_left(peft)
    peft.eval()
    StaticDecoder(merge_lora=True).sample(peft.get_base_model(), prompt, 2, sampling, RULES)  # eval: no dropout
    dora = _peft_lm(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        StaticDecoder(merge_lora=True).sample(dora.get_base_model(), prompt, 2, sampling, RULES)


def test_merge_lora_on_a_model_without_lora_changes_nothing():
    model = _text_lm()
    before = _snapshot(model)
    greedy = SamplingConfig(max_new_tokens=5, **GREEDY)
    ids = StaticDecoder().sample(model, _prompt([7, 3]), 2, greedy, RULES)[0]
    assert torch.equal(StaticDecoder(merge_lora=True).sample(model, _prompt([7, 3]), 2, greedy, RULES)[0], ids)
    _assert_bit_identical(model, before)


@pytest.mark.parametrize("kind", ["qwen2_audio", "kimi_audio"])
def test_audio_backbones_merged_rollouts_equal_unmerged_and_touch_no_weight(kind, tiny):
    bb = get_backbone(kind).from_pretrained(tiny.shared(kind))
    # dropout on, the model in training mode: generate must sample in eval mode; a module trained in full too
    apply_lora(bb, LoraConfig(r=4, alpha=8, dropout=0.1,
                              modules_to_save=["multi_modal_projector"] if kind == "qwen2_audio" else None))
    _randomize_lora_b(bb.model, seed=0, std=0.05)
    bb.model.train()
    examples = [audio_example(bb, i, noise(1.0 + 2 * i, i), ["dog bark", "siren", "rain"], 1) for i in range(2)]
    sampling = SamplingConfig(max_new_tokens=5, **GREEDY)
    before = _snapshot(bb.model)
    unmerged = bb.generate(bb.model, examples, 3, sampling, decoder=StaticDecoder())
    merged = bb.generate(bb.model, examples, 3, sampling, decoder=StaticDecoder(merge_lora=True))
    assert torch.equal(merged.completion_ids, unmerged.completion_ids)
    assert torch.equal(merged.completion_mask, unmerged.completion_mask)
    _assert_bit_identical(bb.model, before)
    assert bb.model.training and _no_patch_left(bb.model)


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
