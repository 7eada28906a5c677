"""Option-reading questions (the tiny backbones' pretraining stage): a valid manifest whose answer is named in the
question, options in random order, every clip silent and of its split's length, the same bytes for the same seed."""

from collections import Counter
from pathlib import Path

import soundfile as sf

from aqa.data.manifest import load_manifest, read_dataset_info, write_jsonl
from aqa.data.option_reading import ReadingConfig, ReadingSplit, option_words
from data_prep.option_reading import main as reading_main


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_jsonl(src / "train.jsonl", [
        {"id": "a", "choices": ["beep, then hiss", "rattle"], "answer": "rattle"},
        {"id": "b", "choices": ["Azure warbler", "Reed cricket", "1", "2"], "answer": "1"},
    ])
    return src


def test_words_are_those_of_the_option_texts(tmp_path):
    assert option_words(_source(tmp_path)) == ["1", "2", "Azure", "Reed", "beep", "cricket", "hiss", "rattle",
                                               "then", "warbler"]


def test_manifest_answers_named_in_question_orders_random(tmp_path):
    out = tmp_path / "reading"
    argv = ["--out", str(out), "--words-from", str(_source(tmp_path)), "--split", "train=400@0.1,2.5",
            "--split", "dev_audio=40@2.5", "--no-progress"]
    assert reading_main(argv) == 0
    train, dev = load_manifest(out / "train.jsonl"), load_manifest(out / "dev_audio.jsonl")
    assert (len(train), len(dev)) == (400, 40)
    assert read_dataset_info(out)["splits"]["train"] == {"count": 400, "source": "option_reading"}
    positions, sizes = Counter(), Counter()
    for rec in train.records:
        assert rec.question == f'Which option says "{rec.answer}"?'
        assert len(set(rec.choices)) == len(rec.choices) and rec.answer in rec.choices
        assert rec.meta["chance"] == round(1 / len(rec.choices), 6)
        positions[rec.answer_index] += 1
        sizes[len(rec.choices)] += 1
    assert set(sizes) == {2, 3, 4, 5}
    assert min(positions[i] for i in range(2)) > 80  # the answer's position is spread, not fixed
    # the train questions take turns on the two clip lengths; dev_audio has one
    for rec, seconds in [*((r, 0.1 if i % 2 == 0 else 2.5) for i, r in enumerate(train.records[:4])),
                         (dev.records[0], 2.5)]:
        manifest = train if rec.split == "train" else dev
        wave, sr = sf.read(manifest.audio_path(rec))
        assert sr == 16_000 and len(wave) == round(seconds * sr) and not wave.any()
        assert rec.meta["duration_s"] == seconds
    # the same arguments give the same bytes
    again = tmp_path / "again"
    assert reading_main([*argv[:1], str(again), *argv[2:]]) == 0
    for name in ("train.jsonl", "dev_audio.jsonl", "dataset.json"):
        assert (again / name).read_text() == (out / name).read_text()


def test_bad_split_and_too_few_words_are_clear_errors(tmp_path, capsys):
    src = _source(tmp_path)
    assert reading_main(["--out", str(tmp_path / "x"), "--words-from", str(src), "--split", "train=many"]) == 2
    assert "NAME=N@SECONDS[,SECONDS...]" in capsys.readouterr().err
    assert reading_main(["--out", str(tmp_path / "y"), "--words-from", str(src), "--max-options", "12"]) == 2
    assert "--words-from" in capsys.readouterr().err
    assert ReadingSplit.parse("train=8@0.5") == ReadingSplit("train", 8, (0.5,))
    assert ReadingSplit.parse("train=8@0.1,2.5").clip_seconds == (0.1, 2.5)
    assert [s.name for s in ReadingConfig().splits] == ["train_short", "dev_short", "train", "dev"]


def test_event_labels_give_each_question_made_up_detected_events(tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("/m/a\tbeep\n/m/b\tengine hum\n")
    out = tmp_path / "reading"
    assert reading_main(["--out", str(out), "--words-from", str(_source(tmp_path)), "--split", "train=200@2.5",
                         "--event-labels", str(labels), "--no-progress"]) == 0
    counts = Counter()
    for rec in load_manifest(out / "train.jsonl").records:
        events = rec.meta["events"]
        counts[len(events)] += 1
        assert [e["onset"] for e in events] == sorted(e["onset"] for e in events)
        for e in events:  # the fields data_prep.sed_events writes, within the clip
            assert e["label"] in {"beep", "engine hum"} and 0 <= e["onset"] < e["offset"] <= 2.5
            assert 0.3 <= e["score"] <= 1.0
    assert set(counts) == {0, 1, 2, 3, 4}
    labels.write_text("no tab here\n")
    assert reading_main(["--out", str(tmp_path / "bad"), "--words-from", str(_source(tmp_path)),
                         "--event-labels", str(labels)]) == 2
