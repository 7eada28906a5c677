"""Event decoding on hand-made posterior tracks; data_prep.sed_events end to end (cache, notes, id checks)."""

import json

import numpy as np
import pytest

from aqa.data.manifest import load_manifest
from aqa.sed.annotate import EventsError, attach_events
from aqa.sed.calibration import Calibration, ClassCalibration
from aqa.sed.events import EventConfig, contiguous_regions, decode_events, smooth
from aqa.sed.labels import LabelMap
from data_prep.sed_events import main as sed_events_main
from tests.helpers import noise, record, write_manifest, write_wave

CFG = EventConfig(median_window=3, threshold=0.1, decimals=2)


def test_contiguous_regions_include_both_ends():
    assert contiguous_regions(np.array([1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)) == [(0, 2), (4, 5), (6, 8)]
    assert contiguous_regions(np.zeros(4, dtype=bool)) == []
    assert contiguous_regions(np.zeros(0, dtype=bool)) == []


def test_events_from_a_hand_made_track():
    # 0.16 s segments. "Dog": on for segments 2-6 with a one-segment dip at 4 (filled by the median),
    # "Bird": a one-segment blip at 1 (removed) and a run over the last three segments (cut at the clip end).
    dog = [0.0, 0.05, 0.8, 0.6, 0.02, 0.7, 0.9, 0.0, 0.0, 0.0]
    bird = [0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5, 0.4]
    probs = np.array([dog, bird]).T  # [10, 2]
    events = decode_events(probs, hop_s=0.16, duration_s=1.55, names=["Dog", "Bird"], cfg=CFG)
    assert events == [
        {"label": "Dog", "onset": 0.32, "offset": 1.12, "score": 0.7},
        {"label": "Bird", "onset": 1.12, "offset": 1.55, "score": 0.4},
    ]
    # filtered by hand (3-median, edges repeated): dog -> active segments 2..6, bird -> 7..9
    assert smooth(probs, 3)[:, 0].round(2).tolist() == [0.0, 0.05, 0.6, 0.6, 0.6, 0.7, 0.7, 0.0, 0.0, 0.0]
    assert smooth(probs, 3)[:, 1].round(2).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.4, 0.4]


def test_threshold_is_strict_and_window_one_keeps_the_raw_track():
    probs = np.array([[0.1], [0.11], [0.1], [0.5]])
    cfg = EventConfig(median_window=1, threshold=0.1, decimals=3)
    events = decode_events(probs, hop_s=0.5, duration_s=2.0, names=["X"], cfg=cfg)
    assert [(e["onset"], e["offset"], e["score"]) for e in events] == [(0.5, 1.0, 0.11), (1.5, 2.0, 0.5)]
    assert decode_events(np.zeros((0, 1)), 0.16, 0.1, ["X"], cfg) == []


def test_events_for_ids_missing_from_the_manifest_are_an_error_listing_them():
    records = [record(0), record(1)]
    with pytest.raises(EventsError, match=r"2 id\(s\) missing from the manifest: q7, q9"):
        attach_events(records, {"q0": [], "q1": [], "q7": [], "q9": []})
    with pytest.raises(EventsError, match=r"1 manifest id\(s\) have no events: q1"):
        attach_events(records, {"q0": []})
    attach_events(records, {"q0": [{"label": "A", "onset": 0, "offset": 1, "score": 0.5}], "q1": []},
                  {"q1": "too short"})
    assert records[0].meta["events"][0]["label"] == "A" and records[1].meta == {"events": [], "sed_note": "too short"}


def _dataset(root):
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((1.5, 0.12, 1.0)):
        write_wave(root / "audio" / f"c{i}.wav", noise(seconds, rng, scale=0.2))
    records = [record(0), record(1), record(2), record(0, id="q0b")]  # q0b: a second question about clip 0
    return write_manifest(root, "dev", records)


def test_sed_events_cli_writes_events_notes_and_reuses_its_cache(tmp_path, capsys, tiny):
    manifest = _dataset(tmp_path / "data")
    labels = LabelMap.from_pairs([("/m/a", "Alpha"), ("/m/b", "Beta")])
    sed = tiny.beats(labels, seed=1)
    # a calibration that marks everything as likely, so the random SED yields events
    cal = Calibration([ClassCalibration(c.index, c.mid, c.name, prior=0.5, a=0.0, b=3.0, calibrated=True)
                       for c in labels], hop_rows=1, window_rows=62, meta={})
    cal.save(tmp_path / "cal.json")
    args = ["--manifest", str(manifest), "--sed", str(sed), "--calibration", str(tmp_path / "cal.json"),
            "--out", str(tmp_path / "out"), "--config", "configs/demo/cascade_events.yaml"]
    assert sed_events_main(args) == 0
    assert "1 with a note (clip too short)" in capsys.readouterr().out
    out = load_manifest(tmp_path / "out" / "dev.jsonl")
    assert out.audio_root.resolve() == (tmp_path / "data" / "audio").resolve()
    by_id = {r.id: r for r in out.records}
    full = by_id["q0"].meta["events"]
    assert [e["label"] for e in full] == ["Alpha", "Beta"]  # p = sigmoid(3) everywhere: one event per class
    assert all(e["onset"] == 0.0 and e["offset"] == 1.44 for e in full)  # 9 rows of 0.16 s in 1.5 s
    assert by_id["q0b"].meta["events"] == full
    assert by_id["q1"].meta["events"] == [] and "shorter than one BEATs row" in by_id["q1"].meta["sed_note"]
    assert "sed_note" not in by_id["q2"].meta
    assert any((tmp_path / "out" / ".sed_cache").rglob("shard-*.arrow"))
    # a rerun with another threshold decodes again from the cache
    assert sed_events_main(args + ["events.threshold=0.99"]) == 0
    assert load_manifest(tmp_path / "out" / "dev.jsonl").records[0].meta["events"] == []
    capsys.readouterr()


def test_sed_events_cli_attaches_an_events_file_and_rejects_foreign_ids(tmp_path, capsys):
    manifest = _dataset(tmp_path / "data")
    events = tmp_path / "events.jsonl"
    rows = [{"id": i, "events": []} for i in ("q0", "q0b", "q1", "q2", "q_other")]
    events.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--manifest", str(manifest), "--events", str(events), "--out", str(tmp_path / "out")]
    assert sed_events_main(args) == 1
    assert "1 id(s) missing from the manifest: q_other" in capsys.readouterr().err
    events.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    assert sed_events_main(args) == 0
    assert all(r.meta["events"] == [] for r in load_manifest(tmp_path / "out" / "dev.jsonl").records)


def test_sed_events_refuses_a_calibration_fitted_on_another_grid(tmp_path, capsys, tiny):
    manifest = _dataset(tmp_path / "data")
    labels = LabelMap.from_pairs([("/m/a", "Alpha")])
    sed = tiny.beats(labels)
    Calibration([ClassCalibration(0, "/m/a", "Alpha", prior=0.1)], hop_rows=2, window_rows=62, meta={}).save(
        tmp_path / "cal.json")
    rc = sed_events_main(["--manifest", str(manifest), "--sed", str(sed), "--calibration",
                          str(tmp_path / "cal.json"), "--out", str(tmp_path / "out"),
                          "--config", "configs/demo/cascade_events.yaml"])
    assert rc == 1
    assert "fitted on segments of hop_rows=2" in capsys.readouterr().err
