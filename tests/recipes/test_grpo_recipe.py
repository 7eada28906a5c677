"""train/grpo.py run as users run it: ``deepspeed --num_gpus 2`` on CPU (gloo), from a tiny SFT adapter.

The tiny random model is nudged so that it answers with letters (its output layer favours ``A``..``E``
through one always-positive hidden dimension): a random model otherwise never names an option, every
group would score 0, and each round would be a no-op. The SFT adapter is random LoRA weights.
"""

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aqa.backbones import get_backbone
from aqa.backbones.lora import LoraConfig, apply_lora
from aqa.backbones.qwen2_audio_tiny import IM_END, build_tiny_qwen2_audio
from aqa.runtime.checkpoint import save_adapter
from aqa.runtime.logging import read_metrics
from tests.helpers import assert_files
from tests.recipes.launch import (
    cut_off_a_save,
    deepspeed,
    favour_letters,
    kill_points,
    python,
    run_with_kills,
    synth_data,
)

CONFIG = "configs/demo/qwen2_audio_grpo.yaml"
SFT_R = 4

pytestmark = pytest.mark.slow


def _letter_prone_tiny(out: Path) -> Path:
    model, processor = build_tiny_qwen2_audio(seed=0)
    favour_letters(model.model.language_model.embed_tokens, model.lm_head, processor.tokenizer, [*"ABCDE", IM_END])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.feature_extractor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model_dir = _letter_prone_tiny(root / "model")
    bb = get_backbone("qwen2_audio").from_pretrained(model_dir)
    apply_lora(bb, LoraConfig(r=SFT_R, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    sft_dir = save_adapter(bb.model, root / "sft" / "adapter")
    return {"root": root, "model": model_dir, "sft": sft_dir, "data": synth_data(root / "data"),
            "cache": root / "cache"}


def _args(setup, out: Path, *overrides: str) -> list[str]:
    """``train/grpo.py``'s arguments with a test's sizes."""
    return ["--config", CONFIG, f"model_path={setup['model']}", f"sft_adapter={setup['sft']}",
            f"data_dir={setup['data']}", f"output_dir={out}", f"cache_dir={setup['cache']}", "max_steps=4",
            "batch.per_device=4", "grpo.sampling.max_new_tokens=1", "logging.every_steps=1", "logging.report_to=[]",
            "eval.every_steps=0", "eval.limit=4", "checkpoint.every_steps=2", "progress=false",
            "finetune=lora", "lora.dropout=0.0", *overrides]  # the LoRA recipe; the demo's GRPO trains in full


def _run(setup, out: Path, *overrides: str, launcher=deepspeed, check=True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 train/grpo.py`` (or ``launcher=python``: one process) with a test's sizes."""
    return launcher("train/grpo.py", *_args(setup, out, *overrides), check=check, OMP_NUM_THREADS="1")


def _rows(run_dir: Path, kind="train"):
    return read_metrics(run_dir / "metrics.jsonl", kind=kind)


def _grpo_part(adapter_dir: Path) -> dict:
    """The GRPO half of each stacked tensor (rows/cols after the SFT rank)."""
    out = {}
    for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        out[key] = value[SFT_R:] if "lora_A" in key else value[:, SFT_R:]
    return out


def test_two_cpu_ranks_train_and_resume_after_a_kill(setup):
    full = setup["root"] / "full"
    res = _run(setup, full)  # checked: a failure shows the command and both output tails
    assert "2 rank(s) on cpu" in res.stdout
    rows = _rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    trained = [r for r in rows if r["noop"] == 0.0]
    assert trained, "every round was a no-op: the letter-prone model should earn some reward"
    for r in trained:
        assert isinstance(r["loss"], float) and abs(r["loss"]) < 1e3
        assert 0 <= r["clip_frac"] <= 1 and r["kl"] >= 0
    for key in ("reward_mean", "reward_std", "zero_std_frac", "completion_len"):
        assert all(key in r for r in rows)
    assert_files(full, "config.yaml", "ds_config.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "checkpoints/step_00000002/COMPLETE",
                 "checkpoints/step_00000004/adapter/adapter_config.json")

    # every GRPO LoRA tensor moved between step 2 and step 4; the SFT half is the SFT adapter, untouched
    mid, end = _grpo_part(full / "checkpoints/step_00000002/adapter"), _grpo_part(full / "adapter")
    assert mid.keys() == end.keys() and mid
    unchanged = [k for k in mid if torch.equal(mid[k], end[k])]
    assert not unchanged, unchanged
    sft = load_file(str(setup["sft"] / "adapter_model.safetensors"))
    stacked = load_file(str(full / "adapter/adapter_model.safetensors"))
    a_key = next(k for k in sft if "lora_A" in k)
    assert torch.equal(stacked[a_key][:SFT_R], sft[a_key])

    # killed after step 2 (as a preempted job), relaunched: continues the same run to the same weights
    resumed = setup["root"] / "resumed"
    _run(setup, resumed, "checkpoint.stop_at_step=2")
    assert [r["step"] for r in _rows(resumed)] == [1, 2]
    second = _run(setup, resumed)
    assert "resumed from step_00000002" in second.stdout
    assert [r["step"] for r in _rows(resumed)] == [1, 2, 3, 4]
    again = _grpo_part(resumed / "adapter")
    for key in end:
        assert torch.allclose(again[key], end[key], atol=1e-6), key
    assert [r["reward_mean"] for r in _rows(resumed)] == [r["reward_mean"] for r in rows]


def test_flat_rewards_make_logged_noop_rounds(setup):
    out = setup["root"] / "flat"
    # near-greedy sampling: the G answers of a question are identical, so every group has zero variance
    _run(setup, out, "max_steps=2", "grpo.sampling.temperature=0.0001", "optim.min_lr_ratio=0.0", launcher=python)
    rows = _rows(out)
    assert [r["noop"] for r in rows] == [1.0, 1.0] and all(r["zero_std_frac"] == 1.0 for r in rows)
    # no-signal rounds still step (the KL term alone), so the step count and the cosine move in lock-step
    assert [r["noop_rounds"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [1, 2]
    assert rows[0]["lr"] > rows[1]["lr"]
    assert (out / "adapter/adapter_model.safetensors").is_file()


def test_merged_lora_rollouts_train_the_adapter_the_lora_branch_trains(setup):
    """``grpo.rollout.merge_lora`` under the recipe (DeepSpeed, LoRA dropout on, one process, fp32): the merged
    rollouts sample the same tokens, so the run trains the same adapter as with the LoRA branch."""
    adapters = {}
    for merge in ("false", "true"):
        out = setup["root"] / f"merge_{merge}"
        _run(setup, out, "max_steps=3", "grpo.sampling.max_new_tokens=3", "lora.dropout=0.05",
             f"grpo.rollout.merge_lora={merge}", launcher=python)
        adapters[merge] = _grpo_part(out / "adapter")
        assert len(_rows(out)) == 3
    for key, value in adapters["false"].items():
        assert torch.allclose(adapters["true"][key], value, atol=1e-6), key


def test_training_in_question_chunks_trains_the_same_adapter(setup):
    """``batch.update_chunk`` on two CPU ranks: each rank's micro-batch of 10 questions is sampled at once, then
    scored and trained on in chunks of 2 (each one of DeepSpeed's micro-batches, 5 per micro-batch). A rank's 12
    questions per epoch make micro-batches of 10 and 2; the short one still makes 5 DeepSpeed micro-batches (three
    of them weighted 0), so every optimizer step ends where it should. The rollouts and the gradients are the whole
    batch's, so the run trains the same adapter."""
    adapters, rewards, norms = {}, {}, {}
    for chunk in ("null", "2"):
        out = setup["root"] / f"chunk_{chunk}"
        res = _run(setup, out, "max_steps=3", "grpo.sampling.max_new_tokens=3", "batch.per_device=10",
                   f"batch.update_chunk={chunk}")
        assert ("trained in chunks of 2" in res.stdout) == (chunk == "2")
        adapters[chunk] = _grpo_part(out / "adapter")
        rewards[chunk] = [r["reward_mean"] for r in _rows(out)]
        norms[chunk] = [r["grad_norm"] for r in _rows(out)]
        assert len(rewards[chunk]) == 3
    assert rewards["2"] == rewards["null"]  # the same rollouts, so the same policy at every step
    # Adam would hide a wrongly scaled gradient; its norm does not (the chunks' losses are averaged, not summed)
    assert any(n > 0 for n in norms["null"])
    assert norms["2"] == pytest.approx(norms["null"], rel=1e-3)  # fp32: the chunks sum in another order
    for key, value in adapters["null"].items():
        assert torch.allclose(adapters["2"][key], value, atol=1e-6), key
    assert any(bool(v.abs().sum() > 0) for k, v in adapters["2"].items() if "lora_B" in k)  # it did train


def test_missing_sft_adapter_is_a_clear_error(setup):
    res = _run(setup, setup["root"] / "bad", f"sft_adapter={setup['root'] / 'no_such_adapter'}", launcher=python,
               check=False)
    assert res.returncode != 0
    assert "Train SFT first" in res.stderr


def test_sigkill_anywhere_resumes_to_the_uninterrupted_adapter(setup):
    args = ("max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "eval.at_end=false")
    full = setup["root"] / "kill_reference"
    res = _run(setup, full, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    out = setup["root"] / "killed"
    cut: list[str] = []
    happened, final = run_with_kills("train/grpo.py", _args(setup, out, *args), out, kill_points(seed=5),
                                     before_final=lambda: cut.append(cut_off_a_save(out)))
    assert sum(h.split("@")[0] in ("step", "writing", "after") for h in happened) == 5, happened
    assert f"skipped {cut[0]}: cut off while being written" in final.stderr
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # the stacked SFT + GRPO adapter, as exported
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m} ({happened})")
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6], happened  # no duplicated or missing steps
