"""The embedded synthetic data set: determinism, balance, answers true to the audio, converter accounting."""

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from aqa.data.manifest import load_manifest, read_dataset_info, read_jsonl
from aqa.data.summary import summarize
from aqa.data.synth import DEFAULT_CONFIG, allocate, build, generate_items, load_synth_config
from aqa.data.synth_questions import BUILDERS
from aqa.data.synth_sounds import BY_NAME, SPECIES
from data_prep.synth import main as synth_main

SMALL = ["sizes.train=36", "sizes.dev=18", "sizes.eval=18"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One small data set written by the CLI, plus its config."""
    out = tmp_path_factory.mktemp("synth") / "demo"
    assert synth_main(["--out", str(out), "--no-progress", "--train", "36", "--dev", "18", "--eval", "18"]) == 0
    return out, load_synth_config(None, SMALL)


def test_default_config_loads_and_rejects_unknown_types():
    cfg = load_synth_config(DEFAULT_CONFIG)
    assert cfg.sizes.train + cfg.sizes.dev + cfg.sizes.eval >= 1000 and set(cfg.part_shares) == set(BUILDERS)
    with pytest.raises(ValueError, match="unknown types"):
        load_synth_config(None, ["question_types={bqa: {species_idd: 1.0}}"])


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    out, cfg = built
    again = tmp_path / "again"
    build(again, cfg, progress=False, verbose=False)
    first, second = _files(out), _files(again)
    assert set(first) == set(second)
    assert any(name.endswith(".wav") for name in first) and "train.jsonl" in first
    assert [n for n in first if first[n] != second[n]] == []
    other = tmp_path / "other"
    build(other, load_synth_config(None, [*SMALL, "seed=1"]), progress=False, verbose=False)
    third = _files(other)
    assert third["train.jsonl"] != first["train.jsonl"]
    assert third["raw/audio/bqa_train_0000.wav"] != first["raw/audio/bqa_train_0000.wav"]


def test_parts_splits_and_converter_accounting(built):
    out, cfg = built
    question_files = sorted((out / "raw").rglob("*.json"))
    assert len(question_files) == 72
    assert read_jsonl(out / "quarantine.jsonl") == []
    info = read_dataset_info(out)
    assert info["audio_root"] == "raw/audio"
    for split, n in vars(cfg.sizes).items():
        manifest = load_manifest(out / f"{split}.jsonl")
        assert len(manifest) == n == info["splits"][split]["count"]
        assert Counter(r.part for r in manifest) == allocate(n, cfg.part_shares)
        for r in manifest:
            assert r.split == split and r.answer in r.choices
            assert not any(c[:3] in ("A. ", "B. ", "C. ", "D. ") for c in r.choices), "letter prefix not stripped"
            assert r.meta["chance"] == pytest.approx(1 / len(r.choices), abs=1e-6)
            assert 2 <= len(r.choices) <= 4 and r.meta["question_type"] in BUILDERS[r.part]
            assert manifest.audio_path(r).is_file()


def test_raw_layout_is_dcase_like(built):
    out, cfg = built
    q = json.loads((out / "raw" / cfg.part_folders["bqa"] / "train" / "bqa_train_0000.json").read_text())
    assert set(q) == {"audio_url", "question", "choice", "answer", "question_type"}
    assert q["choice"][0].startswith("A. ") and q["answer"][1:3] == ". "  # bqa: lettered options and answer
    t = json.loads((out / "raw" / cfg.part_folders["tsqa"] / "train" / "tsqa_train_0000.json").read_text())
    assert t["choice"][0].startswith("A. ") and t["answer"] in [c[3:] for c in t["choice"]]
    urls = [json.loads(p.read_text())["audio_url"] for p in (out / "raw").rglob("*.json")]
    assert any("://" in u for u in urls) and any("://" not in u for u in urls)


def test_hidden_eval_answers_become_null(tmp_path):
    cfg = load_synth_config(None, ["sizes.train=3", "sizes.dev=3", "sizes.eval=6", "hide_eval_answers=true"])
    build(tmp_path / "d", cfg, progress=False, verbose=False)
    assert all(r.answer is None for r in load_manifest(tmp_path / "d" / "eval.jsonl"))
    assert all(r.answer is not None for r in load_manifest(tmp_path / "d" / "dev.jsonl"))


def test_right_letter_balanced_per_type_and_option_count():
    cfg = load_synth_config()
    for part in BUILDERS:
        groups = defaultdict(Counter)
        for item in generate_items(cfg, part, "train", 400):
            groups[(item.qa.question_type, len(item.qa.choices))][item.qa.answer_index] += 1
        for (qtype, n), counts in groups.items():
            per_letter = [counts[i] for i in range(n)]
            assert max(per_letter) - min(per_letter) <= 1, (part, qtype, n, per_letter)


def _answer_from_scene(qa) -> str | None:
    """Work the answer out from the placed sounds alone, for the types where that is direct."""
    ev = qa.events
    first = min(ev, key=lambda e: e.onset)
    if qa.question_type == "event_count":
        return str(len(ev))
    if qa.question_type == "call_count":
        return str(len(ev))
    if qa.question_type in ("species_id", "which_heard"):
        return ev[0].sound.name
    if qa.question_type in ("first_event", "first_sound"):
        return first.sound.name
    if qa.question_type == "longest_event":
        return max(ev, key=lambda e: e.offset - e.onset).sound.name
    if qa.question_type == "louder":
        return max(ev, key=lambda e: e.level_db).sound.name
    if qa.question_type == "higher":
        return max(ev, key=lambda e: e.sound.pitch_hz).sound.name
    if qa.question_type == "event_order":
        return ", then ".join(e.sound.name for e in sorted(ev, key=lambda e: e.onset))
    if qa.question_type == "animal_presence":
        return "Yes" if any(e.sound.kind == "species" for e in ev) else "No"
    if qa.question_type in ("species_presence", "event_presence"):
        asked = next(s for s in BY_NAME if f" {s} " in f" {qa.question} ".replace("?", " "))
        return "Yes" if any(e.sound.name == asked for e in ev) else "No"
    if qa.question_type == "call_shape":
        return ev[0].sound.contour
    return None


def test_answers_follow_from_the_scene_and_layout_is_sane():
    cfg = load_synth_config()
    for part in BUILDERS:
        for item in generate_items(cfg, part, "dev", 120):
            qa = item.qa
            assert _answer_from_scene(qa) == qa.choices[qa.answer_index], (item.id, qa)
            spans = sorted((e.onset, e.offset) for e in qa.events)
            assert spans[0][0] >= cfg.margin_s - 1e-9 and spans[-1][1] <= qa.seconds - cfg.margin_s + 1e-6
            for (_, end), (start, _) in zip(spans, spans[1:]):
                assert start - end >= cfg.min_gap_s - 1e-6, "sounds overlap or touch"
            assert len(set(qa.choices)) == len(qa.choices)


def test_audio_holds_the_annotated_sounds(built):
    """Each tonal species call peaks near its catalogue pitch, at the annotated time; silence between is quiet."""
    out, cfg = built
    rows = [line.split("\t") for line in (out / "raw" / "strong_train.tsv").read_text().splitlines()[1:]]
    mids = {s.mid: s for s in BY_NAME.values()}
    checked = 0
    for seg, a, b, mid in rows:
        sound = mids.get(mid)
        if sound is None or sound not in SPECIES or sound.contour == "trilling":
            continue
        x, sr = sf.read(out / "raw" / "audio" / f"{seg}.wav")
        seg_x = x[int(float(a) * sr) : int(float(b) * sr)]
        spec = np.abs(np.fft.rfft(seg_x))
        peak = np.fft.rfftfreq(len(seg_x), 1 / sr)[int(spec.argmax())]
        assert abs(peak - sound.pitch_hz) / sound.pitch_hz < 0.25, (seg, sound.name, peak)
        assert np.sqrt(np.mean(seg_x**2)) > 3 * np.sqrt(np.mean(x[: int(0.1 * sr)] ** 2))  # the quiet side of "louder" sits ~15 dB over the floor
        checked += 1
    assert checked >= 5


def test_strong_tsv_and_label_map_cover_every_clip(built):
    out, cfg = built
    labels = dict(line.split("\t") for line in (out / "raw" / "mid_to_display_name.tsv").read_text().splitlines())
    assert cfg.generic_label in labels.values() and set(BY_NAME) <= set(labels.values())
    for split, n in vars(cfg.sizes).items():
        lines = (out / "raw" / f"strong_{split}.tsv").read_text().splitlines()
        assert lines[0] == "segment_id\tstart_time_seconds\tend_time_seconds\tlabel"
        rows = [line.split("\t") for line in lines[1:]]
        assert len({r[0] for r in rows}) == n and all(r[3] in labels for r in rows)
        assert all(float(r[1]) < float(r[2]) for r in rows)


def test_summary_names_every_split_part_and_type(built):
    out, _ = built
    text = summarize(out)
    for word in ("train", "dev", "eval", "bqa", "tsqa", "cqa", "species_presence", "event_order", "chance"):
        assert word in text
    assert "Quarantined source records: 0" in text


def test_rerun_refuses_a_foreign_raw_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mine.txt").write_text("not synth")
    assert synth_main(["--out", str(tmp_path), "--no-progress", "--train", "3", "--dev", "0", "--eval", "0"]) == 2
    assert (tmp_path / "raw" / "mine.txt").is_file()
