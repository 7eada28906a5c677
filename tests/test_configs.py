"""Every YAML in configs/ opens with the command that launches it and loads into that command's config class."""


import pytest

from aqa.config import load_config
from tests.helpers import ROOT

YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))


def config_class(command: str):
    """The dataclass of the script named in a config's first line."""
    from aqa.data.synth import SynthConfig
    from aqa.data.temporal_qa import TemporalQAConfig
    from aqa.ensemble.run import EnsembleConfig
    from aqa.eval.predict import InferConfig
    from aqa.grpo.config import GRPOConfig
    from aqa.sed.annotate import SedEventsConfig
    from aqa.sed.calibrate import CalibrateConfig
    from aqa.sed.train import SedTrainConfig
    from aqa.sft.config import SFTConfig

    table = {
        "train/sft.py": SFTConfig, "train/grpo.py": GRPOConfig, "train/sed.py": SedTrainConfig,
        "inference/run.py": InferConfig, "make ensemble": EnsembleConfig, "aqa.sed.calibrate": CalibrateConfig,
        "data_prep.sed_events": SedEventsConfig, "data_prep.synth": SynthConfig,
        "data_prep.audioset_strong": TemporalQAConfig,
    }
    hits = [cls for key, cls in table.items() if key in command]
    assert len(hits) == 1, f"cannot tell which script launches: {command!r}"
    return hits[0]


def test_every_config_is_covered():
    assert len(YAMLS) >= 25


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_opens_with_its_command_and_loads(path, monkeypatch):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{path} must open with a comment giving the command that launches it"
    assert str(path.relative_to(ROOT)) in first or "make ensemble" in first or "data_prep." in first
    monkeypatch.chdir(ROOT)
    cfg = load_config(config_class(first), path)
    assert cfg is not None


@pytest.mark.parametrize("name", ["qwen2_audio", "kimi_audio", "qwen2_5_omni", "cascade"])
def test_demo_grpo_and_inference_load_what_the_demo_sft_writes(name):
    """A demo SFT in full writes ``model/``, which its GRPO and inference load with no adapter; a LoRA SFT writes
    ``adapter/``, which GRPO folds in and inference applies on the SFT's own base."""
    from aqa.eval.predict import InferConfig
    from aqa.grpo.config import load_grpo_config
    from aqa.sft.config import load_sft_config

    demo = ROOT / "configs" / "demo"
    sft = load_sft_config(demo / f"{name}_sft.yaml")
    grpo = load_grpo_config(demo / f"{name}_grpo.yaml")
    infer = load_config(InferConfig, demo / f"{name}_infer.yaml")
    assert grpo.finetune == sft.finetune and grpo.output_dir != sft.output_dir
    if sft.finetune == "full":
        assert grpo.model_path == infer.model_path == f"{sft.output_dir}/model"
        assert grpo.sft_adapter is None and infer.adapter is None
    else:
        assert grpo.model_path == infer.model_path == sft.model_path
        assert grpo.sft_adapter == infer.adapter == f"{sft.output_dir}/adapter"
