"""aqa.data.validate: each record rule and each audio rule, one at a time."""

import string

import numpy as np
import pytest
import soundfile as sf

from aqa.data.manifest import Record
from aqa.data.validate import (
    RecordError,
    check_audio,
    check_record,
    parse_record,
    resolve_audio,
    validate_record,
)
from tests.helpers import record, write_sine


def rec(**over) -> Record:
    base = dict(part="bqa", split="train", audio="a.wav", question="Which animal?",
                choices=["whale", "dolphin", "seal"], answer="dolphin")
    return record(1, **{**base, **over})


@pytest.fixture
def root(tmp_path):
    write_sine(tmp_path / "a.wav", 0.5, freq=300.0, amp=0.3)
    return tmp_path


def test_good_record_passes():
    assert check_record(rec(), set()) is None


def test_repeated_options_are_kept_in_dev_and_eval_only():
    repeated = dict(choices=["one", "three", "three", "zero"], answer="three")
    assert check_record(rec(split="dev", **repeated)) is None  # scored by text: both "three" positions are right
    assert check_record(rec(split="eval", **repeated)) is None
    assert "duplicate choices: options 2 and 3" in check_record(rec(split="train", **repeated))


def test_26_choices_pass_and_eval_may_omit_answer():
    letters = list(string.ascii_uppercase)
    assert check_record(rec(choices=letters, answer="Z")) is None
    assert check_record(rec(split="eval", answer=None)) is None
    assert check_record(rec(split="eval")) is None  # an eval answer, when known, is kept


@pytest.mark.parametrize(
    "over,reason",
    [
        (dict(id=" "), "empty id"),
        (dict(split="test"), "unknown split 'test'"),
        (dict(part=""), "empty part"),
        (dict(question="   "), "empty question"),
        (dict(choices=["dolphin"]), "1 choice(s)"),
        (dict(choices=[f"option {i}" for i in range(27)], answer="option 1"), "27 choices"),
        (dict(choices=["whale", " ", "dolphin"]), "choice 2 is empty"),
        (dict(choices=["whale", "dolphin", " dolphin "]), "duplicate choices: options 2 and 3"),
        (dict(answer="shark"), "answer 'shark' is not among the choices"),
        (dict(answer=None), "missing answer in split 'train'"),
        (dict(answer=None, split="dev"), "missing answer in split 'dev'"),
        (dict(audio=""), "empty audio path"),
    ],
)
def test_each_record_rule(over, reason):
    got = check_record(rec(**over), set())
    assert got is not None and reason in got


def test_duplicate_id():
    seen = {"q1"}
    assert "duplicate id 'q1'" in check_record(rec(), seen)
    assert check_record(rec(id="q2"), seen) is None


@pytest.mark.parametrize(
    "data,reason",
    [
        ([], "not a JSON object"),
        (dict(id="x"), "missing field(s)"),
        (dict(id="x", part="p", split="train", audio="a", question="q", choices="a,b", answer="a"), "'choices' must be a list"),
        (dict(id="x", part="p", split="train", audio="a", question="q", choices=["a", {"b": 1}], answer="a"), "choice 2 must be text"),
        (dict(id="x", part="p", split="train", audio="a", question=["q"], choices=["a", "b"], answer="a"), "'question' must be text"),
        (dict(id="x", part="p", split="train", audio="a", question="q", choices=["a", "b"], answer=["a"]), "'answer' must be"),
        (dict(id="x", part="p", split="train", audio="a", question="q", choices=["a", "b"], answer="a", meta=[1]), "'meta' must be"),
    ],
)
def test_parse_record_rejects_wrong_types(data, reason):
    with pytest.raises(RecordError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_record(data)


def test_parse_record_accepts_numbers_as_text():
    r = parse_record(dict(id=7, part="p", split="train", audio="a", question="How many?", choices=[1, 2], answer=2))
    assert r.id == "7" and r.choices == ["1", "2"] and r.answer == "2"


@pytest.mark.parametrize("path", ["../a.wav", "sub/../../a.wav", "/etc/passwd"])
def test_paths_that_escape_the_root(tmp_path, path):
    with pytest.raises(RecordError, match="escapes the audio root"):
        resolve_audio(path, tmp_path / "root")


def test_paths_inside_the_root(tmp_path):
    assert resolve_audio("sub/../a.wav", tmp_path) == tmp_path / "a.wav"
    assert resolve_audio("x/y.flac", tmp_path) == tmp_path / "x" / "y.flac"


def test_check_audio_records_duration(root):
    r = rec()
    assert check_audio(r, root) is None
    assert r.meta["duration_s"] == 0.5


def test_check_audio_reasons(root):
    sf.write(root / "short.wav", np.zeros(400, np.float32), 16000)  # 25 ms
    nan = np.full(1600, np.nan, np.float32)
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    (root / "bad.wav").write_bytes(b"\x00" * 64)
    assert "not found" in check_audio(rec(audio="none.wav"), root)
    assert "escapes the audio root" in check_audio(rec(audio="../a.wav"), root / "sub")
    assert "under the 50 ms minimum" in check_audio(rec(audio="short.wav"), root)
    assert "NaN/inf" in check_audio(rec(audio="nan.wav"), root)
    assert "cannot decode" in check_audio(rec(audio="bad.wav"), root)


def test_cache_decodes_each_file_once(root):
    cache = {}
    assert check_audio(rec(), root, cache) is None
    (root / "a.wav").write_bytes(b"broken now")  # a second decode would fail
    r2 = rec(id="q2")
    assert check_audio(r2, root, cache) is None and r2.meta["duration_s"] == 0.5
    assert check_audio(rec(id="q3"), root) is not None  # without the cache the broken file is seen


def test_validate_record_checks_record_rules_before_audio(root):
    # Both the choices and the audio are bad: the cheap record rule is reported, no decode needed.
    reason = validate_record(rec(choices=["a", "a"], answer="a", audio="missing.wav"), root, set())
    assert "duplicate choices" in reason
    assert "not found" in validate_record(rec(audio="missing.wav"), root, set())
    assert validate_record(rec(), root, set()) is None
