"""Option-reading questions: multiple-choice questions whose answer is stated in the question.

    Which option says "hiss"?
    (A) rising
    (B) hiss
    (C) 2
    Answer with the option's letter.        -> B

A 7B backbone arrives from pretraining able to read lettered options and point at the one a question
names. A tiny random-init backbone cannot, so it learns the position of an answer rather than its text,
and option shuffling and scoring in several orders measure nothing but chance. Training on these
questions first (``configs/demo/*_reading.yaml``, through ``train/sft.py`` like any other SFT) gives the
tiny backbones that skill, the way pretraining gives it to the real ones; the audio questions then start
from a model that can bind option text to letters.

The words are those the options of a manifest are made of (``--words-from``), so the tiny tokenizer
knows them. The question needs no audio, but every record of the manifest contract has a clip, and the clip
matters to a tiny model: beside a 2.5 s clip (about 60 audio positions) the tiny Qwen2-Audio did not learn to
read in 400 steps, beside a 0.1 s one it did, and a model that learned beside the short clip lost the skill
beside a long one until it trained a little more there (SFT in full at batch 64, the demo's now, does not need
that second stage). Hence a split per clip length: a split's questions take turns on the silent clips of the
lengths it names.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from aqa.data.manifest import ManifestError, Record, read_jsonl, write_dataset_info, write_jsonl

SAMPLE_RATE = 16_000
PART = "reading"
QUESTION = 'Which option says "{word}"?'
AUDIO_DIR = "audio"


@dataclass
class ReadingSplit:
    """One split: how many questions, and the lengths of the silent clips they point at (in turn)."""

    name: str
    questions: int
    clip_seconds: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> ReadingSplit:
        """``NAME=N@SECONDS[,SECONDS...]``, e.g. ``train=8000@0.1,2.5`` (every other question on each length)."""
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)=(\d+)@([0-9.]+(?:,[0-9.]+)*)", spec.strip())
        if not m:
            raise ValueError(f"split '{spec}' is not NAME=N@SECONDS[,SECONDS...] (for example train=8000@0.1,2.5).")
        split = cls(m.group(1), int(m.group(2)), tuple(float(x) for x in m.group(3).split(",")))
        if split.questions < 1 or not all(0.05 <= x <= 30 for x in split.clip_seconds):
            raise ValueError(f"split '{spec}': N must be >= 1 and every SECONDS between 0.05 and 30.")
        return split


@dataclass
class ReadingConfig:
    # beside a 0.1 s clip (*_short: the demo's reading stages), and beside a 2.5 s one, its soundscapes' length
    # (a second stage the demo ran before its SFT trained in full at batch 64: README)
    splits: list[ReadingSplit] = field(default_factory=lambda: [
        ReadingSplit("train_short", 8000, (0.1,)), ReadingSplit("dev_short", 256, (0.1,)),
        ReadingSplit("train", 4000, (2.5,)), ReadingSplit("dev", 256, (2.5,))])
    min_options: int = 2
    max_options: int = 5
    seed: int = 0
    # sound-event labels: each question also gets 0-4 made-up detected events (meta.events, as data_prep.sed_events
    # writes them), so a text LLM that reads events learns to read the options beside an events block
    event_labels: list[str] = field(default_factory=list)


def option_words(manifest_dir: str | Path, split: str = "train") -> list[str]:
    """The distinct words of a manifest split's option texts ("beep, then hiss" -> beep, then, hiss)."""
    path = Path(manifest_dir) / f"{split}.jsonl"
    words = {w for row in read_jsonl(path) for choice in row.get("choices", [])
             for w in re.split(r"[\s,.;:!?]+", str(choice)) if w}
    return sorted(words)


def make_question(rng: random.Random, words: list[str], cfg: ReadingConfig) -> tuple[str, list[str], str]:
    """A question naming one of 2..max_options distinct words, in random order: (question, choices, answer)."""
    n = rng.randint(cfg.min_options, cfg.max_options)
    choices = rng.sample(words, n)
    answer = choices[rng.randrange(n)]
    return QUESTION.format(word=answer), choices, answer


def make_events(rng: random.Random, labels: list[str], seconds: float) -> list[dict]:
    """0-4 made-up detected events within a clip of ``seconds`` (at least 1 s), by onset."""
    span = max(seconds, 1.0)
    events = []
    for _ in range(rng.randint(0, 4)):
        onset = round(rng.uniform(0, span * 0.8), 2)
        events.append({"label": rng.choice(labels), "onset": onset,
                       "offset": round(min(span, onset + rng.uniform(0.2, 1.5)), 2),
                       "score": round(rng.uniform(0.3, 1.0), 2)})
    return sorted(events, key=lambda e: e["onset"])


def build(out_dir: str | Path, words: list[str], cfg: ReadingConfig) -> dict[str, int]:
    """Write ``OUT/<split>.jsonl``, ``OUT/audio/silence_<ms>ms.wav`` and ``OUT/dataset.json``; returns the counts.

    The same words, config and seed give the same bytes.
    """
    out = Path(out_dir)
    if len(words) < cfg.max_options:
        raise ManifestError(f"option reading needs at least max_options={cfg.max_options} distinct words, "
                            f"got {len(words)}: point --words-from at a manifest with more option texts.")
    if not 2 <= cfg.min_options <= cfg.max_options:
        raise ValueError(f"need 2 <= min_options <= max_options, got {cfg.min_options} and {cfg.max_options}.")
    names = [s.name for s in cfg.splits]
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be distinct, got {names}.")
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    counts = {}
    for k, split in enumerate(cfg.splits):
        clips = []
        for seconds in split.clip_seconds:
            clip = f"silence_{round(seconds * 1000)}ms.wav"
            if not (out / AUDIO_DIR / clip).is_file():
                sf.write(out / AUDIO_DIR / clip, np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32),
                         SAMPLE_RATE, subtype="PCM_16")
            clips.append((clip, seconds))
        rng = random.Random(f"{cfg.seed}/{k}/{split.name}")
        rows = []
        for i in range(split.questions):
            question, choices, answer = make_question(rng, words, cfg)
            clip, seconds = clips[i % len(clips)]
            meta = {"question_type": "option_reading", "duration_s": seconds, "chance": round(1 / len(choices), 6)}
            if cfg.event_labels:
                meta["events"] = make_events(rng, cfg.event_labels, seconds)
            rows.append(Record(id=f"{PART}_{split.name}_{i:05d}", part=PART, split=split.name, audio=clip,
                               question=question, choices=choices, answer=answer, meta=meta))
        counts[split.name] = write_jsonl(out / f"{split.name}.jsonl", rows)
    write_jsonl(out / "quarantine.jsonl", [])
    write_dataset_info(out, out / AUDIO_DIR, splits={name: {"count": n, "source": "option_reading"}
                                                      for name, n in counts.items()})
    return counts
