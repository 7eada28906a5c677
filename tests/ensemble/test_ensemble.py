"""The learnable ensemble: known optima, never worse than the best member, alignment errors, the CLI end to end.

Synthetic members (``aqa.ensemble.simulate_members``) have logits ``scale * (signal * onehot(answer) + N(0, 1))``.
With unit noise the exact posterior is ``softmax(signal * x)``, so ``scale == signal`` is a calibrated member
(optimal T = 1) and ``scale == 4 * signal`` is the same member 4x overconfident (optimal T = 4).
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from aqa.config import ConfigError, load_config
from aqa.ensemble.fusion import (
    Aligned,
    align,
    fit,
    fused_log_probs,
    load_member,
    member_log_probs,
    prediction_rows,
    simulate_members,
    system_metrics,
)
from aqa.ensemble.run import EnsembleConfig, FitConfig, MemberSpec, format_table, report_entry, run_ensemble
from ensemble.fit import main as fit_main
from tests.helpers import ROOT

STEPS, LR = 500, 0.05  # the values of configs/ensemble.yaml (checked below)


def accuracy(data: Aligned, log_probs: np.ndarray) -> float:
    return system_metrics(data, log_probs)["accuracy"]


def member_rows(data: Aligned, m: int, answers: bool = True) -> list[dict]:
    """Member ``m`` of ``data`` as prediction rows (raw logits, the predictions contract)."""
    rows = prediction_rows(data, np.where(data.mask, data.logits[m], -np.inf), model=data.members[m])
    for row, logits in zip(rows, data.logits[m]):
        row["option_logits"] = [float(x) for x in logits[: len(row["choices"])]]
        if not answers:
            row["answer"] = None
    return rows


def write_rows(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# -- known optima -------------------------------------------------------------------------------------------


def test_config_file_loads_with_the_recipe_values():
    cfg = load_config(EnsembleConfig, ROOT / "configs/ensemble.yaml")
    assert (cfg.fit.steps, cfg.fit.lr) == (STEPS, LR)
    assert len(cfg.members) >= 2 and all(m.dev.endswith("dev/predictions.jsonl") for m in cfg.members)
    assert all(m.eval.endswith("eval/predictions.jsonl") for m in cfg.members)
    with pytest.raises(ConfigError, match="steps"):
        load_config(EnsembleConfig, ROOT / "configs/ensemble.yaml", ["fit.step=3"])


def test_overconfident_member_gets_temperature_above_one():
    calibrated = simulate_members(2000, [1.5], [1.5], seed=3)
    overconfident = dataclasses.replace(calibrated, logits=4 * calibrated.logits)
    t1 = fit(calibrated, STEPS, LR).temperatures[0]
    res = fit(overconfident, STEPS, LR)
    assert abs(t1 - 1.0) < 0.1  # the exact posterior needs no calibration
    assert res.temperatures[0] > 1.0
    assert res.temperatures[0] == pytest.approx(4 * t1, rel=1e-3)  # scaling logits scales the optimum
    assert res.losses[-1] < res.losses[0] - 0.1  # calibration paid off in NLL


def test_pure_noise_member_gets_almost_no_weight():
    data = simulate_members(2000, [1.5, 0.0], [4.0, 1.0], seed=0)
    res = fit(data, STEPS, LR)
    assert res.weights[1] < 0.05
    assert res.temperatures[0] > 1.0  # the informative member is 4x overconfident here too
    assert sum(res.weights) == pytest.approx(1.0)


def test_independent_informative_members_fuse_to_better_accuracy():
    data = simulate_members(2000, [1.2, 1.2], [1.0, 1.0], seed=1)
    res = fit(data, STEPS, LR)
    singles = [accuracy(data, lp) for lp in member_log_probs(data)]
    assert accuracy(data, fused_log_probs(data, res.fusion)) > max(singles) + 0.05
    assert res.weights == pytest.approx([0.5, 0.5], abs=0.05)  # equally good members, equal weights


@pytest.mark.parametrize("seed,signal,scale", [
    (0, [1.0, 1.4, 0.3, 0.0], [1.0, 3.0, 0.5, 2.0]),
    (1, [2.0, 0.5], [1.0, 1.0]),  # one strong member, one weak: fusing must not drag it down
    (2, [0.8, 0.0, 0.0], [0.3, 5.0, 1.0]),  # an underconfident signal among loud noise
    (3, [1.0], [2.0]),
])
def test_fused_accuracy_never_below_the_best_member(seed, signal, scale):
    data = simulate_members(1000, signal, scale, seed=seed)
    res = fit(data, STEPS, LR)
    best = max(accuracy(data, lp) for lp in member_log_probs(data))
    assert accuracy(data, fused_log_probs(data, res.fusion)) >= best - 0.01
    assert res.losses[-1] <= res.losses[0] + 1e-9  # never worse than where it started (the uniform average)


def test_fit_is_deterministic_and_padding_is_ignored():
    data = simulate_members(300, [1.0, 0.7], [2.0, 1.0], seed=5)
    a, b = fit(data, 100, LR), fit(data, 100, LR)
    assert a.weights == b.weights and a.temperatures == b.temperatures
    # Garbage in the padding slots must change nothing: the mask, not the pad value, removes them.
    junk = dataclasses.replace(data, logits=np.where(data.mask, data.logits, 1e3))
    c = fit(junk, 100, LR)
    assert c.weights == pytest.approx(a.weights) and c.temperatures == pytest.approx(a.temperatures)
    probs = np.exp(fused_log_probs(data, a.fusion))
    assert np.allclose(probs.sum(-1), 1.0) and (probs[~data.mask] == 0).all()


def test_metrics_by_hand():
    # two questions: 2 options (answer 0) and 3 options (answer 2); probabilities chosen by hand
    p = np.array([[0.8, 0.2, 0.0], [0.5, 0.3, 0.2]])
    data = Aligned(members=["a"], ids=["x", "y"], parts=["p", "q"], choices=[["a", "b"], ["a", "b", "c"]],
                   answers=np.array([0, 2]), logits=np.log(np.maximum(p, 1e-300))[None],
                   mask=np.array([[True, True, False], [True, True, True]]))
    m = system_metrics(data, member_log_probs(data)[0])
    assert m["accuracy"] == 0.5 and m["per_part"] == {"p": 1.0, "q": 0.0}
    assert m["nll"] == pytest.approx(-(np.log(0.8) + np.log(0.2)) / 2)
    assert m["ece"] == pytest.approx(0.5 * abs(1 - 0.8) + 0.5 * abs(0 - 0.5))


# -- bad members ------------------------------------------------------------------------------------------


@pytest.fixture
def two_members():
    data = simulate_members(30, [1.0, 1.0], [1.0, 1.0], seed=7)
    return member_rows(data, 0), member_rows(data, 1)


def test_missing_and_extra_ids_are_listed(two_members):
    a, b = two_members
    with pytest.raises(ValueError, match=r"member 'b' lacks 2 id\(s\): q00003, q00010"):
        align({"a": a, "b": [r for r in b if r["id"] not in ("q00003", "q00010")]})
    with pytest.raises(ValueError, match=r"member 'a' lacks 1 id\(s\): q00029"):
        align({"a": a[:-1], "b": b})


def test_mismatched_choices_and_answers_are_listed(two_members):
    a, b = two_members
    b[4] = {**b[4], "choices": list(reversed(b[4]["choices"]))}
    with pytest.raises(ValueError, match=r"choices differ between members for 1 id\(s\): q00004"):
        align({"a": a, "b": b})
    b[4] = dict(a[4], model="b")
    b[6] = {**b[6], "answer": next(c for c in b[6]["choices"] if c != b[6]["answer"])}
    with pytest.raises(ValueError, match=r"answers differ between members for 1 id\(s\): q00006"):
        align({"a": a, "b": b})


def test_repeated_ids_and_unanswered_dev_are_rejected(two_members):
    a, b = two_members
    with pytest.raises(ValueError, match="repeats question id 'q00000'"):
        align({"a": a + a[:1], "b": b})
    no_answers = [dict(r, answer=None) for r in a]
    with pytest.raises(ValueError, match=r"fitting needs answers.*Pass dev predictions"):
        align({"a": no_answers, "b": [dict(r, answer=None) for r in b]}, need_answers=True)
    assert not align({"a": no_answers}).has_answers  # eval: fine


def test_empty_and_bad_member_files(tmp_path, two_members):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="hold no rows; re-run inference/run.py"):
        load_member(str(empty))
    with pytest.raises(FileNotFoundError, match="run inference/run.py first"):
        load_member(str(tmp_path / "absent.jsonl"))
    bad = dict(two_members[0][0], option_logits=[float("nan")] * len(two_members[0][0]["choices"]))
    with pytest.raises(ValueError, match="non-finite option logit"):
        load_member(write_rows([bad], tmp_path / "nan.jsonl"))
    dev = write_rows(two_members[0], tmp_path / "a.jsonl")
    cfg = EnsembleConfig(out=str(tmp_path / "out"), fit=FitConfig(steps=5, lr=LR),
                         members=[MemberSpec(dev=dev, eval=dev), MemberSpec(dev=str(empty))])
    with pytest.raises(ConfigError, match="eval predictions are given for some members"):
        run_ensemble(cfg)
    cfg.members[0].eval = None
    with pytest.raises(ValueError, match="hold no rows"):
        run_ensemble(cfg)


# -- the command end to end -------------------------------------------------------------------------------


@pytest.fixture
def member_files(tmp_path):
    """Three members' dev (with answers) and eval (without) prediction files, under runs/<member>/infer/."""
    dev = simulate_members(240, [1.2, 1.0, 0.0], [3.0, 1.0, 1.0], seed=11)
    ev = simulate_members(120, [1.2, 1.0, 0.0], [3.0, 1.0, 1.0], seed=12)
    names = ["sharp", "soft", "noise"]
    paths = {}
    for m, name in enumerate(names):
        d = write_rows([dict(r, model=name) for r in member_rows(dev, m)], tmp_path / name / "infer/dev/predictions.jsonl")
        e = write_rows([dict(r, model=name) for r in member_rows(ev, m, answers=False)],
                       tmp_path / name / "infer/eval/predictions.jsonl")
        paths[name] = (d, e)
    return paths


def test_cli_flags_end_to_end(tmp_path, member_files, capsys):
    out = tmp_path / "ens"
    dev = [d for d, _ in member_files.values()]
    ev = [e for _, e in member_files.values()]
    summary = fit_main(["--dev", *dev, "--eval", *ev, "--out", str(out), "fit.steps=200"])
    printed = capsys.readouterr().out
    assert "baseline: uniform average" in printed and "baseline: best single (sharp)" in printed
    assert "ensemble (fitted)" in printed

    info = json.loads((out / "ensemble.json").read_text())
    assert info["members"] == ["sharp", "soft", "noise"] and info["fit"]["steps"] == 200
    assert info["weights"][2] < 0.1 and info["temperatures"][0] > 1.0
    for name in info["members"]:
        member = info["dev"]["members"][name]
        assert set(member) >= {"before", "after", "in_ensemble", "weight", "temperature", "calibration_temperature"}
        assert {"accuracy", "nll", "ece"} <= set(member["after"])
        assert member["after"]["nll"] <= member["before"]["nll"] + 1e-9  # its own temperature can only help
    assert info["dev"]["members"]["sharp"]["calibration_temperature"] > 2  # 3x overconfident by construction
    assert info["dev"]["fused"]["after"]["nll"] < info["dev"]["fused"]["before"]["nll"]
    for plot in info["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"reliability_sharp.png", "reliability_ensemble.png", "accuracy_by_part.png"} <= set(info["plots"])

    dev_rows = load_member(str(out / "dev.jsonl"))
    eval_rows = load_member(str(out / "eval.jsonl"))
    assert len(dev_rows) == 240 and len(eval_rows) == 120
    assert all(r["model"] == "ensemble" and r["pred"] in r["choices"] for r in dev_rows + eval_rows)
    assert all(abs(sum(np.exp(r["option_logits"])) - 1) < 1e-9 for r in eval_rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"dev"}  # eval has no answers
    assert metrics["dev"]["weighted_mean"] == pytest.approx(info["dev"]["fused"]["after"]["accuracy"])
    with (out / "submission.csv").open() as fh:
        sub = list(csv.reader(fh))
    assert sub[0] == ["question", "answer"] and len(sub) == 121
    assert [row[1] for row in sub[1:]] == [r["pred"] for r in eval_rows]
    assert summary["baselines"]["best_single"]["name"] == "sharp"
    assert "ensemble (fitted)" in format_table(summary)

    entry = report_entry(out, relative_to=tmp_path)
    assert entry["metrics"]["dev"]["n"] == 240 and entry["plots"][0].startswith("ens/")


def test_script_with_config_file(tmp_path, member_files):
    """The real script, as ``make ensemble`` runs it: members from a YAML file, no eval, plots off."""
    config = {"out": str(tmp_path / "ens"), "fit": {"steps": 50, "lr": LR, "init_temperature": 1.0},
              "plots": False, "members": [{"name": n, "dev": d} for n, (d, _) in member_files.items()]}
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = subprocess.run([sys.executable, "ensemble/fit.py", "--config", str(path), "ece_bins=5"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "no --eval" in proc.stdout
    out = tmp_path / "ens"
    assert (out / "ensemble.json").is_file() and (out / "dev.jsonl").is_file()
    assert not (out / "eval.jsonl").exists() and not list(out.glob("*.png"))

    bad = subprocess.run([sys.executable, "ensemble/fit.py", "--config", str(path), "--eval", "x.jsonl"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode != 0 and "go with --dev" in bad.stderr


def test_eval_with_answers_is_scored_and_matches_dev_when_it_is_dev(tmp_path, member_files):
    """Applying the fit to the dev files themselves must reproduce dev.jsonl and its metrics exactly."""
    specs = [MemberSpec(dev=d, eval=d, name=n) for n, (d, _) in member_files.items()]
    run_ensemble(EnsembleConfig(out=str(tmp_path / "ens"), fit=FitConfig(steps=30, lr=LR), members=specs,
                                plots=False))
    metrics = json.loads((tmp_path / "ens/metrics.json").read_text())
    assert metrics["eval"] == {**metrics["dev"], "split": "eval"}
    assert (tmp_path / "ens/eval.jsonl").read_text() == (tmp_path / "ens/dev.jsonl").read_text()


def test_fused_submission_writes_the_members_official_option_strings(tmp_path):
    from aqa.eval.metrics import write_submission

    def row(qid, logits, raw):
        out = {"id": qid, "part": "bqa", "choices": ["Orca", "Humpback whale"], "option_logits": logits,
               "pred": "Orca", "answer": None, "model": "m"}
        return {**out, "raw_choices": raw} if raw else out

    raw = ["A. Orca", "B. Humpback whale"]
    members = {"a": [row("q1", [0.0, 2.0], raw), row("q2", [1.0, 0.0], None)],
               "b": [row("q1", [0.0, 1.0], raw), row("q2", [2.0, 0.0], None)]}
    data = align(members)
    rows = prediction_rows(data, member_log_probs(data)[0])
    write_submission(rows, tmp_path / "s.csv")
    assert list(csv.reader((tmp_path / "s.csv").open())) == [["question", "answer"], ["q1", "B. Humpback whale"],
                                                            ["q2", "Orca"]]


def test_wilson_interval_on_hand_worked_values():
    from aqa.eval.metrics import wilson_interval

    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(1.0, 10)  # never past 1, and not a zero-width claim
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(0.66, 150)  # the demo's dev size: about +-0.075
    assert hi - lo == pytest.approx(0.150, abs=0.005)
