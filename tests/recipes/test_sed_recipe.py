"""The real recipe: ``deepspeed --num_gpus 2 train/sed.py --config configs/demo/cascade_sed.yaml ...`` on CPU (gloo)
over a small synthetic data set and a tiny random-init BEATs; then a stop at step 2 and a resume to 4 that
must give the weights of the uninterrupted run."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aqa.runtime.logging import read_metrics
from aqa.sed.weights import load_sed_dir
from tests.helpers import assert_files
from tests.recipes.launch import deepspeed, run_once, synth_data

pytestmark = pytest.mark.slow

CONFIG = "configs/demo/cascade_sed.yaml"
STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from aqa.sed.tiny import main as tiny

    root = tmp_path_factory.mktemp("sed_recipe")
    raw = synth_data(root / "data") / "raw"
    assert tiny(["--out", str(root / "init"), "--labels", str(raw / "mid_to_display_name.tsv"),
                 "--drop", "Environmental noise"]) == 0
    return {"root": root, "data": root / "data", "init": root / "init"}


def launch(assets, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The user's command with a test's sizes; CPU even where a GPU exists."""
    d, raw = assets["data"], assets["data"] / "raw"
    return deepspeed("train/sed.py", "--config", CONFIG, f"init_from={assets['init']}", f"output_dir={out}",
                     f"cache_dir={assets['root'] / 'cache'}", f"data.train_manifest={d / 'train.jsonl'}",
                     f"data.train_tsv={raw / 'strong_train.tsv'}", f"data.dev_manifest={d / 'dev.jsonl'}",
                     f"data.dev_tsv={raw / 'strong_dev.tsv'}", f"max_steps={STEPS}", "batch.global_size=8",
                     "batch.micro_size=2", "optim.warmup_steps=1", "eval.every_steps=2", "checkpoint.every_steps=2",
                     "checkpoint.keep_last=null", "logging.every_steps=1", "progress=false", *extra)


full_run = run_once(launch)


def test_recipe_trains_every_tensor_and_writes_a_sed_directory(full_run, assets):
    assert_files(full_run, "config.yaml", "ds_config.json", "metrics.jsonl", "model/config.json",
                 "model/model.safetensors", "model/labels.json")
    ds = json.loads((full_run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 2
    steps = sorted(p.name for p in (full_run / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000004"]

    train = read_metrics(full_run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in train)
    evals = read_metrics(full_run / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [2, 4] and all(r["rows"] > 0 and math.isfinite(r["loss"]) for r in evals)

    model, labels = load_sed_dir(full_run / "model")
    assert len(labels) == 8 and "Environmental noise" not in labels.names
    before = load_file(assets["init"] / "model.safetensors")
    after = load_file(full_run / "model" / "model.safetensors")
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"tensors that did not train: {unchanged}"
    # the shared relative-position table is written under every layer's key, all equal
    tables = [after[k] for k in after if k.endswith("relative_attention_bias.weight")]
    assert len(tables) == model.cfg.encoder_layers and all(torch.equal(t, tables[0]) for t in tables)


def test_stop_and_resume_gives_the_uninterrupted_weights(full_run, assets):
    out = assets["root"] / "resumed"
    first = launch(assets, out, "checkpoint.stop_at_step=2")
    assert not (out / "checkpoints" / "step_00000004").exists(), first.stdout[-2000:]
    second = launch(assets, out)
    assert "resumed from step_00000002" in second.stdout
    a = load_file(full_run / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", kind="train")]
    assert steps == [1, 2, 3, 4]
