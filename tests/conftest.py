"""Shared test setup: the repo root on sys.path (scripts live beside the package), W&B offline, and the tiny
random models, each written once per session.

This is the one place that imports the tiny-model writers; a test asks for a model through the fixtures below.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
pytest.register_assert_rewrite("tests.helpers", "tests.recipes.launch")  # their asserts explain a failure as a test's do
# imported after the environment is set: huggingface_hub reads HF_HUB_OFFLINE when it is first imported
from aqa.backbones.kimi_audio.tiny import TinyKimiAudioSpec, write_tiny_kimi_audio  # noqa: E402
from aqa.backbones.qwen2_5_omni_tiny import TinyQwen2_5OmniSpec, write_tiny_qwen2_5_omni  # noqa: E402
from aqa.backbones.qwen2_audio_tiny import TinyQwen2AudioSpec, write_tiny_qwen2_audio  # noqa: E402
from aqa.backbones.text_llm_tiny import TinyQwen2TextSpec, write_tiny_text_llm  # noqa: E402
from aqa.sed.labels import LabelMap  # noqa: E402
from aqa.sed.tiny import write_tiny_beats  # noqa: E402

WRITERS = {  # kind -> (writer, its spec): a spec's keys are the sizes a test may change
    "qwen2_audio": (write_tiny_qwen2_audio, TinyQwen2AudioSpec),
    "text_llm": (write_tiny_text_llm, TinyQwen2TextSpec),
    "kimi_audio": (write_tiny_kimi_audio, TinyKimiAudioSpec),
    "qwen2_5_omni": (write_tiny_qwen2_5_omni, TinyQwen2_5OmniSpec),
}


class TinyModels:
    """Tiny random-init model directories, as ``python -m aqa.tiny`` and ``python -m aqa.sed.tiny`` write them.

    ``shared(kind, seed, **sizes)`` and ``beats(labels, seed)`` write a directory once per session and hand the
    same one to every test that asks for the same model: such a directory is read-only (loading it makes a fresh
    model, so a test may train what it loads). ``write(...)`` and ``write_beats(...)`` write a fresh copy where a
    test asks: for a test that changes the files or checks the writer itself.
    """

    def __init__(self, root: Path):
        self.root = root
        self._written: dict[tuple, Path] = {}

    def write(self, kind: str, out: Path, seed: int = 0, **sizes) -> Path:
        writer, spec = WRITERS[kind]
        return writer(out, seed=seed, spec=spec(**sizes) if sizes else None)

    def write_beats(self, out: Path, labels: LabelMap, seed: int = 0) -> Path:
        return write_tiny_beats(out, labels, seed=seed)

    def shared(self, kind: str, seed: int = 0, **sizes) -> Path:
        key = (kind, seed, *sorted(sizes.items()))
        if key not in self._written:
            self._written[key] = self.write(kind, self.root / f"{kind}-{len(self._written)}", seed, **sizes)
        return self._written[key]

    def beats(self, labels: LabelMap, seed: int = 0) -> Path:
        key = ("beats", seed, tuple(labels.mids), tuple(labels.names))
        if key not in self._written:
            self._written[key] = self.write_beats(self.root / f"beats-{len(self._written)}", labels, seed)
        return self._written[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_qwen2_audio(tiny) -> Path:
    """The tiny Qwen2-Audio of seed 0 (shared: read-only)."""
    return tiny.shared("qwen2_audio")


@pytest.fixture(scope="session")
def tiny_text_llm(tiny) -> Path:
    """The tiny Qwen2 text LLM of seed 0, the cascade's answerer (shared: read-only)."""
    return tiny.shared("text_llm")


@pytest.fixture(scope="session")
def tiny_kimi_audio(tiny) -> Path:
    """The tiny Kimi-Audio release of seed 0 (shared: read-only)."""
    return tiny.shared("kimi_audio")


@pytest.fixture(scope="session")
def tiny_qwen2_5_omni(tiny) -> Path:
    """The tiny Qwen2.5-Omni release (thinker, talker, token2wav; sharded) of seed 0 (shared: read-only)."""
    return tiny.shared("qwen2_5_omni")


# The files that take longest, started first: under `make test` (pytest-xdist, a file per worker) the other
# workers' files fill in around them instead of one of them starting last and running alone.
LONGEST_FIRST = (
    "tests/recipes/test_user_commands.py",  # `make demo` at smoke size, a module fixture: several minutes
    "tests/recipes/test_grpo_recipe.py",  # SIGKILL anywhere, kill-and-resume on two ranks
    "tests/recipes/test_sft_recipe.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the rest keep pytest's order
