"""Inference over ranks, in-process: the shards, the part files, the merge, resume after a kill, and what the
merge refuses. The launchers themselves are exercised in tests/recipes/test_infer_ranks.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from aqa.data.manifest import ManifestError, Record
from aqa.eval.parts import MergeError, part_files, part_path
from aqa.eval.predict import InferConfig
from aqa.eval.runner import merge_split, run_inference
from aqa.eval.shards import SplitIndex
from aqa.runtime.distributed import DistInfo
from tests.helpers import noise, write_manifest, write_wave

CLIPS = [1.0, 2.0, 1.5, 1.0, 3.0]  # seconds; questions reuse clips, as in real sets
CHOICES = ["dog bark", "siren", "rain, heavy", "church bell"]


def _records(n: int, split: str = "dev") -> list[Record]:
    return [Record(id=f"q{i:02d}", part=("bqa", "cqa")[i % 2], split=split, audio=f"c{i % len(CLIPS)}.wav",
                   question="Which sound comes first?" + " really" * (i % 3), choices=CHOICES[: 2 + i % 3],
                   answer=None if split == "eval" else CHOICES[i % 2], meta={"question_type": f"t{i % 2}"})
            for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i, seconds in enumerate(CLIPS):
        write_wave(root / "audio" / f"c{i}.wav", noise(seconds, rng))
    write_manifest(root, "dev", _records(12))
    return root


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.shared("qwen2_audio", seed=4, chunk_seconds=1)  # 1 s windows: a fast encoder


def _cfg(model, data, out, **kw) -> InferConfig:
    return InferConfig(model_path=str(model), data_dir=str(data), output_dir=str(out), batch_size=3, permutations=2,
                       progress=False, **kw)


def _rank(r: int, world: int) -> DistInfo:
    return DistInfo(rank=r, local_rank=r, world_size=world, local_world_size=world)


def _files(out: Path) -> dict[str, object]:
    split = out / "dev"
    metrics = json.loads((split / "metrics.json").read_text())
    metrics.pop("run")  # wall time, questions/s, ranks: how the run went, not what it found
    return {"predictions": (split / "predictions.jsonl").read_text(), "metrics": metrics,
            "submission": (split / "submission.csv").read_text()}


@pytest.fixture(scope="module")
def reference(model, data_dir, tmp_path_factory) -> dict[str, object]:
    """The one-process run's files."""
    out = tmp_path_factory.mktemp("ref")
    summary = run_inference(_cfg(model, data_dir, out), "dev")
    assert summary["merged"] and summary["run"]["ranks"] == 1 and summary["run"]["scored"] == 12
    assert summary["run"]["wall_s"] > 0 and summary["run"]["questions_per_s"] > 0
    return _files(out)


def test_shards_keep_clips_whole_balance_the_work_and_order_longest_first(data_dir, tmp_path):
    index = SplitIndex.scan(data_dir / "dev.jsonl")
    assert len(index) == 12 and index.answered == 12
    order = index.order()
    assert (np.diff(index.audio_cost[order]) <= 0).all()  # longest audio first
    seen = index.clips[order].tolist()
    assert all(seen[seen.index(c) : seen.index(c) + seen.count(c)] == [c] * seen.count(c) for c in seen)  # together
    work = index.audio_cost + index.text_cost + 1
    for world in (1, 2, 3, 8):
        shards = [index.schedule(3, world, r) for r in range(world)]
        batches = [b.tolist() for shard in shards for b in shard]
        assert sorted(batches) == sorted(b.tolist() for b in index.batches(3)[0])  # the same batches for any world
        assert sorted(p for b in batches for p in b) == list(range(12))  # every question once
        clips = [{int(c) for b in shard for c in index.clips[b]} for shard in shards]
        assert sum(len(c) for c in clips) == len(set().union(*clips))  # a clip is decoded by one rank only
        for shard in shards:
            assert [int(b[0]) for b in shard] == [p for p in order.tolist() if p in {int(b[0]) for b in shard}]
        if world == 2:
            loads = [sum(int(work[b].sum()) for b in shard) for shard in shards]
            assert abs(loads[0] - loads[1]) <= max(int(work[index.clips == c].sum()) for c in set(seen))
    np.testing.assert_array_equal(index.positions(index.ids[[3, 0]]), [3, 0])
    assert index.positions(np.array([12345], dtype=np.uint64)).tolist() == [-1]
    write_manifest(tmp_path, "dev", _records(3) + _records(2))
    with pytest.raises(ManifestError, match="repeats question id.*'q00', 'q01'"):
        SplitIndex.scan(tmp_path / "dev.jsonl")


def test_two_ranks_in_turn_write_the_one_process_files(model, data_dir, tmp_path, reference):
    first = run_inference(_cfg(model, data_dir, tmp_path), "dev", _rank(0, 2))
    assert not first["merged"] and first["waiting"] and 0 < first["scored"] < 12  # rank 1 has not finished
    assert not (tmp_path / "dev" / "predictions.jsonl").exists()
    last = run_inference(_cfg(model, data_dir, tmp_path), "dev", _rank(1, 2))
    assert last["merged"] and first["scored"] + last["scored"] == 12 and last["run"]["ranks"] == 2
    assert _files(tmp_path) == reference
    assert [p.name for p in part_files(tmp_path / "dev")] == ["part-00000.jsonl", "part-00001.jsonl"]
    again = run_inference(_cfg(model, data_dir, tmp_path), "dev", _rank(0, 2))  # done and merged: nothing to do
    assert again["scored"] == 0 and again["resumed"] == 12 and "metrics" in again
    for name in ("predictions.jsonl", "metrics.json", "submission.csv"):  # a user deletes the outputs
        (tmp_path / "dev" / name).unlink()
    again = run_inference(_cfg(model, data_dir, tmp_path), "dev")  # merged again from the parts, nothing scored
    assert again["merged"] and again["scored"] == 0 and _files(tmp_path) == reference


def test_a_killed_run_resumes_with_another_number_of_ranks(model, data_dir, tmp_path, reference):
    run_inference(_cfg(model, data_dir, tmp_path), "dev", _rank(0, 3))
    part = part_path(tmp_path / "dev", 0)
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]) + lines[-1][:25])  # killed in the middle of its last row
    again = run_inference(_cfg(model, data_dir, tmp_path), "dev")  # one process now
    assert again["merged"] and again["resumed"] == len(lines) - 1 and again["scored"] == 12 - again["resumed"]
    assert _files(tmp_path) == reference  # the torn row's batch was scored whole again: the same logits
    rows = [json.loads(x) for p in part_files(tmp_path / "dev") for x in p.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"q{i:02d}" for i in range(12)]  # every id once, the torn one too


def test_merge_names_missing_and_repeated_ids(model, data_dir, tmp_path):
    cfg = _cfg(model, data_dir, tmp_path)
    with pytest.raises(MergeError, match="no part files"):
        merge_split(cfg, "dev")
    run_inference(cfg, "dev")
    parts = tmp_path / "dev" / "parts"
    rows = (parts / "part-00000.jsonl").read_text().splitlines(keepends=True)
    (parts / "part-00001.jsonl").write_text(rows[0] + rows[1])  # two launches wrote into one output_dir
    first_ids = sorted(json.loads(r)["id"] for r in rows[:2])
    with pytest.raises(MergeError, match=f"2 question.*more than one.*'{first_ids[0]}', '{first_ids[1]}'"):
        merge_split(cfg, "dev")
    with pytest.raises(MergeError, match="more than one"):
        run_inference(cfg, "dev")  # scoring never merges over a repeated id either
    (parts / "part-00001.jsonl").unlink()
    missing = json.loads(rows[5])["id"]
    (parts / "part-00000.jsonl").write_text("".join(rows[:5] + rows[6:]))
    with pytest.raises(MergeError, match=f"1 of 12 question.*no prediction.*'{missing}'.*same command again"):
        merge_split(cfg, "dev")
    assert run_inference(cfg, "dev")["scored"] == 1  # the same command scores what is missing
    assert merge_split(cfg, "dev")["merged"]
    (parts / "part-00000.jsonl").write_text(rows[0] + "not json\n")
    with pytest.raises(MergeError, match="part-00000.jsonl:2 is not a prediction row"):
        merge_split(cfg, "dev")


def test_predictions_of_a_run_before_part_files_are_kept(model, data_dir, tmp_path, reference):
    out = tmp_path / "dev"
    out.mkdir()
    (out / "predictions.jsonl").write_text("".join(reference["predictions"].splitlines(keepends=True)[:5]))
    summary = run_inference(_cfg(model, data_dir, tmp_path), "dev")
    assert (summary["resumed"], summary["scored"]) == (5, 7)
    assert _files(tmp_path) == reference
