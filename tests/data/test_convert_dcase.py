"""data_prep.dcase end to end on a generated raw layout: every good case kept, every bad case quarantined."""

import json
from functools import partial

import numpy as np
import pytest
import soundfile as sf

from aqa.data.convert import AudioIndex, ConversionError, ManifestWriter
from aqa.data.manifest import load_manifest, read_dataset_info, read_jsonl
from aqa.data.sources.dcase import infer_part, infer_split
from aqa.data.sources.options import match_answer, strip_letter_prefixes
from aqa.data.validate import RecordError
from data_prep.dcase import main
from tests.helpers import write_sine

CHOICES = ["A. Humpback whale", "B. Sperm whale", "C. Killer whale", "D. Bottlenose dolphin"]


write_tone = partial(write_sine, freq=330.0, amp=0.3)  # (path, seconds=0.5, sr=16000, channels=1, subtype=None)


def question(audio_url, **over):
    q = {"audio_url": audio_url, "question": "Which species is calling?", "choice": list(CHOICES),
         "answer": "B. Sperm whale", "question_type": "species"}
    q.update(over)
    return q


# Good audio: (file name, writer kwargs). Each is the audio of one question that must be kept.
GOOD_AUDIO = {
    "stereo": ("stereo.wav", dict(channels=2)),
    "sr8k": ("sr8k.wav", dict(sr=8000)),
    "sr22k": ("sr22k.wav", dict(sr=22050)),
    "sr32k": ("sr32k.wav", dict(sr=32000)),
    "sr44k": ("sr44k.wav", dict(sr=44100)),
    "sr48k": ("sr48k.wav", dict(sr=48000, channels=2)),
    "float": ("float.wav", dict(subtype="FLOAT")),
    "pcm24": ("pcm24.wav", dict(subtype="PCM_24", sr=44100)),
    "flac": ("clip.flac", dict(sr=44100)),
    "ogg": ("clip.ogg", dict(sr=48000, channels=2)),
    "long45": ("long45.flac", dict(seconds=45.0)),
}


@pytest.fixture
def raw(tmp_path):
    """``raw/bqa/dev/*.json`` plus ``audio/`` (one clip in a subfolder) and a file outside the root."""
    qdir, audio = tmp_path / "raw" / "bqa" / "dev", tmp_path / "audio"
    for stem, (name, kw) in GOOD_AUDIO.items():
        write_tone(audio / name, **kw)
        (qdir / f"{stem}.json").parent.mkdir(parents=True, exist_ok=True)
        (qdir / f"{stem}.json").write_text(json.dumps(question(f"https://example.org/dcase/{name}")))
    write_tone(audio / "nested" / "deep.wav")
    write_tone(audio / "ok.wav")
    write_tone(tmp_path / "outside.wav")
    (audio / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 4)
    (audio / "empty.wav").write_bytes(b"")
    nan = np.full(8000, np.nan, np.float32)
    sf.write(audio / "nan.wav", nan, 16000, subtype="FLOAT")
    write_tone(audio / "short.wav", seconds=0.03)

    good_forms = {
        "answer_letter_only": question("ok.wav", answer="B"),
        "answer_text_only": question("ok.wav", answer="Sperm whale"),
        "no_prefixes": question("ok.wav", choice=["yes", "no"], answer="no"),
        "by_basename": question("/some/other/machine/deep.wav"),
        "relative_path": question("nested/deep.wav", answer="(B)"),
    }
    bad = {
        "corrupt_audio": question("corrupt.wav"),
        "empty_audio": question("empty.wav"),
        "missing_audio": question("https://example.org/nothere.wav"),
        "escaping_path": question("../outside.wav"),
        "nan_audio": question("nan.wav"),
        "short_audio": question("short.wav"),
        "answer_not_a_choice": question("ok.wav", answer="Blue whale"),
        "one_choice": question("ok.wav", choice=["A. Sperm whale"], answer="A"),
        "too_many_choices": question("ok.wav", choice=[f"opt {i}" for i in range(27)], answer="opt 3"),
        "duplicate_choices": question("ok.wav", choice=["A. Orca", "B. Sperm whale", "C. Orca"]),
        "empty_question": question("ok.wav", question="  "),
        "missing_answer": question("ok.wav", answer=None),
        "choice_not_list": question("ok.wav", choice="A. x, B. y"),
        "no_audio_field": {k: v for k, v in question("ok.wav").items() if k != "audio_url"},
    }
    for stem, q in {**good_forms, **bad}.items():
        (qdir / f"{stem}.json").write_text(json.dumps(q))
    (qdir / "malformed.json").write_text('{"audio_url": "ok.wav", "question": ')
    (qdir / "latin1.json").write_bytes(json.dumps(question("ok.wav", question="Qu\u00e9?"), ensure_ascii=False).encode("latin-1"))
    return tmp_path, list(GOOD_AUDIO) + list(good_forms)


EXPECTED_REASONS = {
    "corrupt_audio": "cannot decode",
    "empty_audio": "cannot decode",
    "missing_audio": "'nothere.wav' not found under the audio root",
    "escaping_path": "escapes the audio root",
    "nan_audio": "NaN/inf",
    "short_audio": "under the 50 ms minimum",
    "answer_not_a_choice": "answer 'Blue whale' is not among the choices",
    "one_choice": "1 choice(s)",
    "too_many_choices": "27 choices",
    "empty_question": "empty question",
    "missing_answer": "missing answer in split 'dev'",
    "choice_not_list": "must be a list",
    "no_audio_field": "missing field(s) audio_url",
    "malformed": "malformed JSON",
    "latin1": "not UTF-8",
}


def test_every_case_lands_where_it_should(raw, capsys):
    tmp, good = raw
    out = tmp / "out"
    rc = main(["--src", str(tmp / "raw"), "--audio-root", str(tmp / "audio"), "--split", "dev", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    kept = {r.id: r for r in load_manifest(out / "dev.jsonl")}
    quarantine = {q["id"]: q for q in read_jsonl(out / "quarantine.jsonl")}
    assert set(kept) == set(good) | {"duplicate_choices"}  # a repeated option is kept in dev, scored by text
    assert kept["duplicate_choices"].choices == ["Orca", "Sperm whale", "Orca"]
    assert set(quarantine) == set(EXPECTED_REASONS)
    for rid, reason in EXPECTED_REASONS.items():
        assert reason in quarantine[rid]["reason"], (rid, quarantine[rid])
        assert quarantine[rid]["source"].endswith(f"{rid}.json") and quarantine[rid]["split"] == "dev"
    # Counts add up, in the printed summary and on disk.
    n_in, n_kept = len(good) + len(EXPECTED_REASONS) + 1, len(good) + 1
    assert f"in={n_in} kept={n_kept} quarantined={len(EXPECTED_REASONS)} (dev={n_kept})" in capsys.readouterr().out
    assert read_dataset_info(out)["splits"]["dev"]["count"] == n_kept
    assert not (out / "train.jsonl").exists()  # a --split dev run owns dev only

    r = kept["stereo"]
    assert r.part == "bqa" and r.split == "dev" and r.audio == "stereo.wav"
    assert r.choices == ["Humpback whale", "Sperm whale", "Killer whale", "Bottlenose dolphin"]
    assert r.answer == "Sperm whale" and r.meta["question_type"] == "species"
    assert kept["long45"].meta["duration_s"] == pytest.approx(45.0)
    assert kept["sr8k"].meta["duration_s"] == pytest.approx(0.5)
    assert kept["answer_letter_only"].answer == kept["answer_text_only"].answer == "Sperm whale"
    assert kept["no_prefixes"].choices == ["yes", "no"] and kept["no_prefixes"].answer == "no"
    assert kept["by_basename"].audio == kept["relative_path"].audio == "nested/deep.wav"


def test_eval_split_keeps_missing_answers(tmp_path):
    write_tone(tmp_path / "audio" / "a.wav")
    src = tmp_path / "eval_questions.jsonl"
    lines = [json.dumps(question("a.wav", answer=None, id="e1")), "{not json", json.dumps(question("a.wav", id="e2"))]
    src.write_text("\n".join(lines) + "\n")
    rc = main(["--src", str(src), "--audio-root", str(tmp_path / "audio"), "--split", "eval", "--part", "tsqa",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    recs = {r.id: r for r in load_manifest(tmp_path / "out" / "eval.jsonl")}
    assert recs["e1"].answer is None and recs["e2"].answer == "Sperm whale" and recs["e1"].part == "tsqa"
    (q,) = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert q["id"] == "eval_questions_line2" and "line 2: malformed JSON" in q["reason"]


def test_json_list_input_and_folder_inference(tmp_path):
    """No --split/--part: both come from folder names; ids from the items or from the file stem."""
    write_tone(tmp_path / "raw" / "audio" / "a.wav")
    for split in ("train", "dev"):
        d = tmp_path / "raw" / "Part2_TSQA" / split
        d.mkdir(parents=True)
        items = [question("a.wav", id=f"{split}-named"), question("a.wav"), question("gone.wav")]
        (d / "all.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    assert main(["--src", str(tmp_path / "raw"), "--out", str(out), "--no-progress"]) == 0
    dev = load_manifest(out / "dev.jsonl")  # files go in path order: dev/ before train/
    assert [r.id for r in dev] == ["dev-named", "all_00001"] and {r.part for r in dev} == {"tsqa"}
    assert [r.id for r in load_manifest(out / "train.jsonl")] == ["train-named"]  # all_00001 is dev's already
    quarantine = sorted((q["split"], q["id"], q["reason"]) for q in read_jsonl(out / "quarantine.jsonl"))
    assert [(s, i) for s, i, _ in quarantine] == [("dev", "all_00002"), ("train", "all_00001"), ("train", "all_00002")]
    assert "'gone.wav' not found" in quarantine[0][2] and "duplicate id 'all_00001'" in quarantine[1][2]
    assert not (out / "eval.jsonl").exists()


def test_unknown_part_is_quarantined_and_unknown_split_is_an_error(tmp_path, capsys):
    write_tone(tmp_path / "audio" / "a.wav")
    (tmp_path / "q" / "dev").mkdir(parents=True)
    (tmp_path / "q" / "dev" / "x.json").write_text(json.dumps(question("a.wav")))
    out = tmp_path / "out"
    rc = main(["--src", str(tmp_path / "q"), "--audio-root", str(tmp_path / "audio"), "--out", str(out), "--no-progress"])
    assert rc == 2  # nothing kept: the one question has no part
    assert "nothing kept" in capsys.readouterr().err
    (q,) = read_jsonl(out / "quarantine.jsonl")  # written anyway, so the reason can be read
    assert "pass --part" in q["reason"]
    assert (out / "dev.jsonl").read_text() == ""  # an owned split is written even when empty

    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.json").write_text(json.dumps(question("a.wav")))
    rc = main(["--src", str(tmp_path / "flat"), "--audio-root", str(tmp_path / "audio"), "--part", "bqa",
               "--out", str(tmp_path / "out2")])
    assert rc == 2 and "pass --split" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no .json or .jsonl question files"),
        (lambda p: p.write_text("[{"), "cannot be read: malformed JSON"),
        (lambda p: p.write_bytes(b'["\xff\xfe"]'), "not UTF-8"),
    ],
)
def test_unreadable_input_exits_non_zero(tmp_path, capsys, make, message):
    src = tmp_path / "src.json"
    make(src)
    (tmp_path / "audio").mkdir()
    rc = main(["--src", str(src), "--audio-root", str(tmp_path / "audio"), "--split", "dev", "--part", "bqa",
               "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_runs_per_split_share_one_directory(tmp_path):
    write_tone(tmp_path / "audio" / "a.wav")
    for split in ("train", "dev"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"{split}1.json").write_text(json.dumps(question("a.wav")))
        (tmp_path / split / "shared.json").write_text(json.dumps(question("a.wav")))
        (tmp_path / split / f"{split}_bad.json").write_text("{")
    out = tmp_path / "out"

    def run(split, root="audio"):
        return main(["--src", str(tmp_path / split), "--audio-root", str(tmp_path / root), "--split", split,
                     "--part", "bqa", "--out", str(out), "--no-progress"])

    assert run("train") == 0 and run("dev") == 0
    assert [r.id for r in load_manifest(out / "train.jsonl")] == ["shared", "train1"]
    assert [r.id for r in load_manifest(out / "dev.jsonl")] == ["dev1"]
    q = read_jsonl(out / "quarantine.jsonl")
    assert sorted((e["split"], e["id"]) for e in q) == [("dev", "dev_bad"), ("dev", "shared"), ("train", "train_bad")]
    assert run("train") == 0  # re-running train replaces train's entries only
    assert len(read_jsonl(out / "quarantine.jsonl")) == 3
    info = read_dataset_info(out)["splits"]
    assert info["train"]["count"] == 2 and info["dev"]["count"] == 1
    (tmp_path / "audio2").mkdir()
    assert run("train", root="audio2") == 2  # one manifest directory, one audio root


def test_writer_summary_and_abort(tmp_path):
    write_tone(tmp_path / "a.wav")
    good = dict(id="x", part="bqa", split="train", audio="a.wav", question="q?", choices=["a", "b"], answer="a")
    with pytest.raises(ValueError, match="subset"):
        ManifestWriter(tmp_path / "o", tmp_path, "t", splits=("test",))
    with pytest.raises(KeyError):
        with ManifestWriter(tmp_path / "o", tmp_path, "t", splits=("train",), progress=False) as w:
            w.add(good, "s")
            raise KeyError("converter bug")
    assert not list((tmp_path / "o").glob("*.jsonl*"))  # an aborted run publishes nothing
    w = ManifestWriter(tmp_path / "o", tmp_path, "t", splits=("train", "dev"), progress=False, verbose=False)
    assert w.add(good, "s") is None
    assert "split 'eval' is not written" in w.add({**good, "id": "y", "split": "eval"}, "s")
    assert "not a JSON object" in w.add([1], "s")
    s = w.close()
    assert (s.n_in, s.n_kept, s.quarantined, s.kept) == (3, 1, 2, {"train": 1, "dev": 0})
    assert (tmp_path / "o" / "dev.jsonl").read_text() == ""


def test_audio_index(tmp_path):
    for rel in ("a/x.wav", "b/x.wav", "b/y.wav"):
        write_tone(tmp_path / rel, seconds=0.06)
    idx = AudioIndex(tmp_path)
    assert idx.resolve("http://h/y.wav") == "b/y.wav"
    assert idx.resolve("C:\\data\\b\\y.wav") == "b/y.wav"
    assert idx.resolve("/elsewhere/a/x.wav") == "a/x.wav"  # name shared by two files: the folder decides
    assert idx.resolve(str(tmp_path / "b" / "x.wav")) == "b/x.wav"
    for ref, reason in [("x.wav", "ambiguous"), ("../b/y.wav", "escapes"), ("z.wav", "not found"), ("", "no audio")]:
        with pytest.raises(RecordError, match=reason):
            idx.resolve(ref)
    with pytest.raises(ConversionError, match="--audio-root"):
        AudioIndex(tmp_path / "nope")


def test_option_prefixes_and_answer_matching():
    assert strip_letter_prefixes(["A. cat", "B) dog", "(C) cow"]) == (["cat", "dog", "cow"], True)
    assert strip_letter_prefixes(["A dog", "B cat"]) == (["A dog", "B cat"], False)  # capitals, not labels
    assert strip_letter_prefixes(["B. cat", "A. dog"])[1] is False  # out of order: part of the text
    raw = ["A. cat", "B. dog"]
    choices, _ = strip_letter_prefixes(raw)
    for given in ("B. dog", "dog", "B", "(B)", "b.", "Dog", "B. Dog"):
        assert match_answer(given, raw, choices) == "dog", given
    assert match_answer("C", raw, choices) == "C"  # no option C: left for validation to reject
    assert match_answer("", raw, choices) is None and match_answer(None, raw, choices) is None


def test_folder_inference_reads_words_not_substrings():
    assert infer_part("raw/Part1_BQA/dev/q.json") == "bqa" and infer_split("raw/Part1_BQA/dev/q.json") == "dev"
    assert infer_split("x/validation/q.json") == "dev" and infer_split("x/eval_set/q.json") == "eval"
    assert infer_part("raw/tsqa/bqa_extra/q.json") == "bqa"  # innermost wins
    assert infer_part("raw/cqatrain/q.json") is None and infer_split("developer/q.json") is None
