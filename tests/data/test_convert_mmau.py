"""data_prep.mmau on the real test-mini file, with generated audio for a subset (the rest: missing audio)."""

import json
from functools import partial
from pathlib import Path

import pytest

from aqa.data.manifest import load_manifest, read_jsonl
from aqa.data.sources.mmau import normalise_category
from data_prep.mmau import main
from tests.helpers import FIXTURES, write_sine

# The official file (Sakshi113/MMAU, 1000 items), stored unchanged so the test needs no download.
FIXTURE = FIXTURES / "mmau-test-mini.json"


def has_duplicate_choices(item) -> bool:
    trimmed = [c.strip() for c in item["choices"]]
    return len(set(trimmed)) != len(trimmed)


@pytest.fixture(scope="module")
def items():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


write_clip = partial(write_sine, seconds=0.2, freq=500.0, amp=0.2)  # (path, sr=..., channels=...)


def test_real_fixture_with_a_subset_of_audio(tmp_path, items, capsys):
    assert len(items) == 1000
    # The subset: the first 12 items, every list-valued category, and two items with repeated options.
    listed = [it for it in items if isinstance(it["category"], list)]
    dupes = [it for it in items if has_duplicate_choices(it)][:2]
    subset = {it["id"]: it for it in items[:12] + listed + dupes}
    root = tmp_path / "mmau"
    for i, item_id in enumerate(subset):
        # Half at the path audio_id names, half flat (found by name); mixed rates and channel counts.
        rel = subset[item_id]["audio_id"] if i % 2 else f"{item_id}.wav"
        write_clip(root / rel, sr=(16000, 44100, 48000)[i % 3], channels=1 + i % 2)

    out = tmp_path / "out"
    assert main(["--src", str(FIXTURE), "--audio-root", str(root), "--out", str(out), "--no-progress"]) == 0

    kept = {r.id: r for r in load_manifest(out / "dev.jsonl")}
    quarantine = {q["id"]: q["reason"] for q in read_jsonl(out / "quarantine.jsonl")}
    expect_kept = set(subset)  # repeated options included: dev scores them by text
    assert set(kept) == expect_kept
    assert len(kept) + len(quarantine) == len(items)
    n_q = len(items) - len(expect_kept)
    assert f"in=1000 kept={len(expect_kept)} quarantined={n_q} (dev={len(expect_kept)})" in capsys.readouterr().out

    for it in dupes:  # has audio and repeated options: kept, options as the source has them
        trimmed = [c.strip() for c in it["choices"]]
        assert kept[it["id"]].choices == trimmed and len(set(trimmed)) < len(trimmed)
    missing = [it for it in items if it["id"] not in subset]
    for it in missing:
        name = Path(it["audio_id"]).name
        assert quarantine[it["id"]] == f"audio file '{name}' not found under the audio root"

    train = tmp_path / "train_out"  # converted for training, repeated options are quarantined instead
    assert main(["--src", str(FIXTURE), "--audio-root", str(root), "--split", "train", "--out", str(train),
                 "--no-progress"]) == 0
    q_train = {q["id"]: q["reason"] for q in read_jsonl(train / "quarantine.jsonl")}
    assert all("duplicate choices" in q_train[it["id"]] for it in dupes)

    for item_id, rec in kept.items():
        src = subset[item_id]
        assert rec.part == "mmau" and rec.split == "dev"
        assert rec.choices == [c.strip() for c in src["choices"]] and rec.answer == src["answer"].strip()
        assert rec.question == src["question"].strip()
        assert rec.meta["task"] == src["task"] and rec.meta["difficulty"] == src["difficulty"]
        assert rec.meta["sub_category"] == src["sub-category"] and rec.meta["source_split"] == "test-mini"
        assert rec.meta["category"] in ("Reasoning", "Information Extraction")  # lists normalised to text
        assert rec.meta["duration_s"] == pytest.approx(0.2, abs=1e-3)
        assert (root / rec.audio).is_file()
    assert any(isinstance(subset[i]["category"], list) for i in kept)


def test_bad_items_are_quarantined(tmp_path, items, capsys):
    good = items[0]
    write_clip(tmp_path / "audio" / Path(good["audio_id"]).name, sr=16000, channels=1)
    bad = [
        "not an object",
        {k: v for k, v in good.items() if k != "choices"} | {"id": "no-choices"},
        good | {"id": "one-choice", "choices": ["Man"]},
        good | {"id": "wrong-answer", "answer": "Dog"},
        good | {"id": "empty-q", "question": ""},
        good | {"id": "escape", "audio_id": "../../etc/x.wav"},
        good,
        good | {"id": good["id"]},  # a repeated id
    ]
    src = tmp_path / "mini.json"
    src.write_text(json.dumps(bad))
    out = tmp_path / "out"
    assert main(["--src", str(src), "--audio-root", str(tmp_path / "audio"), "--out", str(out), "--no-progress"]) == 0
    q = read_jsonl(out / "quarantine.jsonl")
    reasons = [e["reason"] for e in q]
    assert len(q) == 7 and len(load_manifest(out / "dev.jsonl")) == 1
    for needle in ("not an object", "missing field(s) choices", "1 choice(s)", "answer 'Dog' is not among",
                   "empty question", "escapes the audio root", "duplicate id"):
        assert any(needle in r for r in reasons), needle
    assert q[0]["id"] == "item 0" and q[0]["source"] == str(src)


@pytest.mark.parametrize(
    "content,message",
    [(b"[{", "malformed JSON"), (b'["\xe9t\xe9"]', "not UTF-8"), (b'{"id": 1}', "expected the list")],
)
def test_unreadable_file_exits_non_zero(tmp_path, capsys, content, message):
    src = tmp_path / "mini.json"
    src.write_bytes(content)
    (tmp_path / "audio").mkdir()
    assert main(["--src", str(src), "--audio-root", str(tmp_path / "audio"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o" / "dev.jsonl").exists()


def test_nothing_kept_exits_non_zero(tmp_path, capsys):
    (tmp_path / "audio").mkdir()
    assert main(["--src", str(FIXTURE), "--audio-root", str(tmp_path / "audio"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "nothing kept out of 1000" in capsys.readouterr().err
    assert len(read_jsonl(tmp_path / "o" / "quarantine.jsonl")) == 1000


def test_normalise_category():
    assert normalise_category(["Reasoning"]) == "Reasoning" == normalise_category(" Reasoning ")
    assert normalise_category(["Reasoning", "Reasoning", "Information Extraction"]) == "Reasoning / Information Extraction"
    assert normalise_category([]) is None and normalise_category(None) is None


def test_every_test_mini_question_is_kept_for_evaluation(tmp_path, items, capsys):
    """With audio for all 1000 items, the dev conversion keeps all 1000 (published MMAU figures are over all
    of them), the 27 with repeated options included."""
    root = tmp_path / "mmau"
    for item in items:
        write_sine(root / item["audio_id"], seconds=0.06)
    assert main(["--src", str(FIXTURE), "--audio-root", str(root), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    kept = load_manifest(tmp_path / "out" / "dev.jsonl").records
    assert len(kept) == 1000 and not read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert sum(has_duplicate_choices(it) for it in items) == 27
    assert "in=1000 kept=1000 quarantined=0" in capsys.readouterr().out
