"""aqa.sft: batch geometry, the schedule, the DeepSpeed config, the configs on disk, the resumable
micro-batch stream, the non-finite policy, and one real DeepSpeed engine (one process, gloo)."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aqa.config import ConfigError
from aqa.data.dataset import ShardedSampler, require_answers
from aqa.eval.dev import evaluate
from aqa.runtime import distributed
from aqa.runtime.checkpoint import TrainState, check_run_dir
from aqa.runtime.engine import (
    accumulation_steps,
    build_engine,
    build_optimizer,
    cosine_with_warmup,
    deepspeed_config,
    model_dtype,
    resolve_precision,
    total_steps,
    warmup_steps,
)
from aqa.runtime.loaders import micro_batches, micro_batches_per_epoch, move_batch, train_loader
from aqa.runtime.nonfinite import NonFiniteLoss, check_loss, confirm_skipped
from aqa.sft.config import load_sft_config
from aqa.sft.step import sft_loss
from tests.helpers import ROOT, noise, record, write_wave

ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"


def _cfg(*overrides):
    return load_sft_config(None, ["model_path=m", "data_dir=d", "output_dir=o", f"deepspeed_config={ZERO2}",
                                      *overrides])


def test_accumulation_splits_the_global_batch():
    assert accumulation_steps(32, 4, 8) == 1  # the report: 8 GPUs x 4
    assert accumulation_steps(32, 2, 2) == 8
    with pytest.raises(ConfigError, match="multiple of"):
        accumulation_steps(30, 4, 2)


def test_cosine_with_warmup_by_hand():
    f = cosine_with_warmup
    assert [f(s, 2, 10) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(6, 2, 10) == pytest.approx(0.5)  # half way through the cosine
    assert f(10, 2, 10) == pytest.approx(0.0)
    assert f(6, 2, 10, min_ratio=0.1) == pytest.approx(0.55)
    assert f(50, 2, 10, min_ratio=0.1) == pytest.approx(0.1)  # stays at the floor past the end
    assert f(0, 0, 4) == pytest.approx(1.0)


def test_optimizer_and_schedule_follow_the_optim_section():
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    cfg = _cfg("optim.lr=0.1", "optim.warmup_steps=1", "optim.weight_decay=0.01").optim
    optimizer, scheduler = build_optimizer(model, cfg, total=5)
    assert [p.shape for p in optimizer.param_groups[0]["params"]] == [model.weight.shape]  # frozen bias left out
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * cosine_with_warmup(s, 1, 5) for s in range(5)]
    assert lrs == pytest.approx(expected)
    model.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="LoRA was not applied"):
        build_optimizer(model, cfg, total=5)


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(_cfg("epochs=8"), micro_per_epoch=10, accumulation=2) == 40
    assert total_steps(_cfg("epochs=0.5"), micro_per_epoch=10, accumulation=2) == 3
    assert total_steps(_cfg("epochs=8", "max_steps=7"), micro_per_epoch=10, accumulation=2) == 7
    assert micro_batches_per_epoch(ShardedSampler(10, rank=1, world_size=2), 2) == 3
    assert warmup_steps(_cfg("optim.warmup_ratio=0.1").optim, 40) == 4
    assert warmup_steps(_cfg("optim.warmup_ratio=0.1", "optim.warmup_steps=7").optim, 40) == 7


def test_config_checks_fail_at_start_with_the_key():
    with pytest.raises(ConfigError, match="batch.micro_size"):
        _cfg("batch.micro_size=0")
    with pytest.raises(ConfigError, match="max_steps"):
        _cfg("max_steps=0")
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        _cfg("max_step=3")
    with pytest.raises(ConfigError, match="nonfinite_loss"):
        _cfg("nonfinite_loss=ignore")


def _ds_config(path, cfg, world_size, precision):
    return deepspeed_config(path, cfg.batch, cfg.optim, world_size, precision)


def test_deepspeed_config_is_filled_from_the_recipe(tmp_path):
    ds = _ds_config(ZERO2, _cfg("batch.global_size=32", "batch.micro_size=4", "optim.grad_clip=0.5"),
                              world_size=8, precision="bf16")
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2
    assert "auto" not in str(ds)
    fp32 = _ds_config(ZERO2, _cfg("batch.global_size=8", "batch.micro_size=2"), 2, "fp32")
    assert fp32["bf16"]["enabled"] is False and fp32["gradient_accumulation_steps"] == 2

    fixed = tmp_path / "fixed.json"
    fixed.write_text('{"train_batch_size": 64, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="write \"auto\""):
        _ds_config(fixed, _cfg("batch.global_size=32"), 8, "bf16")
    with_opt = tmp_path / "opt.json"
    with_opt.write_text('{"optimizer": {"type": "AdamW"}}')
    with pytest.raises(ConfigError, match="optim section"):
        _ds_config(with_opt, _cfg(), 1, "fp32")
    with pytest.raises(ConfigError, match="does not exist"):
        _ds_config(tmp_path / "none.json", _cfg(), 1, "fp32")


def test_the_shipped_configs_load():
    report = load_sft_config(ROOT / "configs" / "qwen2_audio" / "sft.yaml")
    assert report.optim.lr == 5e-5 and report.epochs == 8 and report.batch.global_size == 32
    assert report.lora.r == 8 and report.precision in ("auto", "bf16") and not report.lora.include_audio
    assert accumulation_steps(report.batch.global_size, report.batch.micro_size, 8) >= 1
    assert Path(ROOT / report.deepspeed_config).name == "zero2.json"
    demo = load_sft_config(ROOT / "configs" / "demo" / "qwen2_audio_sft.yaml",
                               ["output_dir=elsewhere", "max_steps=3", "model_path=tiny"])
    assert (demo.output_dir, demo.max_steps, demo.model_path) == ("elsewhere", 3, "tiny")
    accumulation_steps(demo.batch.global_size, demo.batch.micro_size, 2)  # the demo runs on 2 ranks


def test_precision_and_batch_moves():
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("bf16", torch.device("cpu"))
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "input_features": torch.ones(2, 4)}
    moved = move_batch(batch, torch.device("cpu"), torch.bfloat16)
    assert moved["input_ids"].dtype == torch.long and moved["input_features"].dtype == torch.bfloat16


class Items(torch.utils.data.Dataset):
    """Names what the sampler asked for, so a stream can be compared item by item."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        epoch, index = item
        return f"{epoch}:{index}"


def _stream(state, n=10, micro=4, rank=0, world=1):
    sampler = ShardedSampler(n, rank=rank, world_size=world, seed=3)
    loader = train_loader(Items(n), sampler, micro, 0, list)
    return micro_batches(loader, sampler, state)


@pytest.mark.parametrize("world", [1, 2])
def test_micro_batch_stream_resumes_exactly_at_any_cut(world):
    fresh = TrainState()
    stream = _stream(fresh, world=world, rank=world - 1)
    batches, states = [], []
    for _ in range(8):  # several epochs: 10 items in micro-batches of 4 (4, 4, 2 per epoch on one rank)
        batches.append(next(stream))
        states.append((fresh.epoch, fresh.consumed))
    assert {epoch for epoch, _ in states} >= {0, 1, 2}  # cuts fall mid-epoch and exactly at epoch ends
    assert (0, 10 // world) in states
    for cut in range(len(batches)):
        epoch, consumed = states[cut]
        resumed = _stream(TrainState(epoch=epoch, consumed=consumed), world=world, rank=world - 1)
        assert [next(resumed) for _ in range(len(batches) - cut - 1)] == batches[cut + 1:]


def test_check_loss_policies_without_a_process_group():
    finite, nan = torch.tensor(1.5), torch.tensor(float("nan"))
    assert check_loss(finite, ["a"], "stop", 0, None, 0) is False
    assert check_loss(torch.tensor(float("inf")), ["a"], "skip", 0, None, 0) is True
    with pytest.raises(NonFiniteLoss, match=r"step 5 on the batch \['q1', 'q2'\]"):
        check_loss(nan, ["q1", "q2"], "stop", 0, None, 4)
    assert check_loss(nan, ["q"], "skip", 1, 2, 0) is True
    with pytest.raises(NonFiniteLoss, match="max_nonfinite=2"):
        check_loss(nan, ["q"], "skip", 2, 2, 0)


def test_run_dir_and_answer_checks(tmp_path):
    from aqa.data.manifest import Manifest, Record

    check_run_dir(tmp_path, None, "none")  # empty dir: fine
    ck = tmp_path / "checkpoints" / "step_00000004"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("4\n")
    with pytest.raises(ConfigError, match="resume=auto"):
        check_run_dir(tmp_path, None, "none")
    records = [Record(id="e1", part="bqa", split="eval", audio="a.wav", question="q?", choices=["x", "y"],
                      answer=None)]
    with pytest.raises(ConfigError, match="e1"):
        require_answers(Manifest(path=tmp_path / "eval.jsonl", audio_root=tmp_path, records=records))


# -- one real engine --------------------------------------------------------------------------------------
@pytest.fixture
def one_rank_world(monkeypatch):
    """A one-process gloo world for DeepSpeed, torn down afterwards so other tests see no process group."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    info = distributed.init()
    yield info
    distributed.cleanup()


def _dataset(tmp_path, backbone, n=4, seed=0):
    """``n`` answered questions over real WAV files, features from a real feature cache."""
    from aqa.data.cache import build_feature_cache
    from aqa.data.dataset import QADataset
    from aqa.data.manifest import Manifest

    rng = np.random.default_rng(seed)
    audio = tmp_path / "audio"
    records = []
    for i in range(n):
        write_wave(audio / f"c{i}.wav", noise(1.0, rng))
        records.append(record(i, part="bqa" if i % 2 else "cqa", question="Which sound is heard?",
                              choices=["dog", "cat", "bird"], answer=["dog", "cat", "bird"][i % 3]))
    manifest = Manifest(path=tmp_path / "dev.jsonl", audio_root=audio, records=records)
    cache = build_feature_cache(manifest, tmp_path / "cache", backbone.extract_features,
                                backbone.feature_settings(), progress=False)
    return QADataset(manifest, cache)


def _lora(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def test_nonfinite_step_is_skipped_by_the_engine_and_finite_steps_train(tmp_path, one_rank_world, tiny_qwen2_audio):
    from aqa.backbones import get_backbone
    from aqa.backbones.lora import apply_lora

    torch.manual_seed(0)
    device = one_rank_world.device
    precision = resolve_precision("auto", device)  # fp32 on CPU; on a GPU machine bf16, as the recipe runs
    dtype = model_dtype(precision)
    backbone = get_backbone("qwen2_audio").from_pretrained(tiny_qwen2_audio, device=device, dtype=dtype)
    cfg = _cfg("batch.global_size=2", "batch.micro_size=1", "optim.lr=0.01", "lora.dropout=0.0")
    model = apply_lora(backbone, cfg.lora)
    engine, _, ds = build_engine(model, cfg.deepspeed_config, cfg.batch, cfg.optim, 1, precision, total=10)
    assert ds["gradient_accumulation_steps"] == 2
    dev = _dataset(tmp_path, backbone)
    good = [dev[i] for i in range(len(dev))]
    broken = copy.deepcopy(good[0])
    broken.id = "broken"
    broken.features["input_features"] = np.full_like(broken.features["input_features"], np.nan)
    state = TrainState()

    def step(batches, policy="skip"):
        """One optimizer step exactly as train/sft.py runs it: forward, the non-finite check, backward and
        DeepSpeed's step per micro-batch, then the check that a non-finite window was really skipped."""
        stats = SimpleNamespace(loss_sum=0.0, finite=0, nonfinite=0)
        skipped_before = engine.skipped_steps
        for examples in batches:
            loss = sft_loss(backbone, engine, examples, device, dtype)
            if check_loss(loss, [e.id for e in examples], policy, state.nonfinite_steps, None, engine.global_steps):
                state.nonfinite_steps += 1
                stats.nonfinite += 1
            else:
                stats.loss_sum += loss.item()
                stats.finite += 1
            engine.backward(loss)
            engine.step()
        stats.skipped = confirm_skipped(engine, skipped_before, stats.nonfinite)
        return stats

    before = _lora(engine)
    stats = step([[good[1]], [broken]])  # one bad micro-batch in the window: the whole step is skipped
    assert stats.skipped and stats.nonfinite == 1 and stats.finite == 1 and state.nonfinite_steps == 1
    assert engine.global_steps == 1 and engine.skipped_steps == 1
    after_skip = _lora(engine)
    assert all(torch.equal(before[k], after_skip[k]) for k in before)
    stats = step([[good[2]], [good[3]]])
    assert not stats.skipped and math.isfinite(stats.loss_sum) and stats.finite == 2
    trained = _lora(engine)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(after_skip[k], trained[k]) for k in trained)
    with pytest.raises(NonFiniteLoss, match="broken"):
        step([[broken], [good[0]]], policy="stop")

    metrics = evaluate(backbone, engine.module, dev, batch_size=3)
    assert metrics["n"] == 4 and set(metrics) >= {"acc_bqa", "acc_cqa", "arithmetic_mean"}
    by_hand = [int(backbone.option_logits(engine.module, [ex])[0][0].argmax()) == ex.answer_index for ex in good]
    assert metrics["accuracy"] == pytest.approx(sum(by_hand) / 4)
    assert metrics["acc_bqa"] == pytest.approx((by_hand[1] + by_hand[3]) / 2)
