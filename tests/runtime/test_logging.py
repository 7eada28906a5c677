"""aqa.runtime.logging: metrics.jsonl rows, silence off rank 0, truncation on resume, W&B offline, console lines."""

import json

import pytest

from aqa.runtime.logging import (
    METRICS_FILE,
    WANDB_ID_FILE,
    RunLogger,
    format_line,
    read_metrics,
    truncate_metrics,
)


def test_rows_go_to_metrics_jsonl_and_the_console(tmp_path, capsys):
    log = RunLogger(tmp_path / "run")
    log.log(1, {"loss": 2.5, "lr": 5e-5, "nonfinite": 0})
    log.log(2, {"accuracy": 0.75, "n": 8}, kind="eval")
    log.log(3, {"loss": float("nan")})
    log.close()
    rows = read_metrics(tmp_path / "run" / METRICS_FILE)
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "eval"), (3, "train")]
    assert rows[0]["loss"] == 2.5 and rows[1]["accuracy"] == 0.75
    assert rows[2]["loss"] == "nan"  # JSON has no NaN; the file stays valid JSON
    assert read_metrics(tmp_path / "run" / METRICS_FILE, kind="eval") == [rows[1]]
    out = capsys.readouterr().out
    assert "[train] step 1 | loss 2.5000 | lr 5.00e-05 | nonfinite 0" in out
    assert "[eval] step 2 | accuracy 0.7500 | n 8" in out


def test_other_ranks_write_nothing(tmp_path, capsys):
    log = RunLogger(tmp_path / "run", enabled=False, report_to=["wandb"])
    log.log(1, {"loss": 1.0})
    log.summary({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_resume_drops_rows_after_the_checkpoint_and_fresh_start_clears(tmp_path):
    run = tmp_path / "run"
    log = RunLogger(run, console=False)
    for step in range(1, 6):
        log.log(step, {"loss": float(step)})
    with (run / METRICS_FILE).open("a") as fh:
        fh.write('{"step": 6, "kind": "tr')  # a run killed mid-write
    RunLogger(run, console=False, resume_step=3).log(4, {"loss": 40.0})
    rows = read_metrics(run / METRICS_FILE)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    RunLogger(run, console=False)  # a fresh run starts a fresh file
    assert read_metrics(run / METRICS_FILE) == []


def test_truncate_metrics_counts_what_it_dropped(tmp_path):
    path = tmp_path / METRICS_FILE
    assert truncate_metrics(path, 3) == 0  # no file yet
    path.write_text("".join(json.dumps({"step": s, "kind": "train"}) + "\n" for s in (1, 2, 5, 9)))
    assert truncate_metrics(path, 2) == 2
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_unknown_reporter_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="wandb"):
        RunLogger(tmp_path, report_to=["tensorboard"])


def test_wandb_runs_offline_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    log = RunLogger(run, report_to=["wandb"], config={"lr": 1e-3}, project="aqa-test", console=False)
    log.log(1, {"loss": 1.0})
    log.summary({"step": 1, "dev_accuracy": 0.5})
    log.close()
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))
    resumed = RunLogger(run, report_to=["wandb"], project="aqa-test", resume_step=1, console=False)
    resumed.log(2, {"loss": 0.5})
    resumed.close()
    assert (run / WANDB_ID_FILE).read_text().strip() == run_id
    assert [r["kind"] for r in read_metrics(run / METRICS_FILE)] == ["train", "summary", "train"]


def test_format_line_keeps_numbers_short():
    line = format_line(12, {"loss": 1.23456789, "lr": 0.00005, "big": 123456.0, "n": 3, "zero": 0.0}, kind="train")
    assert line == "[train] step 12 | loss 1.2346 | lr 5.00e-05 | big 1.23e+05 | n 3 | zero 0.0000"
