"""GRPO library: configs, the policy built from an SFT adapter, its reference, the stacked adapter export,
and one micro-batch of rollouts -> rewards -> advantages -> loss on a tiny Qwen2-Audio (one process)."""

import json

import numpy as np
import pytest
import torch

from aqa.backbones import get_backbone
from aqa.backbones.base import SamplingConfig
from aqa.backbones.chat_lm import eval_mode
from aqa.backbones.lora import AdapterError, LoraConfig, apply_lora
from aqa.config import ConfigError
from aqa.grpo.config import GRPOSection, engine_batch, load_grpo_config, total_rounds, total_steps
from aqa.grpo.engines import build_rollout_engine
from aqa.grpo.policy import (
    grpo_adapter_config,
    peft_model,
    policy_from_sft,
    reference,
    save_stacked_adapter,
)
from aqa.grpo.rollout import Group, is_noop_round, sample_group, score_groups
from aqa.grpo.step import group_loss, rollout_metrics
from aqa.rl.advantages import Advantages
from aqa.runtime.checkpoint import save_adapter
from aqa.runtime.engine import deepspeed_config
from aqa.runtime.recipe import crossed
from tests.helpers import audio_example, noise

REQUIRED = ["model_path=m", "sft_adapter=a", "data_dir=d", "output_dir=o"]


def _randomize_lora(model, seed, std=0.05):
    """As if trained: LoRA B away from zero, and full copies (modules_to_save) moved off the base weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def sft_dir(tiny_qwen2_audio, tmp_path_factory):
    bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    # as the demo SFT does: LoRA on the LM, the projector trained in full (saved inside the adapter)
    apply_lora(bb, LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["multi_modal_projector"]))
    _randomize_lora(bb.model, seed=1)
    return save_adapter(bb.model, tmp_path_factory.mktemp("sft") / "adapter")


def _examples(bb, n=3):
    rng = np.random.default_rng(0)
    choices = ["dog bark", "siren", "rain", "bell"]
    return [audio_example(bb, i, noise(1 + i, rng), choices[: 4 - i % 2], i % 2, "What is heard first?")
            for i in range(n)]


def _answer_logits(bb, model, examples):
    batch = bb.collate(examples)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# -- configs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["configs/qwen2_audio/grpo.yaml", "configs/demo/qwen2_audio_grpo.yaml"])
def test_shipped_configs_load(path):
    cfg = load_grpo_config(path)
    assert cfg.grpo.num_generations >= 2 and cfg.grpo.rewards["accuracy"] > 0


def test_report_recipe_values():
    cfg = load_grpo_config("configs/qwen2_audio/grpo.yaml")
    assert (cfg.optim.lr, cfg.epochs, cfg.batch.per_device, cfg.batch.gradient_accumulation) == (5e-6, 3, 8, 5)
    assert (cfg.grpo.num_generations, cfg.grpo.epsilon, cfg.grpo.beta) == (6, 0.2, 0.1)
    assert cfg.augment.shuffle_options.p == 1.0  # option order shuffled per group


@pytest.mark.parametrize("override,match", [
    ("grpo.num_generations=1", "num_generations"),
    ("grpo.sampling.temperature=0", "temperature"),
    ("grpo.epsilon=1.5", "epsilon"),
    ("grpo.rewards={acc: 1.0}", "Known rewards"),
    ("augment.spec_augment={num_masks: 2, max_width: 5, p: 0.5}", "spec_augment"),
])
def test_bad_config_fails_at_start(override, match):
    with pytest.raises(ConfigError, match=match):
        load_grpo_config(None, REQUIRED + [override])


def test_merge_lora_flows_from_the_config_to_the_static_engine():
    assert not load_grpo_config("configs/qwen2_audio/grpo.yaml").grpo.rollout.merge_lora  # the default: off
    assert not build_rollout_engine(load_grpo_config(None, REQUIRED).grpo.rollout).decoder.merge_lora
    cfg = load_grpo_config(None, REQUIRED + ["grpo.rollout.merge_lora=true"])
    assert build_rollout_engine(cfg.grpo.rollout).decoder.merge_lora
    for wrong in (["grpo.rollout.engine=eager"], ["finetune=full"]):  # no static decoder / no LoRA to merge
        with pytest.raises(ConfigError, match="merge_lora"):
            load_grpo_config(None, REQUIRED + ["grpo.rollout.merge_lora=true"] + wrong)


def test_deepspeed_geometry_from_per_device_and_accumulation():
    cfg = load_grpo_config("configs/qwen2_audio/grpo.yaml", ["batch.update_chunk=null"])
    ds = deepspeed_config(cfg.deepspeed_config, engine_batch(cfg, world_size=8), cfg.optim, 8, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 8 * 5 * 8


def test_update_chunks_are_deepspeed_micro_batches_and_must_divide_the_micro_batch():
    cfg = load_grpo_config("configs/qwen2_audio/grpo.yaml")
    assert (cfg.batch.per_device, cfg.batch.update_chunk) == (8, 4)  # the 7B recipe: sampled 8 at once, trained 4
    cfg = load_grpo_config("configs/qwen2_audio/grpo.yaml", ["batch.update_chunk=2"])
    ds = deepspeed_config(cfg.deepspeed_config, engine_batch(cfg, world_size=8), cfg.optim, 8, "bf16")
    # the same 8 x 5 questions per rank and step, in passes of 2: DeepSpeed averages 20 chunk losses
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 20
    assert ds["train_batch_size"] == 8 * 5 * 8
    for bad in ("3", "0"):
        with pytest.raises(ConfigError, match="update_chunk"):
            load_grpo_config(None, REQUIRED + [f"batch.update_chunk={bad}"])


def test_a_short_micro_batch_still_makes_every_chunk_and_its_weighted_loss_is_the_batchs():
    """``Group.split``: always ``parts`` chunks (DeepSpeed counts them to find the optimizer step), weighted so
    that their mean loss is the micro-batch's, for a full micro-batch, an uneven short one, and one with fewer
    questions than chunks."""
    from aqa.backbones.base import Rollout
    from aqa.backbones.shared_prefix import PromptBatch, left_pad
    from aqa.grpo.rollout import Group
    from aqa.rl.advantages import Advantages
    from aqa.rl.loss import grpo_loss

    g = torch.Generator().manual_seed(0)
    for n, parts in ((8, 2), (5, 2), (1, 2), (4, 5)):
        G, T = 3, 4
        ids, mask = left_pad([[7] * (2 + i) for i in range(n)], 0)
        rollout = Rollout([None] * n, PromptBatch(ids, mask), torch.zeros(n, G, T, dtype=torch.long),
                          torch.ones(n, G, T, dtype=torch.long), [["x"] * G] * n)
        f64 = torch.float64
        adv = Advantages(torch.randn(n, G, generator=g, dtype=f64), torch.zeros(n, dtype=torch.bool),
                         torch.zeros(n, G), 0.0)
        group = Group(rollout, torch.zeros(n, G), {}, adv, ref_logp=-torch.rand(n, G, T, generator=g, dtype=f64))
        logp = -torch.rand(n, G, T, generator=g, dtype=f64)

        def loss(rows: slice, part: Group, logp: torch.Tensor = logp) -> torch.Tensor:
            return grpo_loss(logp[rows], None, part.ref_logp, part.adv.values, part.rollout.completion_mask,
                             epsilon=0.2, beta=0.1)[0]

        split = group.split(parts)
        assert len(split) == parts
        sizes = [len(p.rollout.examples) for p, w in split if w > 0]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        chunked = sum(w * loss(slice(a, a + len(p.rollout.examples)), p)
                      for (p, w), a in zip([pw for pw in split if pw[1] > 0], starts)) / parts
        assert float(chunked) == pytest.approx(float(loss(slice(0, n), group)), rel=1e-12), (n, parts)
        assert [w for _, w in split].count(0.0) == max(0, parts - n)


def test_rounds_and_crossing():
    cfg = load_grpo_config(None, REQUIRED + ["epochs=2", "batch.gradient_accumulation=3"])
    assert total_rounds(cfg, micro_per_epoch=10) == 7  # ceil(2 * 10 / 3)
    assert total_steps(cfg, micro_per_epoch=10) == 7 * 1
    cfg = load_grpo_config(None, REQUIRED + ["max_steps=7", "grpo.num_iterations=2"])
    assert total_rounds(cfg, micro_per_epoch=10) == 4
    assert total_steps(cfg, micro_per_epoch=10) == 7  # optimizer steps, exactly: the 4th round takes one pass
    cfg = load_grpo_config(None, REQUIRED + ["epochs=1", "grpo.num_iterations=2", "batch.gradient_accumulation=5"])
    assert total_steps(cfg, micro_per_epoch=10) == 2 * 2
    assert crossed(10, 1, 5) and not crossed(9, 1, 5)
    assert crossed(11, 2, 5)  # 9 -> 11 passes 10 although 11 % 5 != 0
    assert not crossed(10, 1, 0)


def test_noop_round_needs_every_group_flat():
    def group(frac):
        adv = Advantages(torch.zeros(1, 2), torch.tensor([frac == 1.0]), torch.zeros(1, 2), frac)
        return Group(rollout=None, rewards=torch.zeros(1, 2), parts={}, adv=adv)

    assert is_noop_round([group(1.0), group(1.0)])
    assert not is_noop_round([group(1.0), group(0.5)])


# -- policy, reference, export -------------------------------------------------------------------------------
def test_reference_is_the_sft_model_and_stacked_adapter_is_exact(tiny_qwen2_audio, sft_dir, tmp_path):
    from peft import PeftModel

    bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    policy = policy_from_sft(bb, sft_dir, LoraConfig(r=2, alpha=6, dropout=0.0))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _randomize_lora(policy, seed=2)  # as if GRPO had trained it
    examples = _examples(bb)
    policy_logits = _answer_logits(bb, policy, examples)
    with reference(policy):
        ref_logits = _answer_logits(bb, policy, examples)

    sft_bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    sft_model = PeftModel.from_pretrained(sft_bb.model, str(sft_dir))
    assert torch.allclose(ref_logits, _answer_logits(sft_bb, sft_model, examples), atol=1e-5)
    assert not torch.allclose(ref_logits, policy_logits, atol=1e-3)  # the GRPO adapter matters

    state = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    out = save_stacked_adapter(sft_dir, state, grpo_adapter_config(policy), tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == 6
    assert config["modules_to_save"] == ["multi_modal_projector"]
    base = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    stacked = PeftModel.from_pretrained(base.model, str(out))  # plain PEFT on the base model
    assert torch.allclose(_answer_logits(base, stacked, examples), policy_logits, atol=1e-5)


def test_missing_or_foreign_sft_adapter_is_a_clear_error(tiny_qwen2_audio, tmp_path, tiny):
    bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    with pytest.raises(AdapterError, match="Train SFT first"):
        policy_from_sft(bb, tmp_path / "nowhere", LoraConfig())
    other_dir = tiny.shared("qwen2_audio", hidden_size=32, intermediate_size=64)
    other = get_backbone("qwen2_audio").from_pretrained(other_dir)
    apply_lora(other, LoraConfig(r=4))
    foreign = save_adapter(other.model, tmp_path / "foreign")
    with pytest.raises(AdapterError, match="another base"):
        policy_from_sft(bb, foreign, LoraConfig())


def test_grpo_adapter_goes_on_the_sft_layers_only(tiny_qwen2_audio, sft_dir):
    bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    with pytest.raises(AdapterError, match="lora.targets"):
        policy_from_sft(bb, sft_dir, LoraConfig(targets=["q_proj"]))
    with pytest.raises(AdapterError, match="modules_to_save"):
        policy_from_sft(bb, sft_dir, LoraConfig(modules_to_save=["audio_tower"]))


# -- one micro-batch -------------------------------------------------------------------------------------------
def test_one_group_samples_scores_and_gives_a_finite_loss_with_lora_gradients(tiny_qwen2_audio, sft_dir):
    bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    policy = policy_from_sft(bb, sft_dir, LoraConfig(r=2, alpha=4, dropout=0.0))
    _randomize_lora(policy, seed=3)
    section = GRPOSection(num_generations=4, num_iterations=2, rewards={"accuracy": 1.0, "format": 0.5},
                               sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=3))
    examples = _examples(bb)
    torch.manual_seed(0)
    group = sample_group(bb, policy, examples, section, build_rollout_engine(section.rollout))
    B, G, T = group.rollout.completion_ids.shape
    assert (B, G) == (3, 4) and group.rewards.shape == (3, 4) and group.adv.values.shape == (3, 4)
    score_groups(bb, policy, [group], section)
    assert group.ref_logp.shape == (B, G, T) and group.old_logp.shape == (B, G, T)
    mask = group.rollout.completion_mask.bool()
    assert not torch.allclose(group.ref_logp[mask], group.old_logp[mask])  # reference != policy
    group.adv.values = torch.tensor([[1.0, -1.0, 0.5, -0.5]] * 3)  # a random model rarely earns reward
    loss, stats = group_loss(bb, policy, group, section)
    assert torch.isfinite(loss) and stats.kl > 0 and stats.clip_frac == 0.0
    loss.backward()
    grads = {n: p.grad for n, p in peft_model(policy).named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    metrics = rollout_metrics([group])
    assert set(metrics) >= {"reward_mean", "reward_std", "zero_std_frac", "completion_len", "reward_accuracy"}


def test_merged_rollout_engine_samples_the_policy_and_leaves_its_weights(tiny_qwen2_audio, sft_dir):
    """``grpo.rollout.merge_lora`` through the engine the recipe builds: greedy rollouts equal the unmerged
    engine's, and the log-probs the loss reads afterwards are bit for bit what they were."""
    bb = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio)
    policy = policy_from_sft(bb, sft_dir, LoraConfig(r=2, alpha=4, dropout=0.05))
    _randomize_lora(policy, seed=3)
    policy.train()
    greedy = SamplingConfig(temperature=0.7, top_p=1e-9, max_new_tokens=4)
    section = GRPOSection(num_generations=3, sampling=greedy)
    examples = _examples(bb, n=2)
    unmerged = sample_group(bb, policy, examples, section, build_rollout_engine(section.rollout))
    with eval_mode(policy):  # no LoRA dropout, so two passes can be compared
        logp = bb.completion_logprobs(policy, unmerged.rollout).detach()
    section.rollout.merge_lora = True
    engine = build_rollout_engine(section.rollout)
    merged = sample_group(bb, policy, examples, section, engine)
    assert engine.decoder.merged is not None and engine.decoder.merged.buffers  # it did merge
    assert torch.equal(merged.rollout.completion_ids, unmerged.rollout.completion_ids)
    assert policy.training  # generate sampled in eval mode (dropout off) and put the policy back
    with eval_mode(policy):
        assert torch.equal(bb.completion_logprobs(policy, unmerged.rollout).detach(), logp)


def test_nonfinite_budget_is_finite_by_default_and_an_applied_nan_step_is_caught():
    from types import SimpleNamespace

    from aqa.runtime.nonfinite import confirm_skipped

    assert load_grpo_config(None, REQUIRED).max_nonfinite == 20  # a diverged run stops on its own
    engine = SimpleNamespace(skipped_steps=3)
    assert confirm_skipped(SimpleNamespace(skipped_steps=4), 3, nonfinite=1)  # DeepSpeed skipped it
    assert not confirm_skipped(engine, 3, nonfinite=0)
    with pytest.raises(RuntimeError, match="applied a step with non-finite gradients"):
        confirm_skipped(engine, 3, nonfinite=1)


def test_bf16_export_stays_within_bf16_rounding_of_the_trained_policy(tiny_qwen2_audio, sft_dir, tmp_path):
    """In bf16 the policy trains on the SFT adapter merged into rounded weights, while the exported stacked
    adapter sits on the unrounded base: measured here, the two differ by a few bf16 ulps of the answer logits
    (0.06 on logits of scale 3), far less than bf16 itself moves the same policy away from fp32 (about 2)."""
    from peft import PeftModel

    tiny_dir = tiny_qwen2_audio

    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        bb = get_backbone("qwen2_audio").from_pretrained(tiny_dir, dtype=dtype)
        policy = policy_from_sft(bb, sft_dir, LoraConfig(r=2, alpha=6, dropout=0.0))
        _randomize_lora(policy, seed=2)
        examples = _examples(bb)
        state = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        out = save_stacked_adapter(sft_dir, state, grpo_adapter_config(policy), tmp_path / str(dtype))
        base = get_backbone("qwen2_audio").from_pretrained(tiny_dir, dtype=dtype)
        stacked = PeftModel.from_pretrained(base.model, str(out))
        logits[dtype] = (_answer_logits(bb, policy, examples).float(), _answer_logits(base, stacked, examples).float())
    policy16, export16 = logits[torch.bfloat16]
    export_gap = float((policy16 - export16).abs().max())
    bf16_gap = float((policy16 - logits[torch.float32][0]).abs().max())
    scale = float(policy16.abs().max())
    assert export_gap <= 0.05 * scale and export_gap <= 0.25 * bf16_gap, (export_gap, bf16_gap, scale)
