"""``--help`` of the user scripts lists every config key with its default and meaning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aqa.config import describe
from aqa.eval.predict import InferConfig
from aqa.grpo.config import GRPOConfig
from aqa.sed.train import SedTrainConfig
from aqa.sft.config import SFTConfig
from tests.recipes.launch import ROOT, recipe_env

SCRIPTS = {"train/sft.py": SFTConfig, "train/grpo.py": GRPOConfig, "inference/run.py": InferConfig,
           "train/sed.py": SedTrainConfig}


@pytest.mark.parametrize("cls", list(SCRIPTS.values()), ids=lambda c: c.__name__)
def test_every_config_key_has_help_text(cls):
    missing = [key for key, _, _, text in describe(cls) if not text]
    assert not missing, f"{cls.__name__}: write a '# ...' comment on these fields: {missing}"


@pytest.mark.parametrize("script", list(SCRIPTS), ids=str)
def test_help_lists_every_key_with_its_default(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=recipe_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for key, tp, default, text in describe(SCRIPTS[script]):
        row = next((line for line in lines if line.split()[:1] in ([key], [key + ":"])), None)
        assert row is not None, f"{script} --help does not list {key}"
        if tp != "section":
            assert default.splitlines()[0][:20] in row and text[:30] in row, row


def test_describe_reads_defaults_and_comments():
    rows = {key: (default, text) for key, _, default, text in describe(SFTConfig)}
    assert rows["model_path"] == ("(required)", "HF model directory (tiny or 7B)")
    assert rows["optim.lr"][0] == "5e-05" and rows["checkpoint.resume"][0] == '"auto"'
    assert rows["batch.global_size"] == ("32", "examples per optimizer step, all ranks together")
    assert rows["seed"][1].startswith("python/numpy/torch seeds")  # inherited from the shared run settings
