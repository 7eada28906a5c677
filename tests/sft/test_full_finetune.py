"""``finetune: full`` for every backbone: what trains, one optimizer step moving exactly that, the saved ``model/``
loading back to the same scores; GRPO's frozen reference; and the config checks."""

import pytest
import torch

from aqa.backbones import backbones, get_backbone
from aqa.backbones.full import FullConfig, apply_full, frozen_reference, save_model, trainable_names
from aqa.config import ConfigError
from aqa.data.example import Example
from aqa.grpo.config import load_grpo_config
from aqa.grpo.policy import reference
from aqa.sft.config import load_sft_config
from tests.helpers import ROOT, audio_example, noise

AUDIO = ["qwen2_audio", "kimi_audio", "qwen2_5_omni"]
EVENTS = [{"label": "Siren", "onset": 0.5, "offset": 1.5, "score": 0.9}]


def _examples(bb):
    if bb.name == "text_llm":
        return [Example(id=f"q{i}", question="What is heard first?", choices=["siren", "dog", "bell"],
                        answer_index=i % 3, meta={"events": EVENTS}) for i in range(2)]
    return [audio_example(bb, i, noise(1.0 + i, i), ["siren", "dog", "bell"], i % 3) for i in range(2)]


@pytest.mark.parametrize("name", [*AUDIO, "text_llm"])
def test_full_finetuning_trains_the_language_model_and_saves_a_loadable_model(name, tiny, tmp_path):
    assert set(backbones()) == {*AUDIO, "text_llm"}  # every backbone is covered here
    model_dir = tiny.shared(name)
    bb = get_backbone(name).from_pretrained(model_dir)
    model = apply_full(bb, FullConfig())
    prefixes = tuple(bb.full_finetune_prefixes())
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train == set(trainable_names(bb, FullConfig())) and all(n.startswith(prefixes) for n in train)
    assert any("lm_head" in n for n in train) and any("embed_tokens" in n for n in train)
    if name in AUDIO:
        with_audio = set(trainable_names(bb, FullConfig(include_audio=True)))
        assert with_audio > train  # the audio side joins only when asked
    else:
        with pytest.raises(ValueError, match="no audio tower"):
            trainable_names(bb, FullConfig(include_audio=True))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = _examples(bb)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    bb.loss(model, bb.collate(examples)).backward()
    optimizer.step()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and moved <= train
    assert any(".layers." in n and n.endswith("proj.weight") for n in moved)

    want = bb.option_logits(model, examples)
    out = save_model(bb, model, tmp_path / "model")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    again = get_backbone(name).from_pretrained(out)
    for a, b in zip(want, again.option_logits(again.model, examples)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_the_frozen_reference_is_a_detached_copy(tiny):
    bb = get_backbone("qwen2_audio").from_pretrained(tiny.shared("qwen2_audio"))
    model = apply_full(bb, FullConfig())
    ref, size = frozen_reference(model)
    assert size >= sum(p.numel() * 4 for p in model.parameters())  # fp32: the whole model once more
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(ref.lm_head.weight, model.lm_head.weight)  # training the policy leaves it alone
    with reference(model, ref) as scored:
        assert scored is ref and not torch.is_grad_enabled()


def test_finetune_config_checks():
    sft = ROOT / "configs/demo/qwen2_5_omni_sft.yaml"
    assert load_sft_config(sft).finetune == "lora"
    assert load_sft_config(sft, ["finetune=full", "lora.modules_to_save=null"]).finetune == "full"
    with pytest.raises(ConfigError, match="lora.modules_to_save"):
        load_sft_config(sft, ["finetune=full"])  # a LoRA-only key left on
    with pytest.raises(ConfigError, match="one of lora, full"):
        load_sft_config(sft, ["finetune=half"])
    grpo = ROOT / "configs/demo/qwen2_5_omni_grpo.yaml"
    with pytest.raises(ConfigError, match="sft_adapter"):
        load_grpo_config(grpo, ["sft_adapter=null"])  # LoRA GRPO needs the SFT adapter
    assert load_grpo_config(grpo, ["sft_adapter=null", "finetune=full"]).sft_adapter is None
    with pytest.raises(ConfigError, match="top_k"):
        load_grpo_config(grpo, ["grpo.sampling.top_k=-1"])
