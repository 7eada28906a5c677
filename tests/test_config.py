from dataclasses import dataclass, field

import pytest

from aqa.config import ConfigError, load_config


@dataclass
class Lora:
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj"])


@dataclass
class Cfg:
    model_path: str = "m"
    lr: float = 1e-4
    max_steps: int | None = None
    bf16: bool = False
    lora: Lora = field(default_factory=Lora)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 5e-5\nlora:\n  r: 4\n")
    cfg = load_config(Cfg, p, ["max_steps=3", "lora.alpha=32", "bf16=true", "--model_path=x"])
    assert cfg.lr == 5e-5 and cfg.lora.r == 4 and cfg.lora.alpha == 32.0
    assert cfg.max_steps == 3 and cfg.bf16 is True and cfg.model_path == "x"


def test_unknown_key_names_the_fix(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_step: 1\n")
    with pytest.raises(ConfigError, match="Did you mean"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match="lora.rr"):
        load_config(Cfg, None, ["lora.rr=3"])


def test_bad_types_fail():
    with pytest.raises(ConfigError, match="integer"):
        load_config(Cfg, None, ["max_steps=abc"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(Cfg, None, ["bf16=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["max_steps"])
    assert load_config(Cfg, None, ["max_steps=null"]).max_steps is None


def test_unquoted_braces_name_the_quoting():
    # a user override such as prompt.target_format={text}: YAML reads {text} as a mapping
    with pytest.raises(ConfigError, match="Quote the value"):
        load_config(Cfg, None, ["model_path={text}"])
    assert load_config(Cfg, None, ['model_path="{text}"']).model_path == "{text}"
