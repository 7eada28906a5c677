"""The cascade's answerer trained as users train it: ``deepspeed --num_gpus 2 train/sft.py`` then
``train/grpo.py`` with the demo cascade configs on CPU (gloo), then ``inference/run.py``, over a tiny
events manifest made here. Its audio files do not exist: the text LLM must never try to read them.

The base model is the tiny random text LLM, nudged so that it answers with letters (one always-positive
hidden dimension feeds the output rows of ``A``..``D``): otherwise a few SFT steps leave it naming no
option, every GRPO group scores 0 and each round is a no-op.
"""

import json
import math
import random
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from aqa.backbones.text_llm_tiny import IM_END, build_tiny_text_llm
from aqa.data.manifest import Record, write_dataset_info, write_jsonl
from aqa.runtime.logging import read_metrics
from tests.helpers import assert_files
from tests.recipes.launch import deepspeed, favour_letters, python

pytestmark = pytest.mark.slow

SOUNDS = ["Dog bark", "Siren", "Rain", "Bell", "Engine hum"]


def _events_split(split: str, n: int, rng: random.Random) -> list[Record]:
    """"Which is heard first?" questions whose answer the events give away."""
    records = []
    for i in range(n):
        labels = rng.sample(SOUNDS, 3)
        onsets = sorted(round(rng.uniform(0.0, 4.0), 2) for _ in labels)
        events = [{"label": lab, "onset": on, "offset": round(on + 0.5, 2), "score": round(rng.uniform(0.3, 1.0), 2)}
                  for lab, on in zip(labels, onsets)]
        choices = sorted(labels)
        records.append(Record(id=f"{split}_{i:03d}", part="tsqa", split=split, audio=f"{split}_{i:03d}.wav",
                              question="Which sound is heard first?", choices=choices, answer=labels[0],
                              meta={"events": events if i % 5 else []}))  # some clips with no events
    return records


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    model, tok = build_tiny_text_llm(seed=0)
    favour_letters(model.model.embed_tokens, model.lm_head, tok, [*"ABCD", IM_END])
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "events"
    rng = random.Random(0)
    for split, n in (("train", 24), ("dev", 8)):
        write_jsonl(data / f"{split}.jsonl", _events_split(split, n, rng))
    write_dataset_info(data, root / "audio_that_does_not_exist", source="sed_events")
    return {"root": root, "model": root / "model", "data": data}


# the LoRA recipe (configs/cascade/*.yaml's); the demo's own cascade SFT and GRPO of the tiny text LLM train in full
LORA_SFT = ["finetune=lora", "lora.r=16", "lora.alpha=32", "lora.modules_to_save=[embed_tokens,lm_head]"]
LORA_GRPO = ["finetune=lora", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0"]


def launch(script: str, config: str, *overrides: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """The user's command (``deepspeed --num_gpus N script --config ...``), CPU even where a GPU exists."""
    return deepspeed(script, "--config", config, "logging.report_to=[]", "logging.every_steps=1", "progress=false",
                     *overrides, ranks=ranks, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def sft_run(assets):
    out = assets["root"] / "sft"
    proc = launch("train/sft.py", "configs/demo/cascade_sft.yaml", f"model_path={assets['model']}",
                  f"data_dir={assets['data']}", f"output_dir={out}", "max_steps=4", "batch.global_size=8",
                  "batch.micro_size=2", "optim.warmup_steps=1", "eval.every_steps=2", "checkpoint.every_steps=2", *LORA_SFT)
    assert "2 rank(s) on cpu" in proc.stdout
    return out


@pytest.fixture(scope="module")
def grpo_run(assets, sft_run):
    out = assets["root"] / "grpo"
    launch("train/grpo.py", "configs/demo/cascade_grpo.yaml", f"model_path={assets['model']}",
           f"sft_adapter={sft_run / 'adapter'}", f"data_dir={assets['data']}", f"output_dir={out}", "max_steps=4",
           "batch.per_device=4", "grpo.sampling.max_new_tokens=1", "grpo.sampling.temperature=1.0",  # varied groups
           "eval.every_steps=0", "eval.limit=4", "checkpoint.every_steps=2", *LORA_GRPO)
    return out


def test_sft_trains_every_lora_tensor_without_reading_audio(sft_run, assets):
    assert_files(sft_run, "config.yaml", "ds_config.json", "metrics.jsonl",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
    assert not (sft_run / "feature_cache").exists()  # no audio: no cache was built
    train = read_metrics(sft_run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in train)
    evals = read_metrics(sft_run / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [2, 4] and all(r["n"] == 8 for r in evals)

    final = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    mid = load_file(sft_run / "checkpoints" / "step_00000002" / "adapter" / "adapter_model.safetensors")
    lora = [k for k in final if ".lora_A." in k or ".lora_B." in k]
    assert len(lora) == 2 * 7 * 2  # 2 layers x 7 linear layers x (A, B): r 16 on every decoder linear
    assert {k for k in final if k not in lora} == {  # the demo trains the random embeddings in full
        "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"}
    for key, value in final.items():
        assert torch.isfinite(value).all(), key
        assert not torch.equal(value, mid[key]), f"{key} did not change between steps 2 and 4"
    assert json.loads((sft_run / "adapter" / "adapter_config.json").read_text())["r"] == 16


def test_adapter_loads_with_plain_peft(sft_run, assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(sft_run / "adapter"))
    saved = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    loaded = dict(model.named_parameters())
    for name, tensor in saved.items():
        if "lora_" in name:
            target = name.replace(".weight", ".default.weight")
        else:  # modules_to_save: peft keeps the trained copy beside the original
            target = name.replace(".weight", ".modules_to_save.default.weight")
        assert torch.equal(loaded[target].detach(), tensor), name


def test_grpo_moves_every_grpo_lora_tensor_and_keeps_the_sft_half(grpo_run, sft_run):
    rows = read_metrics(grpo_run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    trained = [r for r in rows if r["noop"] == 0.0]
    assert trained, "every round was a no-op: the letter-prone model should earn some reward"
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in trained)

    sft = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    end = load_file(grpo_run / "adapter" / "adapter_model.safetensors")
    mid = load_file(grpo_run / "checkpoints" / "step_00000002" / "adapter" / "adapter_model.safetensors")
    r = 16  # the SFT rank: rows (A) / columns (B) after it are the GRPO adapter's
    lora = [k for k in end if ".lora_A." in k or ".lora_B." in k]
    assert lora and set(end) == set(sft)
    for key in lora:
        half = (slice(r, None), slice(None)) if ".lora_A." in key else (slice(None), slice(r, None))
        keep = (slice(None, r), slice(None)) if ".lora_A." in key else (slice(None), slice(None, r))
        assert end[key].shape[0 if ".lora_A." in key else 1] == 2 * r, key
        assert not torch.equal(end[key][half], mid[key][half]), f"GRPO part of {key} did not move"
        assert torch.isfinite(end[key]).all(), key
        assert end[key][keep].abs().sum() > 0, key
    for key in set(end) - set(lora):  # the SFT run's full embeddings ride along unchanged
        assert torch.equal(end[key], sft[key]), key


def test_inference_scores_the_grpo_member(grpo_run, assets):
    out = assets["root"] / "infer"
    python("inference/run.py", "--config", "configs/demo/cascade_infer.yaml", "--split", "dev",
           f"model_path={assets['model']}", f"adapter={grpo_run / 'adapter'}", f"data_dir={assets['data']}",
           f"output_dir={out}", "model_name=cascade_grpo", "permutations=3", "progress=false")
    metrics = json.loads((out / "dev" / "metrics.json").read_text())
    assert metrics["counts"] == {"tsqa": 8} and metrics["permutations"] == 3
    rows = [json.loads(line) for line in (out / "dev" / "predictions.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"cascade_grpo"} and all(len(r["option_logits"]) == 3 for r in rows)
