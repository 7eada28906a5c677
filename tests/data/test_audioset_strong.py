"""AudioSet-Strong to temporal QA: hand-worked answers, merging, generic labels, distractors, determinism."""

import json
from pathlib import Path

import numpy as np
import pytest

from aqa.data.manifest import read_jsonl
from aqa.data.temporal_qa import (
    Event,
    clean_events,
    clip_questions,
    load_temporal_qa_config,
    numeric_neighbours,
)
from data_prep.audioset_strong import main as strong_main
from tests.helpers import FIXTURES, write_wave

# A label list and a strong-label table in the AudioSet layout (tests/fixtures/audioset_strong/).
# clipA: Dog 1.0-2.0 and 1.5-3.0 overlap (one occurrence 1.0-3.0), a second Dog 7-8, Car 4.0-6.2,
# Bird song 5.0-5.4, a generic label over the whole clip and an unknown MID.
# clipB: generic labels only. clipC: no audio. clipD: Speech and Dog start 0.1 s apart (FLAC audio).
LABELS = (FIXTURES / "audioset_strong" / "labels.tsv").read_text()
TSV = (FIXTURES / "audioset_strong" / "strong.tsv").read_text()


@pytest.fixture()
def source(tmp_path):
    (tmp_path / "labels.tsv").write_text(LABELS)
    (tmp_path / "strong.tsv").write_text(TSV)
    audio = tmp_path / "audio" / "sub"
    x = (0.1 * np.sin(np.arange(80000) * 0.05)).astype(np.float32)  # 10 s at 8 kHz
    write_wave(audio / "clipA_1000.wav", x, 8000, subtype="PCM_16")
    write_wave(audio / "clipB_0.wav", x, 8000, subtype="PCM_16")
    write_wave(audio / "clipD_0.flac", x, 8000)
    return tmp_path


def _convert(src: Path, out: Path, *extra: str) -> int:
    return strong_main(["--tsv", str(src / "strong.tsv"), "--labels", str(src / "labels.tsv"),
                        "--audio-root", str(src / "audio"), "--out", str(out), "--no-progress", *extra])


def test_config_loads_and_lists_generic_labels():
    cfg = load_temporal_qa_config()
    assert "Environmental noise" in cfg.generic_labels and cfg.question_types
    with pytest.raises(ValueError, match="unknown types"):
        load_temporal_qa_config(None, ["question_types=[counting, loudness]"])


def test_merge_and_generic_removal():
    labels = {"/m/dog": "Dog", "/m/noise": "Environmental noise", "/m/car": "Car"}
    rows = [(1.0, 2.0, "/m/dog"), (1.5, 3.0, "/m/dog"), (3.0, 3.5, "/m/dog"), (5.0, 6.0, "/m/dog"),
            (0.0, 9.0, "/m/noise"), (2.0, 2.5, "/m/car"), (4.0, 4.2, "/m/x")]
    events, dropped = clean_events(rows, labels, ["environmental NOISE"], merge_gap_s=0.0)
    assert events == [Event("Dog", 1.0, 3.5), Event("Car", 2.0, 2.5), Event("Dog", 5.0, 6.0)]
    assert dropped == {"unknown": 1, "generic": 1}
    by_mid, _ = clean_events(rows, labels, ["/m/car", "/m/noise"], merge_gap_s=2.0)  # MIDs match; gap merges
    assert by_mid == [Event("Dog", 1.0, 6.0)]


def test_hand_worked_answers_and_accounting(source, tmp_path):
    out = tmp_path / "out"
    assert _convert(source, out) == 0
    rows = {r["id"]: r for r in read_jsonl(out / "train.jsonl")}
    assert sorted(rows) == sorted(
        [f"clipA_1000_{t}" for t in ("counting", "sequencing", "duration", "frequency")]
        + [f"clipD_0_{t}" for t in ("counting", "duration", "frequency")]  # D: onsets 0.1 s apart, no order
    )
    a = {r["meta"]["question_type"]: r for r in rows.values() if r["id"].startswith("clipA")}
    assert a["counting"]["answer"] == "3" and sorted(a["counting"]["choices"]) == ["2", "3", "4", "5"]
    assert a["sequencing"]["answer"] == "Dog, then Car"
    assert sorted(a["sequencing"]["choices"]) == sorted(
        ["Dog, then Car", "Car, then Dog", "Dog, then Bird song", "Bird song, then Dog"])
    dur = a["duration"]
    assert dur["meta"]["label"] in ("Car", "Bird song")  # Dog occurs twice: it has no single duration
    expected = {"Car": ("2 seconds", ["1.5 seconds", "2.5 seconds", "3 seconds"]),
                "Bird song": ("0.5 seconds", ["1 second", "1.5 seconds", "2 seconds"])}[dur["meta"]["label"]]
    assert dur["answer"] == expected[0] and sorted(dur["choices"]) == sorted([expected[0], *expected[1]])
    freq = a["frequency"]
    assert freq["answer"] == {"Dog": "2", "Car": "1", "Bird song": "1"}[freq["meta"]["label"]]
    assert a["counting"]["meta"]["events"] == [["Dog", 1.0, 3.0], ["Car", 4.0, 6.2], ["Bird song", 5.0, 5.4],
                                               ["Dog", 7.0, 8.0]]
    assert a["counting"]["audio"] == "sub/clipA_1000.wav" and rows["clipD_0_counting"]["audio"] == "sub/clipD_0.flac"
    assert rows["clipD_0_counting"]["answer"] == "2"

    quarantine = {q["id"]: q["reason"] for q in read_jsonl(out / "quarantine.jsonl")}
    assert set(quarantine) == {"clipB_0", "clipC_0", "clipE_0:line14"}
    assert "generic" in quarantine["clipB_0"] and "clipC_0.wav" in quarantine["clipC_0"]
    assert "not numbers" in quarantine["clipE_0:line14"]
    info = json.loads((out / "dataset.json").read_text())
    assert info["splits"]["train"]["count"] == 7 == len(rows)  # in = 7 kept + 3 quarantined


def test_distractors_never_equal_the_answer():
    cfg = load_temporal_qa_config()
    vocab = [f"sound {i}" for i in range(12)]
    rng = np.random.default_rng(0)
    seen_types = set()
    for clip in range(300):
        events = []
        for _ in range(int(rng.integers(1, 8))):
            start = float(rng.uniform(0, 9))
            events.append(Event(vocab[int(rng.integers(5))], round(start, 3), round(start + rng.uniform(0.05, 3), 3)))
        events.sort(key=lambda e: (e.start, e.end, e.label))
        for q in clip_questions(f"clip{clip}", events, cfg, vocab):
            seen_types.add(q.question_type)
            assert len(q.choices) == 4 and len(set(q.choices)) == 4, q
            assert q.choices.count(q.answer) == 1, q
    assert seen_types == {"counting", "sequencing", "duration", "frequency"}


def test_numeric_neighbours_stay_on_the_grid_and_above_the_floor():
    assert numeric_neighbours(1, 1, lowest=1) == [2, 3, 4]
    assert numeric_neighbours(3, 1, lowest=1) == [4, 2, 5]
    assert numeric_neighbours(1.0, 0.5, lowest=0.5) == [1.5, 0.5, 2.0]


def test_deterministic_from_seed_and_independent_of_row_order(source, tmp_path):
    assert _convert(source, tmp_path / "a") == 0
    assert _convert(source, tmp_path / "b") == 0
    first = (tmp_path / "a" / "train.jsonl").read_bytes()
    assert first == (tmp_path / "b" / "train.jsonl").read_bytes()
    lines = TSV.splitlines()
    (source / "strong.tsv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert _convert(source, tmp_path / "c") == 0
    assert sorted(first.splitlines()) == sorted((tmp_path / "c" / "train.jsonl").read_bytes().splitlines())
    (source / "strong.tsv").write_text(TSV)
    outs = set()
    for seed in range(4):  # with 7 questions of 4 options, four seeds cannot all agree by chance
        assert _convert(source, tmp_path / f"s{seed}", "--seed", str(seed)) == 0
        outs.add((tmp_path / f"s{seed}" / "train.jsonl").read_bytes())
    assert len(outs) > 1


def test_unreadable_inputs_fail_with_the_fix(source, tmp_path, capsys):
    (source / "bad.tsv").write_text("clip\t0\t1\t/m/dog\n")
    code = strong_main(["--tsv", str(source / "bad.tsv"), "--labels", str(source / "labels.tsv"),
                        "--audio-root", str(source / "audio"), "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "must start with the header" in capsys.readouterr().err
    code = strong_main(["--tsv", str(source / "strong.tsv"), "--labels", str(source / "missing.tsv"),
                        "--audio-root", str(source / "audio"), "--out", str(tmp_path / "y"), "--no-progress"])
    assert code == 2 and "--labels" in capsys.readouterr().err


def test_runs_on_the_synthetic_set(tmp_path):
    from aqa.data.synth import build, load_synth_config

    cfg = load_synth_config(None, ["sizes.train=12", "sizes.dev=3", "sizes.eval=3"])
    build(tmp_path / "demo", cfg, progress=False, verbose=False)
    raw = tmp_path / "demo" / "raw"
    assert strong_main(["--tsv", str(raw / "strong_train.tsv"), "--labels", str(raw / "mid_to_display_name.tsv"),
                        "--audio-root", str(raw / "audio"), "--out", str(tmp_path / "as"), "--no-progress"]) == 0
    rows = read_jsonl(tmp_path / "as" / "train.jsonl")
    assert {r["meta"]["segment_id"] for r in rows} == {f"{p}_train_{i:04d}" for p in ("bqa", "tsqa", "cqa")
                                                        for i in range(4)}
    assert all(cfg.generic_label not in json.dumps(r["meta"]["events"]) for r in rows)
