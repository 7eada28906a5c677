"""Qwen2.5-Omni through the users' commands, LoRA and full fine-tuning: ``python -m aqa.tiny qwen2_5_omni`` (the
released layout), ``deepspeed --num_gpus 2 train/sft.py`` and ``train/grpo.py`` on CPU (gloo) with the demo configs,
``python inference/run.py``; then ``finetune=full``: the weights change, ``model/`` loads with plain
``from_pretrained``, a killed and resumed run ends with the uninterrupted run's weights, and full GRPO keeps a
frozen reference. The shipped configs are loaded first (fast).

The tiny release is nudged to answer with letters (``favour_letters``, written back into its shards), or every GRPO
group would score 0 and no weight would move."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from aqa.config import load_config
from aqa.eval.predict import InferConfig
from aqa.grpo.config import load_grpo_config
from aqa.runtime.logging import read_metrics
from aqa.sft.config import load_sft_config
from tests.helpers import assert_files
from tests.recipes.launch import ROOT, deepspeed, favour_letters, python, run_with_kills, synth_data

SFT_CONFIG = "configs/demo/qwen2_5_omni_sft.yaml"
GRPO_CONFIG = "configs/demo/qwen2_5_omni_grpo.yaml"
INFER_CONFIG = "configs/demo/qwen2_5_omni_infer.yaml"
STEPS = 4
DEV = 8
FULL = ("finetune=full", "lora.modules_to_save=null", "full.include_audio=true", "optim.lr=1e-4")


def test_shipped_omni_configs_follow_the_report_and_audiomcq():
    lora = load_sft_config(ROOT / "configs/qwen2_5_omni/sft.yaml")
    assert lora.backbone == "qwen2_5_omni" and lora.finetune == "lora"
    assert (lora.lora.r, lora.optim.lr, lora.epochs, lora.batch.global_size) == (8, 5e-5, 8, 32)
    full = load_sft_config(ROOT / "configs/qwen2_5_omni/sft_full.yaml")
    assert full.finetune == "full" and full.full.include_audio
    assert (full.optim.lr, full.epochs, full.batch.micro_size, full.optim.warmup_ratio) == (1e-6, 2, 20, 0.05)
    assert json.loads((ROOT / full.deepspeed_config).read_text())["zero_optimization"]["stage"] == 2
    grpo = load_grpo_config(ROOT / "configs/qwen2_5_omni/grpo_full.yaml")
    g, s = grpo.grpo, grpo.grpo.sampling
    assert grpo.finetune == "full" and grpo.sft_adapter is None and grpo.model_path == full.output_dir + "/model"
    assert (g.num_generations, s.temperature, s.top_k, g.beta, s.max_new_tokens) == (8, 1.5, 4, 0.001, 128)
    assert g.rewards == {"accuracy": 2.0, "format": 0.5} and (grpo.optim.lr, grpo.max_steps) == (1e-6, 2000)
    assert load_grpo_config(ROOT / "configs/qwen2_5_omni/grpo.yaml").sft_adapter == lora.output_dir + "/adapter"
    infer = load_config(InferConfig, ROOT / "configs/qwen2_5_omni/infer.yaml")
    assert infer.backbone == "qwen2_5_omni" and infer.prompt == lora.prompt and lora.prompt.system is None
    infer_full = load_config(InferConfig, ROOT / "configs/qwen2_5_omni/infer_full.yaml")
    assert infer_full.prompt == full.prompt == grpo.prompt and infer_full.adapter is None
    assert full.prompt.system.startswith("You are an audio understanding model")  # AudioMCQ's system prompt
    assert infer_full.model_path == grpo.output_dir + "/model"
    demo = load_sft_config(ROOT / SFT_CONFIG)
    assert demo.model_path == "runs/demo/qwen2_5_omni_reading/model" and demo.lora.modules_to_save == ["audio_tower"]


def _letter_prone(release) -> None:
    """Nudge the thinker of a written release towards letter answers, in its own shards."""
    from aqa.backbones import get_backbone

    bb = get_backbone("qwen2_5_omni").from_pretrained(release)
    hf = bb.model
    favour_letters(hf.model.language_model.embed_tokens, hf.lm_head, bb.tokenizer, [*"ABCDE", "<|im_end|>"])
    weight_map = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    new = {"thinker.model.embed_tokens.weight": hf.model.language_model.embed_tokens.weight,
           "thinker.lm_head.weight": hf.lm_head.weight}
    for shard in {weight_map[k] for k in new}:
        tensors = load_file(str(release / shard))
        tensors.update({k: v.detach().clone().contiguous() for k, v in new.items() if weight_map[k] == shard})
        save_file(tensors, str(release / shard), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from aqa.tiny import main as write_tiny

    root = tmp_path_factory.mktemp("omni_recipe")
    write_tiny(["qwen2_5_omni", "--out", str(root / "tiny"), "--seed", "0"])  # the demo's own command
    _letter_prone(root / "tiny")
    return {"root": root, "model": root / "tiny", "data": synth_data(root / "data", train=16, dev=DEV, eval_=4),
            "cache": root / "cache"}


def sft_args(assets, out, *extra) -> list[str]:
    return ["--config", SFT_CONFIG, f"model_path={assets['model']}", f"data_dir={assets['data']}",
            f"output_dir={out}", f"cache_dir={assets['cache']}", f"max_steps={STEPS}", "batch.global_size=8",
            "batch.micro_size=2", "optim.warmup_steps=1", "eval.every_steps=0", "eval.limit=4",
            "checkpoint.every_steps=2", "logging.every_steps=1", "logging.report_to=[]", "progress=false", *extra]


def sft(assets, out, *extra):
    return deepspeed("train/sft.py", *sft_args(assets, out, *extra))


def grpo(assets, out, *extra):
    return deepspeed("train/grpo.py", "--config", GRPO_CONFIG, f"data_dir={assets['data']}", f"output_dir={out}",
                     f"cache_dir={assets['cache']}", "max_steps=2", "batch.per_device=2", "grpo.num_generations=4",
                     "grpo.sampling.temperature=1.0", "grpo.sampling.max_new_tokens=3", "eval.every_steps=0",
                     "eval.at_end=false", "checkpoint.every_steps=2", "logging.every_steps=1", "logging.report_to=[]",
                     "progress=false", *extra)


@pytest.fixture(scope="module")
def sft_run(assets):
    out = assets["root"] / "sft"
    sft(assets, out)
    return out


@pytest.mark.slow
def test_lora_sft_moves_every_lora_tensor_and_loads_with_plain_peft(sft_run, assets):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    train = read_metrics(sft_run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)) and all(math.isfinite(r["loss"]) for r in train)
    final = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    mid = load_file(sft_run / "checkpoints" / "step_00000002" / "adapter" / "adapter_model.safetensors")
    lora = [k for k in final if ".lora_A." in k or ".lora_B." in k]
    assert len(lora) == 2 * 7 * 2 and all(".language_model.layers." in k for k in lora)
    assert any(".audio_tower." in k for k in set(final) - set(lora))  # modules_to_save: the demo's audio tower
    for key in final:
        if key.endswith("audio_bos_eos_token.weight"):  # in the checkpoint, unused by the thinker's forward
            continue
        assert not torch.equal(final[key], mid[key]), f"{key} did not change between steps 2 and 4"
    config = json.loads((sft_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(assets["model"])  # what aqa.export finds the base by
    # plain PEFT on the thinker as transformers loads it from the released directory
    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(assets["model"])
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(sft_run / "adapter")))
    assert set(loaded) == set(final) and all(torch.equal(loaded[k], final[k]) for k in final)


@pytest.mark.slow
def test_lora_grpo_and_inference(sft_run, assets):
    out = assets["root"] / "grpo"
    grpo(assets, out, f"model_path={assets['model']}", f"sft_adapter={sft_run / 'adapter'}")
    rows = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    stacked = load_file(out / "adapter" / "adapter_model.safetensors")
    sft_adapter = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    assert any(k in sft_adapter and stacked[k].shape != sft_adapter[k].shape for k in stacked if ".lora_A." in k)

    pred = assets["root"] / "infer"
    python("inference/run.py", "--config", INFER_CONFIG, "--split", "dev", f"model_path={assets['model']}",
           f"adapter={out / 'adapter'}", f"data_dir={assets['data']}", f"output_dir={pred}",
           f"cache_dir={assets['cache']}", "permutations=2", "batch_size=4", "progress=false")
    metrics = json.loads((pred / "dev" / "metrics.json").read_text())
    assert metrics["n"] == DEV and metrics["model"] == "qwen2_5_omni_sft" and metrics["permutations"] == 2


def _thinker(path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def full_run(assets):
    out = assets["root"] / "sft_full"
    sft(assets, out, *FULL)
    return out


@pytest.mark.slow
def test_full_sft_trains_the_weights_and_writes_a_plain_model_dir(full_run, assets):
    assert_files(full_run, "model/config.json", "model/preprocessor_config.json", "model/chat_template.json",
                 "model/tokenizer.json")
    assert not (full_run / "adapter").exists() and not list((full_run / "model").glob("*.bin"))
    assert json.loads((full_run / "model" / "config.json").read_text())["model_type"] == "qwen2_5_omni_thinker"
    trained, base = _thinker(full_run / "model"), _thinker(assets["model"])  # plain from_pretrained, both
    assert trained.keys() == base.keys()
    changed = {k for k in trained if not torch.equal(trained[k], base[k])}
    lm = [k for k in trained if k.startswith("model.language_model.layers.") and k.endswith("proj.weight")]
    assert lm and set(lm) <= changed  # every LM matrix moved
    assert any(k.startswith("model.audio_tower.layers.") for k in changed)  # full.include_audio
    assert not any(k.startswith("model.visual.") for k in changed)  # the vision tower never trains


@pytest.mark.slow
def test_full_sft_killed_and_resumed_ends_with_the_uninterrupted_weights(full_run, assets):
    out = assets["root"] / "sft_full_killed"
    # SIGKILL once step 3 is logged (inside step 4 or its checkpoint), then the same command again
    happened, final = run_with_kills("train/sft.py", sft_args(assets, out, *FULL), out, [("step", 3)])
    assert happened == ["step@3"]
    assert "resumed from step_00000002" in final.stdout
    resumed, uninterrupted = _thinker(out / "model"), _thinker(full_run / "model")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_full_grpo_keeps_a_frozen_reference_and_moves_the_weights(full_run, assets):
    out = assets["root"] / "grpo_full"
    run = grpo(assets, out, f"model_path={full_run / 'model'}", "sft_adapter=null", "finetune=full",
               "full.include_audio=false", "optim.lr=1e-4", "grpo.beta=0.1")
    assert "keeps a frozen reference copy" in run.stdout
    rows = read_metrics(out / "metrics.jsonl", kind="train")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert any(r["reward_std"] > 0 for r in rows)  # some group had an advantage to learn from
    trained, start = _thinker(out / "model"), _thinker(full_run / "model")
    changed = {k for k in trained if not torch.equal(trained[k], start[k])}
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    assert not any(k.startswith(("model.audio_tower.", "model.visual.")) for k in changed)
