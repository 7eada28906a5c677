"""Kimi-Audio through the users' commands: ``python -m aqa.tiny kimi_audio``, ``deepspeed --num_gpus 2 train/sft.py
--config configs/demo/kimi_audio_sft.yaml`` on CPU (gloo) for a few steps over a tiny synthetic set, the adapter
on plain ``PeftModel.from_pretrained``, ``python inference/run.py --config configs/demo/kimi_audio_infer.yaml``
on dev, and ``aqa.export`` without ``--backbone``. The shipped Kimi configs are loaded first (fast)."""

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from aqa.config import load_config
from aqa.eval.predict import InferConfig
from aqa.grpo.config import load_grpo_config
from aqa.runtime.logging import read_metrics
from aqa.sft.config import load_sft_config
from tests.helpers import assert_files
from tests.recipes.launch import ROOT, deepspeed, python, synth_data

SFT_CONFIG = "configs/demo/kimi_audio_sft.yaml"
INFER_CONFIG = "configs/demo/kimi_audio_infer.yaml"
GRPO_CONFIG = "configs/demo/kimi_audio_grpo.yaml"
STEPS = 4
DEV = 8


def test_shipped_kimi_configs_load_with_the_report_recipe():
    report = load_sft_config(ROOT / "configs/kimi_audio/sft.yaml")
    assert report.backbone == "kimi_audio"
    assert (report.lora.r, report.optim.lr, report.epochs, report.batch.global_size) == (16, 5e-5, 8, 32)
    assert not report.lora.modules_to_save and not report.lora.include_audio  # the 7B's encoders stay frozen
    demo = load_sft_config(ROOT / SFT_CONFIG)
    assert demo.backbone == "kimi_audio" and demo.model_path == "runs/demo/models/kimi_audio"
    assert demo.output_dir == "runs/demo/kimi_audio_sft" and demo.cache_dir == "runs/demo/cache"
    grpo = load_grpo_config(ROOT / "configs/kimi_audio/grpo.yaml")
    assert grpo.backbone == "kimi_audio" and grpo.sft_adapter == report.output_dir + "/adapter"
    demo_grpo = load_grpo_config(ROOT / GRPO_CONFIG)
    assert demo_grpo.backbone == "kimi_audio" and demo_grpo.sft_adapter == demo.output_dir + "/adapter"
    assert demo_grpo.model_path == demo.model_path and demo_grpo.prompt == demo.prompt
    for path, adapter in (("configs/kimi_audio/infer.yaml", report.output_dir + "/adapter"),
                          (INFER_CONFIG, demo.output_dir + "/adapter")):
        infer = load_config(InferConfig, ROOT / path)
        assert infer.backbone == "kimi_audio" and infer.adapter == adapter
        assert infer.prompt == report.prompt  # scoring must use the prompt the adapter was trained with
    for path in ("configs/kimi_audio/sft.yaml", "configs/kimi_audio/grpo.yaml", "configs/kimi_audio/infer.yaml",
                 SFT_CONFIG, INFER_CONFIG, GRPO_CONFIG):
        first = (ROOT / path).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and ("train/" in first or "inference/run.py" in first), path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from aqa.tiny import main as write_tiny

    root = tmp_path_factory.mktemp("kimi_recipe")
    write_tiny(["kimi_audio", "--out", str(root / "tiny"), "--seed", "0"])  # the demo's own command
    return {"root": root, "model": root / "tiny", "data": synth_data(root / "data", train=16, dev=DEV, eval_=4),
            "cache": root / "cache"}


@pytest.fixture(scope="module")
def sft_run(assets):
    out = assets["root"] / "sft"
    deepspeed("train/sft.py", "--config", SFT_CONFIG, f"model_path={assets['model']}", f"data_dir={assets['data']}",
              f"output_dir={out}", f"cache_dir={assets['cache']}", f"max_steps={STEPS}", "batch.global_size=8",
              "batch.micro_size=2", "optim.warmup_steps=1", "eval.every_steps=0", "eval.limit=4",
              "checkpoint.every_steps=2", "logging.every_steps=1", "logging.report_to=[]", "progress=false")
    return out


@pytest.mark.slow
def test_sft_trains_every_lora_tensor_on_the_trunk(sft_run):
    assert_files(sft_run, "config.yaml", "ds_config.json", "metrics.jsonl",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
    assert json.loads((sft_run / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    train = read_metrics(sft_run / "metrics.jsonl", kind="train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in train)
    assert [r["n"] for r in read_metrics(sft_run / "metrics.jsonl", kind="eval")] == [4]

    final = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    mid = load_file(sft_run / "checkpoints" / "step_00000002" / "adapter" / "adapter_model.safetensors")
    assert set(final) == set(mid)
    lora = {k: v for k, v in final.items() if ".lora_A." in k or ".lora_B." in k}
    full = {k: v for k, v in final.items() if k not in lora}
    # LoRA sits on the trunk's linear layers only: never the MIMO branch, the adaptor or the encoder
    assert lora and all(".lm.model.layers." in k for k in lora)
    assert len(lora) == 2 * 7 * json.loads((sft_run.parent / "tiny" / "config.json").read_text())["num_hidden_layers"]
    # the demo trains the random-init audio side in full (lora.modules_to_save): both parts are in the adapter
    assert any(".vq_adaptor." in k for k in full) and any(".whisper." in k for k in full)
    for key, value in final.items():
        assert torch.isfinite(value).all(), key
        if key in lora or (".layers." in key and key.endswith(".weight") and value.dim() == 2):  # every matrix
            assert not torch.equal(value, mid[key]), f"{key} did not change between steps 2 and 4"
        if ".lora_B." in key:
            assert value.abs().sum() > 0, f"{key} never left its zero init"


@pytest.mark.slow
def test_adapter_loads_with_plain_peft_on_the_kimi_model(sft_run, assets):
    from peft import PeftModel

    from aqa.backbones.kimi_audio.audio_lm import load_kimi_audio

    base = load_kimi_audio(assets["model"])
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = PeftModel.from_pretrained(base, str(sft_run / "adapter"))
    saved = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    full_modules = json.loads((sft_run / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        # peft names a loaded tensor by its adapter ("default"): lora_A.weight -> lora_A.default.weight, and a
        # module trained in full (modules_to_save) lives in its wrapper's modules_to_save.default copy
        target = name.replace(".weight", ".default.weight") if ".lora_" in name else name
        for module in full_modules:
            target = target.replace(f".{module}.", f".{module}.modules_to_save.default.", 1)
        assert target in params, f"{name} was not loaded (looked for {target})"
        assert torch.equal(params[target].detach(), tensor), name
    # the base weights under the adapter are the tiny release's, untouched
    base_after = {n: p for n, p in model.get_base_model().named_parameters() if n in frozen}
    assert all(torch.equal(base_after[n], frozen[n]) for n in base_after)


@pytest.fixture(scope="module")
def dev_predictions(sft_run, assets):
    out = assets["root"] / "infer"
    python("inference/run.py", "--config", INFER_CONFIG, "--split", "dev", f"model_path={assets['model']}",
           f"adapter={sft_run / 'adapter'}", f"data_dir={assets['data']}", f"output_dir={out}",
           f"cache_dir={assets['cache']}", "permutations=2", "batch_size=4", "progress=false")
    return out / "dev"


@pytest.mark.slow
def test_inference_on_dev_writes_predictions_metrics_and_submission(dev_predictions, assets):
    rows = [json.loads(line) for line in (dev_predictions / "predictions.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (assets["data"] / "dev.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in dev)
    for r in rows:
        assert r["model"] == "kimi_audio_sft" and len(r["option_logits"]) == len(r["choices"])
        assert all(math.isfinite(x) for x in r["option_logits"])
        assert r["pred"] == r["choices"][max(range(len(r["choices"])), key=r["option_logits"].__getitem__)]
    metrics = json.loads((dev_predictions / "metrics.json").read_text())
    assert metrics["n"] == DEV and metrics["model"] == "kimi_audio_sft" and metrics["permutations"] == 2
    assert metrics["weighted_mean"] == pytest.approx(sum(r["pred"] == r["answer"] for r in rows) / DEV)
    assert 0.0 <= metrics["strict"]["weighted_mean"] <= metrics["mean_over_orders"]["weighted_mean"] <= 1.0
    with (dev_predictions / "submission.csv").open(newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["question", "answer"] and len(table) == DEV + 1


@pytest.mark.slow
def test_export_merges_without_naming_the_backbone(sft_run, dev_predictions, assets, tmp_path):
    from aqa.backbones import get_backbone
    from aqa.backbones.lora import load_adapter
    from aqa.data.cache import build_feature_cache
    from aqa.data.dataset import QADataset
    from aqa.data.manifest import load_manifest
    from aqa.export import backbone_name_for
    from aqa.export import main as export

    assert backbone_name_for(assets["model"]) == "kimi_audio"  # config.json says model_type moonshot_kimia
    export(["--adapter", str(sft_run / "adapter"), "--out", str(tmp_path / "merged")])  # no --backbone

    adapted = get_backbone("kimi_audio").from_pretrained(assets["model"])
    load_adapter(adapted, sft_run / "adapter")
    merged = get_backbone("kimi_audio").from_pretrained(tmp_path / "merged")  # the release loader, no peft
    dev = load_manifest(assets["data"] / "dev.jsonl")
    cache = build_feature_cache([dev], assets["cache"], adapted.extract_features, adapted.feature_settings(),
                                progress=False)  # inference filled it: nothing is recomputed
    examples = [QADataset(dev, cache)[i] for i in range(4)]
    for a, m in zip(adapted.option_logits(adapted.model, examples), merged.option_logits(merged.model, examples)):
        torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
