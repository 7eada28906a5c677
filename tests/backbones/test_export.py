"""aqa.export: LoRA merged into the base loads with plain transformers and scores like base + adapter."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from aqa.backbones import backbone_for_model_type, get_backbone
from aqa.backbones.lora import AdapterError, LoraConfig, apply_lora
from aqa.data.example import Example
from aqa.export import backbone_name_for, export_merged
from tests.helpers import ROOT, noise


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A tiny base and an adapter whose LoRA B matrices are non-zero (so merging changes the weights)."""
    root = tmp_path_factory.mktemp("export")
    base = tiny.shared("qwen2_audio", seed=3)
    bb = get_backbone("qwen2_audio").from_pretrained(base)
    apply_lora(bb, LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(0)
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    bb.model.save_pretrained(root / "adapter")
    wave = noise(1.5, 0)  # 24,000 samples
    examples = [Example(id="q", question="Which sound?", choices=["rain", "bell", "siren"], answer_index=2,
                        features=bb.extract_features(wave))]
    return root, base, bb, examples


def test_merged_model_loads_with_plain_transformers_and_matches(trained):
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    root, base, bb, examples = trained
    out = export_merged(root / "adapter", root / "merged")  # base found in adapter_config.json
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k]
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out)
    Qwen2AudioProcessor.from_pretrained(out)
    assert (out / "preprocessor_config.json").is_file()
    with_adapter = bb.option_logits(bb.model, examples)[0]
    merged = bb.option_logits(model, examples)[0]
    plain = get_backbone("qwen2_audio").from_pretrained(base)
    assert not torch.allclose(plain.option_logits(plain.model, examples)[0], with_adapter, atol=1e-4)
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-4)


def test_export_cli_and_errors(trained, tmp_path, tiny):
    root, base, _, _ = trained
    cmd = [sys.executable, "-m", "aqa.export", "--adapter", str(root / "adapter"), "--out", str(tmp_path / "m"),
           "--base", str(base)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                          "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file()

    with pytest.raises(AdapterError, match="adapter_config.json"):
        export_merged(tmp_path, tmp_path / "x")
    other = tiny.shared("qwen2_audio", intermediate_size=96)
    with pytest.raises(AdapterError, match="another base"):
        export_merged(root / "adapter", tmp_path / "y", base=other)
    assert not (tmp_path / "y").exists()  # nothing half-written


def test_the_base_model_type_names_its_backbone_through_the_registry(trained, tmp_path):
    _, base, _, _ = trained
    assert backbone_name_for(base) == "qwen2_audio"
    assert backbone_for_model_type("moonshot_kimia").name == "kimi_audio"  # the release's name, not ours
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))  # text_llm claims no model_type
    with pytest.raises(ValueError, match="Pass --backbone NAME for a qwen2 checkpoint"):
        backbone_name_for(tmp_path)
