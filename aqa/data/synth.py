"""The embedded default data set: deterministic synthetic soundscapes in the DCASE 2025 Task 5 raw layout.

``generate_raw(out_dir, cfg)`` writes, from ``cfg.seed`` alone (same seed, same bytes):

- ``raw/audio/<id>.wav``: one 16-bit mono clip per question;
- ``raw/<part folder>/<split>/<id>.json``: one DCASE-style question file
  (``audio_url``, ``question``, ``choice``, ``answer``, ``question_type``), some parts with ``A. `` letters;
- ``raw/strong_<split>.tsv`` + ``raw/mid_to_display_name.tsv``: the same clips as AudioSet-Strong
  annotations, so ``data_prep.audioset_strong`` runs on them.

``build(out_dir, cfg)`` then converts the raw layout with the DCASE converter (``aqa.data.sources.dcase``),
so the demo exercises the real one, into ``<split>.jsonl`` + ``quarantine.jsonl`` + ``dataset.json``. Every
knob lives in ``configs/data/synth.yaml``; the sound catalogue is in ``aqa.data.synth_sounds`` and the
question types in ``aqa.data.synth_questions``.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from aqa.config import load_config
from aqa.data.convert import QUARANTINE_FILE, Summary
from aqa.data.manifest import DATASET_FILE, SPLITS, read_jsonl, write_jsonl
from aqa.data.prompts import LETTERS
from aqa.data.sources.dcase import convert_dcase
from aqa.data.synth_questions import BUILDERS, SceneBuilder, SynthQA
from aqa.data.synth_sounds import CATALOGUE, mix

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "synth.yaml"
MARKER = "SYNTH_MARKER.txt"  # marks a raw folder this module wrote, so a rerun may replace it (not .json:
# the DCASE converter reads every .json under raw/ as a question)
URL_BASE = "https://example.org/dcase2025-synth/audio/"  # never fetched: the converter resolves by file name
TSV_HEADER = "segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"


@dataclass
class SplitSizes:
    """Questions per split, all parts together (a section, so ``sizes.train=40`` overrides one)."""

    train: int
    dev: int
    eval: int


@dataclass
class SynthConfig:
    """Every knob of the generator; values live in ``configs/data/synth.yaml``."""

    seed: int
    sample_rate: int
    sizes: SplitSizes
    part_shares: dict[str, float]  # part -> share of each split
    question_types: dict[str, dict[str, float]]  # part -> question type -> share of the part
    clip_seconds: list[float]  # [min, max] clip length before events force it longer
    margin_s: float  # silence before the first and after the last sound
    min_gap_s: float  # silence between sounds: keeps them countable and ordered
    call_seconds: list[float]  # [min, max] length of one animal call
    event_seconds: list[float]  # [min, max] length of an ordinary event
    long_event_seconds: list[float]  # [min, max] length of the answer to "which lasts longest"
    level_db: list[float]  # [min, max] dB RMS of a sound
    loud_level_db: list[float]  # [min, max] dB RMS of the louder sound in "which is louder"
    louder_gap_db: float  # how much quieter the other sound is
    noise_db: float  # dB RMS of the white-noise floor
    part_folders: dict[str, str]  # part -> raw folder name
    prefix_choices: list[str]  # parts whose raw options read "A. text"
    prefix_answer: list[str]  # parts whose raw answer carries the letter too
    url_share: float  # share of audio_url written as a URL (the rest as a relative path)
    hide_eval_answers: bool  # omit answers from eval files, as the official eval set does
    generic_label: str  # a clip-long generic TSV label (exercises label removal); "" for none


def load_synth_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SynthConfig:
    """The generator config from ``path`` (default ``configs/data/synth.yaml``) plus ``key=value`` overrides."""
    cfg = load_config(SynthConfig, path or DEFAULT_CONFIG, overrides)
    for part, types in cfg.question_types.items():
        unknown = sorted(set(types) - set(BUILDERS.get(part, {})))
        if unknown:
            raise ValueError(
                f"question_types.{part} names unknown types {unknown}; known: {', '.join(BUILDERS.get(part, {}))}."
            )
    for part, share in cfg.part_shares.items():
        if part not in BUILDERS:
            raise ValueError(f"part_shares names unknown part '{part}'; known parts: {', '.join(BUILDERS)}.")
        if share > 0 and not cfg.question_types.get(part):
            raise ValueError(f"question_types has no entry for part '{part}'; list its types and shares.")
    return cfg


def allocate(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``total`` by ``shares`` with largest remainders, so counts are exact and sum to ``total``."""
    keys = [k for k, v in shares.items() if v > 0]
    weight = sum(shares[k] for k in keys)
    if total and not keys:
        raise ValueError("every share is zero: nothing to allocate")
    raw = {k: total * shares[k] / weight for k in keys}
    counts = {k: int(raw[k]) for k in keys}
    by_remainder = sorted(keys, key=lambda k: (-(raw[k] - counts[k]), keys.index(k)))
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def stream_rng(seed: int, *names: str) -> np.random.Generator:
    """An RNG for one (part, split) stream: independent of the others and of Python's hash seed."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


@dataclass
class SynthItem:
    """One generated question with its id, ready to be written."""

    id: str
    part: str
    split: str
    qa: SynthQA


def generate_items(cfg: SynthConfig, part: str, split: str, n: int) -> list[SynthItem]:
    """``n`` questions of one part and split; question types in exact proportion, in random order."""
    rng = stream_rng(cfg.seed, part, split)
    builder = SceneBuilder(rng, cfg)
    counts = allocate(n, cfg.question_types[part])
    order = [t for t, c in counts.items() for _ in range(c)]
    order = [order[int(i)] for i in rng.permutation(len(order))]
    return [
        SynthItem(f"{part}_{split}_{i:04d}", part, split, BUILDERS[part][qtype](builder))
        for i, qtype in enumerate(order)
    ]


def raw_question(item: SynthItem, cfg: SynthConfig, rng: np.random.Generator) -> dict:
    """The DCASE-style JSON of one question: letters on options for some parts, URL or path for audio."""
    qa = item.qa
    lettered = item.part in cfg.prefix_choices
    choices = [f"{LETTERS[i]}. {c}" if lettered else c for i, c in enumerate(qa.choices)]
    answer = choices[qa.answer_index] if item.part in cfg.prefix_answer else qa.choices[qa.answer_index]
    url = f"{URL_BASE}{item.id}.wav" if rng.random() < cfg.url_share else f"audio/{item.id}.wav"
    out = {"audio_url": url, "question": qa.question, "choice": choices, "answer": answer,
           "question_type": qa.question_type}
    if item.split == "eval" and cfg.hide_eval_answers:
        del out["answer"]
    return out


def tsv_rows(item: SynthItem, cfg: SynthConfig) -> list[str]:
    """AudioSet-Strong rows for one clip: its sounds, plus the generic label over the whole clip."""
    rows = [(e.onset, e.offset, e.sound.mid) for e in item.qa.events]
    if cfg.generic_label:
        rows.append((0.0, item.qa.seconds, generic_mid(cfg)))
    return [f"{item.id}\t{a:.3f}\t{b:.3f}\t{mid}\n" for a, b, mid in sorted(rows)]


def generic_mid(cfg: SynthConfig) -> str:
    return "/m/syn_" + cfg.generic_label.lower().replace(" ", "_")


def _prepare(raw: Path) -> None:
    """Start from an empty raw folder; replace only one this module wrote before, with its manifests."""
    if raw.exists():
        if not (raw / MARKER).is_file():
            raise FileExistsError(
                f"{raw} exists and was not written by data_prep.synth; remove it or choose another --out."
            )
        shutil.rmtree(raw)
        # A smaller rerun must not leave a stale split beside the fresh ones.
        for name in [f"{s}.jsonl" for s in SPLITS] + [QUARANTINE_FILE, DATASET_FILE]:
            (raw.parent / name).unlink(missing_ok=True)
    (raw / "audio").mkdir(parents=True)


def generate_raw(out_dir: str | Path, cfg: SynthConfig, progress: bool = True) -> dict[str, dict[str, Path]]:
    """Write the raw layout under ``out_dir/raw``; returns ``{split: {part: question folder}}``.

    Same ``cfg`` (seed included) gives identical bytes in every file, WAVs included.
    """
    raw = Path(out_dir) / "raw"
    _prepare(raw)
    sizes = {s: getattr(cfg.sizes, s) for s in SPLITS}
    plan = [(split, part, n) for split in SPLITS for part, n in allocate(sizes[split], cfg.part_shares).items()]
    folders: dict[str, dict[str, Path]] = {}
    bar = tqdm(total=sum(sizes.values()), desc="synth", unit="clip", disable=not progress, dynamic_ncols=True)
    for split, part, n in plan:
        qdir = raw / cfg.part_folders[part] / split
        qdir.mkdir(parents=True, exist_ok=True)
        folders.setdefault(split, {})[part] = qdir
        url_rng = stream_rng(cfg.seed, part, split, "audio_url")
        audio_rng = stream_rng(cfg.seed, part, split, "audio")
        rows: list[str] = []
        for item in generate_items(cfg, part, split, n):
            placed = [(e.sound, e.onset, e.offset, e.level_db) for e in item.qa.events]
            wave = mix(placed, item.qa.seconds, cfg.noise_db, cfg.sample_rate, audio_rng)
            sf.write(raw / "audio" / f"{item.id}.wav", wave, cfg.sample_rate, subtype="PCM_16", format="WAV")
            text = json.dumps(raw_question(item, cfg, url_rng), indent=2, ensure_ascii=False)
            (qdir / f"{item.id}.json").write_text(text + "\n", encoding="utf-8")
            rows.extend(tsv_rows(item, cfg))
            bar.update(1)
        with (raw / f"strong_{split}.tsv").open("a", encoding="utf-8") as fh:
            if fh.tell() == 0:
                fh.write(TSV_HEADER)
            fh.writelines(rows)
    bar.close()
    labels = [(s.mid, s.name) for s in CATALOGUE]
    if cfg.generic_label:
        labels.append((generic_mid(cfg), cfg.generic_label))
    (raw / "mid_to_display_name.tsv").write_text("".join(f"{m}\t{n}\n" for m, n in labels), encoding="utf-8")
    (raw / MARKER).write_text(f"Written by data_prep.synth with seed {cfg.seed}; a rerun replaces this folder.\n")
    return folders


def annotate_chance(manifest_dir: str | Path) -> None:
    """Record ``meta.chance`` = 1 / number of options on every kept record (the converter does not)."""
    for split in SPLITS:
        path = Path(manifest_dir) / f"{split}.jsonl"
        if path.is_file():
            rows = read_jsonl(path)
            for row in rows:
                row.setdefault("meta", {})["chance"] = round(1.0 / len(row["choices"]), 6)
            write_jsonl(path, rows)


def build(out_dir: str | Path, cfg: SynthConfig, progress: bool = True, verbose: bool = True) -> Summary:
    """Generate the raw layout, convert it with the DCASE converter and annotate chance levels.

    Returns the converter's Summary (counts in = kept + quarantined). Audio stays under ``raw/audio``,
    which ``dataset.json`` names as the audio root.
    """
    out_dir = Path(out_dir)
    generate_raw(out_dir, cfg, progress=progress)
    raw = out_dir / "raw"
    summary = convert_dcase(raw, out_dir, audio_root=raw / "audio", progress=progress, verbose=verbose)
    annotate_chance(out_dir)
    return summary
