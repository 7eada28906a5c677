"""The README's user commands after the demo: ``make demo`` (at smoke size), then ``make ensemble``,
``make sft``, ``make grpo`` and ``make infer`` with their default configs, in a fresh working directory.

A default config that points at a file the demo no longer writes (a renamed member, a moved output)
fails here, not in a user's terminal. ``configs/ensemble.yaml`` must list exactly the demo's members.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demo.run import build_members
from tests.recipes.launch import ROOT, recipe_env

# what `make` needs from the repository; the outputs (data/, runs/) land in the temporary directory
LINKED = ["Makefile", "pyproject.toml", "requirements.lock", "aqa", "configs", "data_prep", "train", "inference",
          "ensemble", "demo"]


def test_ensemble_config_lists_every_demo_member_where_the_demo_writes_it():
    cfg = yaml.safe_load((ROOT / "configs" / "ensemble.yaml").read_text(encoding="utf-8"))
    members = build_members(sys.executable, ["deepspeed"])
    assert [m["name"] for m in cfg["members"]] == [m.name for m in members]
    for entry, member in zip(cfg["members"], members):
        for split in ("dev", "eval"):
            assert entry[split] == f"{member.run_dir}/infer/{split}/predictions.jsonl"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("user")
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    make(work, "demo", "DEMO_ARGS=--smoke")
    return work


def make(work: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``make ARGS`` in ``work`` with this interpreter's environment as the venv (never rebuilt here)."""
    venv = Path(sys.prefix)
    stamp = venv / ".installed"
    cmd = ["make", "--no-print-directory", f"VENV={venv}", "-o", str(stamp), *args]
    env = recipe_env()
    env.pop("PYTHONPATH")  # the Makefile sets it to the working directory
    proc = subprocess.run(cmd, cwd=work, env={**env, "MAKEFLAGS": ""}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_make_ensemble_fuses_every_demo_member(demo_dir):
    report = json.loads((demo_dir / "runs/demo/report.json").read_text(encoding="utf-8"))
    demo_members = [m["name"] for m in report["members"]]
    assert len(demo_members) == 5  # qwen2_audio SFT and GRPO, kimi_audio, qwen2_5_omni, the cascade
    (demo_dir / "runs/demo/ensemble/ensemble.json").unlink()
    make(demo_dir, "ensemble")
    fitted = json.loads((demo_dir / "runs/demo/ensemble/ensemble.json").read_text(encoding="utf-8"))
    assert fitted["members"] == demo_members
    assert len(fitted["weights"]) == len(demo_members)
    assert (demo_dir / "runs/demo/ensemble/submission.csv").is_file()


@pytest.mark.slow
def test_make_sft_and_grpo_continue_the_demo_runs(demo_dir):
    # GRPO first: it starts from the SFT model the demo wrote, which `make sft` then moves on
    for target, run in (("grpo", "qwen2_audio_grpo"), ("sft", "qwen2_audio_sft")):
        make(demo_dir, target, "ARGS=max_steps=3 eval.every_steps=0 checkpoint.every_steps=0 progress=false")
        lines = [json.loads(x) for x in (demo_dir / f"runs/demo/{run}/metrics.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in lines if x.get("kind", "train") == "train" and "step" in x]
        assert steps and max(steps) == 3, (target, steps)  # resumed from the demo's step 2 and ran one more
        assert (demo_dir / f"runs/demo/{run}/model/model.safetensors").is_file()  # the demo fine-tunes it in full


@pytest.mark.slow
def test_make_infer_scores_dev_with_the_default_config(demo_dir):
    out = demo_dir / "runs/demo/qwen2_audio_sft/infer/dev"
    for name in ("predictions.jsonl", "metrics.json", "submission.csv"):
        (out / name).unlink()
    make(demo_dir, "infer")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 24  # the smoke demo's dev split
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["weighted_mean"] >= 0
    assert len((out / "submission.csv").read_text().splitlines()) == 25  # header + one row per question


@pytest.mark.slow
def test_demo_report_shows_eval_intervals_and_the_audio_floors(demo_dir):
    report = json.loads((demo_dir / "runs/demo/report.json").read_text(encoding="utf-8"))
    floor = report["text_only_floor"]["eval"]
    assert floor["n"] == 24 and floor["interval"][0] <= floor["weighted_mean"] <= floor["interval"][1]
    for m in report["members"]:
        ev = m["metrics"]["eval"]
        assert ev["n"] == 24 and ev["interval"][0] <= ev["weighted_mean"] <= ev["interval"][1]
        assert 0 < m["chance"]["eval"] < 1
        if m["name"] != "cascade_grpo":  # the cascade reads events; its floor is the text-only one
            assert m["silent_audio"]["eval"]["n"] == 24
        orders = m["orders"]["eval"]  # the same questions in 8 option orders
        assert orders["orders"] == 8 and orders["mean_over_orders"]["n"] == 24
        assert orders["strict"]["weighted_mean"] <= orders["mean_over_orders"]["weighted_mean"]
    assert report["text_only_floor"]["eval_orders"]["mean_over_orders"]["n"] == 24
    text = (demo_dir / "runs/demo/report.md").read_text(encoding="utf-8")
    assert "## Eval accuracy (%) in shuffled option orders, against the floors" in text
    assert text.count("| text-only floor |") == 1
    assert "| **ensemble** (fitted on dev) |" in text
    (grpo,) = report["grpo_vs_sft"]  # the Qwen2-Audio GRPO member beside its SFT start
    assert (grpo["grpo"], grpo["sft"], grpo["n"]) == ("qwen2_audio_grpo", "qwen2_audio_sft", 24)
    assert "## GRPO against its SFT start" in text


@pytest.mark.slow
def test_each_backbone_starts_from_its_option_reading_model(demo_dir):
    """The option-reading stage wrote a plain HF directory per backbone, and the SFT runs loaded it as their base."""
    for run in ("qwen2_audio_reading", "qwen2_5_omni_reading", "text_llm_reading"):
        assert (demo_dir / f"runs/demo/{run}/model/config.json").is_file(), run
    assert not (demo_dir / "runs/demo/kimi_audio_reading").exists()  # Kimi-Audio's stage did not learn: none
    assert len((demo_dir / "data/demo_reading/train.jsonl").read_text().splitlines()) == 64  # the smoke size
    report = json.loads((demo_dir / "runs/demo/report.json").read_text(encoding="utf-8"))
    assert [(r["backbone"], r["stage"]) for r in report["option_reading"]] == [
        ("qwen2_5_omni", "reading"), ("qwen2_audio", "reading"), ("text_llm", "reading")]
    assert all(r["n"] == 16 and 0 < r["chance"] < 1 for r in report["option_reading"])  # the smoke's 16 dev questions
    assert "## Option-reading stage" in (demo_dir / "runs/demo/report.md").read_text(encoding="utf-8")
    for run in ("qwen2_audio_sft", "kimi_audio_sft", "qwen2_5_omni_sft", "cascade_sft"):
        cfg = yaml.safe_load((demo_dir / f"runs/demo/{run}/config.yaml").read_text(encoding="utf-8"))
        base = {"cascade_sft": "runs/demo/text_llm_reading/model", "kimi_audio_sft": "runs/demo/models/kimi_audio"}.get(
            run, f"runs/demo/{run.replace('_sft', '_reading')}/model")
        assert cfg["model_path"] == base and cfg["augment"]["shuffle_options"]["p"] == 1.0
