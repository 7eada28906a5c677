"""What several test modules share: the repository's paths, test audio (tones and noise, as arrays or files),
manifest records and manifests, backbone examples, a tiny in-memory BEATs, and checks on written directories.

The tiny model directories are not here: ``tests/conftest.py`` writes them once per session (fixtures ``tiny``,
``tiny_qwen2_audio``, ``tiny_text_llm``, ``tiny_kimi_audio``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

from aqa.data.example import Example
from aqa.data.manifest import Record, write_dataset_info, write_jsonl

ROOT = Path(__file__).resolve().parents[1]  # the repository: scripts and configs are named relative to it
FIXTURES = ROOT / "tests" / "fixtures"  # stored copies of official files, so no test downloads anything
SR = 16000  # the sample rate every backbone reads


# -- audio ----------------------------------------------------------------------------------------------------
def sine(seconds: float, sr: int = SR, freq: float = 440.0, amp: float = 0.5, channels: int = 1) -> np.ndarray:
    """A sine, float32: ``[S]``, or ``[S, C]`` with the same signal in each channel."""
    t = np.arange(int(round(sr * seconds))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def noise(seconds: float, rng: np.random.Generator | int = 0, scale: float = 0.1, sr: int = SR) -> np.ndarray:
    """Gaussian noise, float32. ``rng``: a seed, or a generator drawn from in turn (the clips of one data set)."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    return (scale * rng.standard_normal(int(seconds * sr))).astype(np.float32)


def write_wave(path: Path, wave: np.ndarray, sr: int = SR, subtype: str | None = None) -> Path:
    """``wave`` as an audio file (the format from the suffix), its folders made; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, sr, subtype=subtype)
    return path


def write_sine(path: Path, seconds: float = 0.5, sr: int = SR, freq: float = 440.0, amp: float = 0.5,
               channels: int = 1, subtype: str | None = None) -> Path:
    """A :func:`sine` written as an audio file."""
    return write_wave(path, sine(seconds, sr, freq, amp, channels), sr, subtype)


# -- records and examples -------------------------------------------------------------------------------------
def record(i: int = 0, **fields) -> Record:
    """Manifest record ``q{i}`` about ``c{i}.wav``: question ``?``, options ``a``/``b``, answer ``a``, part ``p``,
    split ``dev``; ``fields`` replace any of these."""
    base = dict(id=f"q{i}", part="p", split="dev", audio=f"c{i}.wav", question="?", choices=["a", "b"], answer="a")
    return Record(**{**base, **fields})


def write_manifest(root: Path, split: str, rows: list[Record | dict], audio: str = "audio") -> Path:
    """``<root>/<split>.jsonl`` and ``<root>/dataset.json`` naming ``<root>/<audio>`` as the audio root."""
    write_jsonl(root / f"{split}.jsonl", rows)
    write_dataset_info(root, root / audio)
    return root / f"{split}.jsonl"


def audio_example(backbone, i: int, wave: np.ndarray, choices: list[str], answer_index: int | None,
                  question: str = "What is the first sound?") -> Example:
    """Question ``q{i}`` about ``wave``, with the features ``backbone`` extracts from it."""
    return Example(id=f"q{i}", question=question, choices=choices, answer_index=answer_index,
                   features=backbone.extract_features(wave))


# -- models ---------------------------------------------------------------------------------------------------
def tiny_beats(classes: int = 3, seed: int = 0):
    """A tiny random-init BEATs in memory, in eval mode, with ``classes`` outputs (same seed, same weights)."""
    from aqa.sed.config import load_beats_config
    from aqa.sed.tiny import DEFAULT_CONFIG, build_tiny_beats

    return build_tiny_beats(load_beats_config(DEFAULT_CONFIG), classes, seed).eval()


# -- written directories --------------------------------------------------------------------------------------
def assert_files(root: Path, *names: str) -> None:
    """Each of ``names`` is a file under ``root``; a failure names the first one missing."""
    for name in names:
        assert (root / name).is_file(), name


def load_plainly(model_dir: Path, files: tuple[str, ...], model_cls, processor_cls):
    """``model_dir`` holds ``files``, as a released checkpoint does, and plain transformers loads it:
    ``(model_cls.from_pretrained(model_dir), processor_cls.from_pretrained(model_dir))``."""
    assert_files(model_dir, *files)
    return model_cls.from_pretrained(model_dir), processor_cls.from_pretrained(model_dir)


def assert_seeded(written: Path, same_seed: Path, other_seed: Path, file: str = "model.safetensors") -> None:
    """A tiny writer is deterministic: ``same_seed`` holds the tensors of ``written``, ``other_seed`` other ones."""
    first, again, other = (load_file(str(d / file)) for d in (written, same_seed, other_seed))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
