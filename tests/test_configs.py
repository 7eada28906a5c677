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
