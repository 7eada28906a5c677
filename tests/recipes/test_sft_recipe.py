"""The real recipe: ``deepspeed --num_gpus 2 train/sft.py --config configs/demo/qwen2_audio_sft.yaml ...`` on
CPU (gloo) over a tiny synthetic data set and a tiny random-init Qwen2-Audio; then a stop at step k and a
resume to 2k that must give the adapter of the uninterrupted 2k run."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aqa.runtime.logging import read_metrics
from tests.helpers import assert_files
from tests.recipes.launch import cut_off_a_save, deepspeed, kill_points, run_once, run_with_kills, synth_data

pytestmark = pytest.mark.slow

CONFIG = "configs/demo/qwen2_audio_sft.yaml"
# the LoRA recipe (the 7B configs'): the demo's own SFT of the tiny model trains in full
LORA = ["finetune=lora", "full.include_audio=false", "lora.modules_to_save=[audio_tower,multi_modal_projector]"]
STEPS = 4  # 2k, with k = 2: 4 optimizer steps of 8 questions cross the 24-question epoch once


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_qwen2_audio):
    root = tmp_path_factory.mktemp("sft_recipe")
    return {"root": root, "model": tiny_qwen2_audio, "data": synth_data(root / "data")}


def sft_args(assets, out: Path, *extra: str) -> list[str]:
    """``train/sft.py``'s arguments with the sizes of a test."""
    return ["--config", CONFIG, f"model_path={assets['model']}", f"data_dir={assets['data']}",
            f"output_dir={out}", f"cache_dir={assets['root'] / 'cache'}", f"max_steps={STEPS}",
            "batch.global_size=8", "batch.micro_size=2", "optim.warmup_steps=1", "eval.every_steps=2",
            "eval.limit=8", "checkpoint.every_steps=2", "logging.every_steps=1", "progress=false", *LORA, *extra]


def launch(assets, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The user's command, with the sizes of a test; CPU even where a GPU exists."""
    return deepspeed("train/sft.py", *sft_args(assets, out, *extra))


full_run = run_once(launch)


def test_recipe_trains_every_lora_tensor_and_writes_the_run_dir(full_run, assets):
    assert_files(full_run, "config.yaml", "ds_config.json", "metrics.jsonl",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "wandb_id.txt")
    ds = json.loads((full_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU, chosen automatically
    steps = sorted(p.name for p in (full_run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000004"]
    for rank in range(2):
        assert (full_run / "checkpoints" / "step_00000004" / f"train_state_rank{rank}.json").is_file()

    train = read_metrics(full_run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in train)
    assert all(r["nonfinite"] == 0 and r["skipped_steps"] == 0 for r in train)
    evals = read_metrics(full_run / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [2, 4] and all(r["n"] == 8 for r in evals)

    final = load_file(full_run / "adapter" / "adapter_model.safetensors")
    mid = load_file(full_run / "checkpoints" / "step_00000002" / "adapter" / "adapter_model.safetensors")
    assert final and set(final) == set(mid)
    lora = [k for k in final if ".lora_A." in k or ".lora_B." in k]
    assert lora and all("language_model" in k for k in lora)  # LoRA sits on the language model only
    cfg = yaml.safe_load((full_run / "config.yaml").read_text())
    in_full = cfg["lora"]["modules_to_save"] or []
    assert all(any(f".{m}." in k for m in in_full) for k in set(final) - set(lora))  # the rest: as configured
    for key, value in final.items():
        assert torch.isfinite(value).all(), key
        assert not torch.equal(value, mid[key]), f"{key} did not change between steps 2 and 4"
        if ".lora_B." in key:  # LoRA B starts at exactly zero
            assert value.abs().sum() > 0, f"{key} never left its zero init"


def test_adapter_loads_with_plain_peft(full_run, assets):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import Qwen2AudioForConditionalGeneration

    base = Qwen2AudioForConditionalGeneration.from_pretrained(assets["model"])
    model = PeftModel.from_pretrained(base, str(full_run / "adapter"))
    saved = load_file(full_run / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_stop_then_resume_equals_the_uninterrupted_run(full_run, assets):
    out = assets["root"] / "resumed"
    first = launch(assets, out, f"checkpoint.stop_at_step={STEPS // 2}")
    assert "step 2/4" in first.stdout
    assert not (out / "checkpoints" / "step_00000004").exists()
    second = launch(assets, out)  # checkpoint.resume is auto in the config
    assert "resumed from step_00000002" in second.stdout

    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(full_run / "adapter" / "adapter_model.safetensors")
    assert set(resumed) == set(uninterrupted)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0)
    train = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # each step once across the two invocations
    full = read_metrics(full_run / "metrics.jsonl", kind="train")
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in full], abs=1e-6)


KILL_ARGS = ("max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "eval.every_steps=0",
             "eval.at_end=false", "logging.report_to=[]")


def test_sigkill_anywhere_resumes_to_the_uninterrupted_adapter(assets):
    full = assets["root"] / "kill_reference"
    launch(assets, full, *KILL_ARGS)
    out = assets["root"] / "killed"
    cut: list[str] = []
    happened, final = run_with_kills("train/sft.py", sft_args(assets, out, *KILL_ARGS), out, kill_points(seed=3),
                                     before_final=lambda: cut.append(cut_off_a_save(out)))
    assert sum(h.split("@")[0] in ("step", "writing", "after") for h in happened) == 5, happened
    assert f"skipped {cut[0]}: cut off while being written" in final.stderr  # never loaded, and said so
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m} ({happened})")
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", kind="train")]
    assert steps == [1, 2, 3, 4, 5, 6], (steps, happened)  # no duplicated or missing steps
