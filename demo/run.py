"""``make demo``: the whole pipeline on the embedded default, on a CPU, through the users' own commands.

Every stage runs as a subprocess with exactly the command a user would type (``deepspeed train/sft.py
...``), so the demo exercises the real launchers and scripts, not a shortcut through the library.
The report (``report.json`` / ``report.md``) is assembled from the files the stages write.

Order: synthetic data and option-reading questions -> tiny models -> per backbone: the option-reading stage
(SFT in full on "Which option says ...?" questions: what pretraining gives a 7B backbone) -> per member: SFT
with shuffled options (2 CPU ranks) -> GRPO -> inference on dev and eval in 8 option orders -> the learnable
ensemble -> the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aqa.data.manifest import read_jsonl
from aqa.data.summary import summarize
from aqa.eval.metrics import (
    accuracy_by_part,
    chance_level,
    paired_difference,
    read_predictions,
    wilson_interval,
)
from aqa.eval.orders import row_order_accuracy
from aqa.runtime.distributed import free_port
from demo.report import load_report, save_report, upsert_member

DEMO_CONFIGS = Path("configs/demo")
# --long: recipes that learn but do not fit the default demo's 15 minutes on 2 CPU cores (Kimi-Audio's)
LONG_CONFIGS = DEMO_CONFIGS / "long"
# --smoke: the same stages and commands at a size that checks the chain, not what it learns
SMOKE_SIZES = ["--train", "48", "--dev", "24", "--eval", "24"]
SMOKE_READING = ["--split", "train_short=64@0.1", "--split", "dev_short=16@0.1", "--split", "train=64@2.5",
                 "--split", "dev=16@2.5"]
READING_DATA = "data/demo_reading"
# the tiny backbones' settings where the demo departs from the 7B value (python -m aqa.tiny NAME key=value):
# RoPE theta 1e6, as the text LLM and Qwen2.5-Omni have; with the 7B's 1e4 the tiny Qwen2-Audio learned to read
# options far slower (README, "Teaching the tiny backbones to read options")
TINY_OVERRIDES = {"qwen2_audio": ["rope_theta=1e6"], "kimi_audio": ["rope_theta=1e6"]}
SMOKE_TRAIN = {"train/sft.py": ["max_steps=2", "eval.every_steps=0", "checkpoint.every_steps=0"],
               "train/grpo.py": ["max_steps=2", "eval.every_steps=0", "checkpoint.every_steps=0"],
               "train/sed.py": ["max_steps=2", "eval.every_steps=0"]}


class StageFailed(RuntimeError):
    pass


@dataclass
class Member:
    """One trained system of the demo: the stages that make it and where its predictions land."""

    name: str
    backbone: str
    stage: str  # "sft" or "grpo": the last training stage
    run_dir: str  # runs/demo/<name>: adapter/ and infer/{dev,eval}/
    infer_config: str
    train: list[tuple[str, list[str]]] = field(default_factory=list)  # (title, command)
    infer_overrides: list[str] = field(default_factory=list)
    # scored again on eval with every clip silenced (how much it needs the audio); off for a member that reads
    # events, not audio (the cascade: its floor is the no-events pass)
    audio_floor: bool = True
    # the member's own report section, built after the ensemble: (python, stage runner) -> section or None
    report_section: Callable[[str, Callable[[str, list[str]], None]], dict | None] | None = None
    # a line the report prints under the floors table: what this run's recipe gives the member, when it is less
    # than what it needs to learn (and what to run instead)
    note: str | None = None


def run_stage(title: str, cmd: list[str], log_dir: Path) -> float:
    """Run one stage, streaming its output to the console and to ``log_dir/<title>.log``."""
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_path = log_dir / f"{title.replace(' ', '_').replace('/', '_')}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        last_bar = 0.0
        for line in proc.stdout:
            log.write(line)
            # tqdm redraws with carriage returns (or a line per update into a pipe): show log lines as they
            # come, and a progress bar's state at most every 15 s, so the console stays readable.
            shown = line.rsplit("\r", 1)[-1]
            is_bar = "\r" in line or "it/s]" in shown or "s/it]" in shown or "/s]" in shown
            if is_bar and time.time() - last_bar < 15:
                continue
            if is_bar:
                last_bar = time.time()
            if shown.strip():
                sys.stdout.write(shown if shown.endswith("\n") else shown + "\n")
        rc = proc.wait()
    dt = time.time() - t0
    if rc != 0:
        raise StageFailed(f"stage '{title}' failed (exit {rc}); its full output is in {log_path}")
    print(f"--- {title}: {dt:.1f} s", flush=True)
    return dt


def build_members(py: str, ds: list[str], long: bool = False) -> list[Member]:
    """The demo's members, each a chain of the users' commands with the demo configs. ``long``: Kimi-Audio
    through its option-reading stage and 1,500 steps of SFT in full (``configs/demo/long/``, about 9 minutes
    more on 2 CPU cores), where the default demo gives it 50 steps of LoRA SFT that stay at the floor."""
    cfg = DEMO_CONFIGS

    def reading(prefix: str, directory: Path = cfg) -> list[tuple[str, list[str]]]:
        """The backbone's option-reading stage where it has a config (``*_reading.yaml``): full SFT on
        READING_DATA beside a 0.1 s clip, writing the model/ its SFT starts from. Kimi-Audio has one only in the
        long demo: within the default demo's minutes its SFT does not get far enough to use it (README)."""
        path = directory / f"{prefix}_reading.yaml"
        return [(f"{prefix} option reading", [*ds, "train/sft.py", "--config", str(path)])] if path.is_file() else []

    qwen = Member(
        "qwen2_audio_sft", "qwen2_audio", "sft", "runs/demo/qwen2_audio_sft", str(cfg / "qwen2_audio_infer.yaml"),
        train=[*reading("qwen2_audio"),
               ("qwen2_audio SFT", [*ds, "train/sft.py", "--config", str(cfg / "qwen2_audio_sft.yaml")])],
    )
    qwen_grpo = Member(
        "qwen2_audio_grpo", "qwen2_audio", "grpo", "runs/demo/qwen2_audio_grpo", str(cfg / "qwen2_audio_infer.yaml"),
        train=[("qwen2_audio GRPO", [*ds, "train/grpo.py", "--config", str(cfg / "qwen2_audio_grpo.yaml")])],
        infer_overrides=["model_path=runs/demo/qwen2_audio_grpo/model", "adapter=null",
                         "output_dir=runs/demo/qwen2_audio_grpo/infer",
                         "model_name=qwen2_audio_grpo"],
    )
    members = [qwen, qwen_grpo]
    # Kimi-Audio: the default demo's LoRA SFT, or with ``long`` the chain in configs/demo/long/, whose SFT (in
    # full) writes model/ to a run dir of its own, so that neither demo resumes the other's checkpoints
    kimi_cfg = LONG_CONFIGS if long and (LONG_CONFIGS / "kimi_audio_sft.yaml").is_file() else cfg
    kimi_sft = kimi_cfg / "kimi_audio_sft.yaml"
    if kimi_sft.is_file():
        run_dir = yaml.safe_load(kimi_sft.read_text(encoding="utf-8"))["output_dir"]
        members.append(Member(
            "kimi_audio_sft", "kimi_audio", "sft", run_dir, str(cfg / "kimi_audio_infer.yaml"),
            train=[*reading("kimi_audio", kimi_cfg),
                   ("kimi_audio SFT", [*ds, "train/sft.py", "--config", str(kimi_sft)])],
            infer_overrides=[] if kimi_cfg == cfg else [f"model_path={run_dir}/model", "adapter=null",
                                                        f"output_dir={run_dir}/infer"],
            note=None if kimi_cfg != cfg else (
                "50 LoRA steps from the tiny init, what the 15 minutes leave it: at the floor. `make demo "
                "DEMO_ARGS=--long` adds its option-reading stage and 1,500 SFT steps in full (about 9 minutes more on "
                "2 CPU cores), after which its interval clears the floor (README, \"Teaching the tiny backbones to read options\")."),
        ))
    if (cfg / "qwen2_5_omni_sft.yaml").is_file():
        members.append(Member(
            "qwen2_5_omni_sft", "qwen2_5_omni", "sft", "runs/demo/qwen2_5_omni_sft",
            str(cfg / "qwen2_5_omni_infer.yaml"),
            train=[*reading("qwen2_5_omni"),
                   ("qwen2_5_omni SFT", [*ds, "train/sft.py", "--config", str(cfg / "qwen2_5_omni_sft.yaml")])],
            note="its option-reading stage, then 50 LoRA steps: the pipeline shown in a minute, not trained to "
                 "learn (near the floor after 200 steps too; README).",
        ))
    if (cfg / "cascade_sft.yaml").is_file():
        sed, events = "runs/demo/cascade/sed/model", "runs/demo/cascade/events"
        cascade = [
            ("tiny BEATs", [py, "-m", "aqa.sed.tiny", "--out", "runs/demo/cascade/sed_init",
                            "--labels", "data/demo/raw/mid_to_display_name.tsv", "--drop", "Environmental noise"]),
            ("cascade SED", [*ds, "train/sed.py", "--config", str(cfg / "cascade_sed.yaml")]),
            ("cascade calibration", [py, "-m", "aqa.sed.calibrate", "--config", str(cfg / "cascade_calibrate.yaml")]),
            *[(f"cascade events {split}", [py, "-m", "data_prep.sed_events", "--manifest", f"data/demo/{split}.jsonl",
                                           "--sed", sed, "--calibration", "runs/demo/cascade/calibration.json",
                                           "--out", events, "--config", str(cfg / "cascade_events.yaml")])
              for split in ("train", "dev", "eval")],
            *reading("cascade"),
            ("cascade SFT", [*ds, "train/sft.py", "--config", str(cfg / "cascade_sft.yaml")]),
            ("cascade GRPO", [*ds, "train/grpo.py", "--config", str(cfg / "cascade_grpo.yaml")]),
        ]
        members.append(Member(
            "cascade_grpo", "text_llm", "grpo", "runs/demo/cascade_grpo", str(cfg / "cascade_infer.yaml"),
            train=cascade,
            infer_overrides=["model_path=runs/demo/cascade_grpo/model", "adapter=null",
                             "output_dir=runs/demo/cascade_grpo/infer",
                             "model_name=cascade_grpo"],
            report_section=cascade_section, audio_floor=False,
        ))
    return members


def smoke_command(cmd: list[str]) -> list[str]:
    """A stage's command at smoke size: a couple of optimizer steps for every training script."""
    for script, overrides in SMOKE_TRAIN.items():
        if script in cmd:
            return [*cmd, *overrides]
    return cmd


def cascade_section(py: str, stage) -> dict | None:
    """The cascade's Cllr before/after calibration and its dev accuracy with and without events."""
    cal_path = Path("runs/demo/cascade/calibration.json")
    with_events = Path("runs/demo/cascade_grpo/infer/dev/metrics.json")
    if not cal_path.is_file() or not with_events.is_file():
        return None
    shutil.rmtree("runs/demo/cascade_grpo/infer_no_events", ignore_errors=True)
    # eval: the text-only floor of the report (question and options alone)
    stage("cascade inference dev and eval, no events", [
        py, "inference/run.py", "--config", str(DEMO_CONFIGS / "cascade_infer.yaml"), "--split", "dev,eval",
        "model_path=runs/demo/cascade_grpo/model", "adapter=null", "output_dir=runs/demo/cascade_grpo/infer_no_events",
        "model_name=cascade_grpo_no_events", "prompt.events=false"])
    cal = json.loads(cal_path.read_text(encoding="utf-8"))
    acc = {name: json.loads(Path(f"runs/demo/cascade_grpo/{d}/dev/metrics.json").read_text())["weighted_mean"]
           for name, d in (("with events", "infer"), ("without events", "infer_no_events"))}
    body = "\n".join([
        "| SED calibration (mean Cllr over calibrated classes) | before | after |", "|---|---|---|",
        f"| calibration split | {cal['mean_cllr_before']:.3f} | {cal['mean_cllr_after']:.3f} |",
        *([f"| held-out split | {cal['heldout_cllr_before']:.3f} | {cal['heldout_cllr_after']:.3f} |"]
          if cal.get("heldout_cllr_before") is not None else []),
        "", "| cascade on dev | weighted accuracy |", "|---|---|",
        *[f"| {k} | {100 * v:.1f} |" for k, v in acc.items()],
    ])
    floor_path = Path("runs/demo/cascade_grpo/infer_no_events/eval/predictions.jsonl")
    floor = scored(floor_path)
    return {"title": "Cascade: calibration and events", "body": body, "cllr": {
        "before": cal["mean_cllr_before"], "after": cal["mean_cllr_after"]}, "dev_accuracy": acc,
        "text_only_floor": floor,
        "text_only_floor_orders": order_scores(floor_path)}


def tiny_models(py: str, members: list[Member], seed: int) -> list[tuple[str, list[str]]]:
    """One ``python -m aqa.tiny`` per backbone the members use (text backbones included)."""
    backbones = sorted({m.backbone for m in members})
    return [(f"tiny {b}", [py, "-m", "aqa.tiny", b, "--out", f"runs/demo/models/{b}", "--seed", str(seed),
                           *TINY_OVERRIDES.get(b, [])])
            for b in backbones]


def scored(path: Path) -> dict | None:
    """Per-part accuracy of a predictions file with answers (the synthetic eval keeps them), with its 95 %
    interval and chance level; None when the file is missing or has no answers."""
    if not path.is_file():
        return None
    rows = [r for r in read_predictions(path) if r.get("answer") is not None]
    if not rows:
        return None
    acc = accuracy_by_part(rows)
    return {**acc, "interval": list(wilson_interval(acc["weighted_mean"], acc["n"])), "chance": chance_level(rows)}


def order_rows(path: Path) -> list[dict]:
    """The answered rows of a predictions file scored in several option orders, each with ``order_mean`` (the
    fraction of its orders right) and ``order_strict`` (right in all); [] when the file is missing or was scored
    in one order."""
    if not path.is_file():
        return []
    rows = [r for r in read_predictions(path) if r.get("answer") is not None and len(r.get("order_preds", [])) > 1]
    for r in rows:
        r["order_mean"], r["order_strict"] = row_order_accuracy(r)
    return rows


def order_scores(path: Path, rows: list[dict] | None = None) -> dict | None:
    """Mean and strict accuracy over the K option orders of a predictions file scored with ``permutations=K``
    (the eval split gets no metrics.json: its answers are scored here, as :func:`scored` does), plus the
    order-averaged prediction's accuracy; each weighted over parts with a 95 % Wilson interval over the n
    questions (for the mean a question counts by the fraction of its orders it got right, so that interval is an
    approximation). ``rows``: the file's :func:`order_rows`, when the caller has read them. None when the file is
    missing or was scored in one order."""
    rows = order_rows(path) if rows is None else rows
    if not rows:
        return None
    out: dict = {"orders": max(len(r["order_preds"]) for r in rows),
                 "canonical_aggregate": accuracy_by_part(rows)["weighted_mean"]}
    for key, column in (("mean_over_orders", "order_mean"), ("strict", "order_strict")):
        acc = accuracy_by_part(rows, column)
        out[key] = {**acc, "interval": list(wilson_interval(acc["weighted_mean"], acc["n"]))}
    return out


def reading_configs(members: list[Member]) -> list[Path]:
    """The option-reading configs (``*_reading.yaml``) the members' training commands run."""
    paths = [Path(cmd[cmd.index("--config") + 1]) for m in members for _, cmd in m.train if "--config" in cmd]
    return list(dict.fromkeys(p for p in paths if p.name.endswith("_reading.yaml")))


def reading_entries(members: list[Member]) -> list[dict]:
    """Per backbone, what its option-reading stage reached (the run dir its config names): the last dev
    accuracy the run logged (questions naming their answer, one option order each) beside the chance of the
    split it was evaluated on."""
    out = []
    for path in reading_configs(members):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        metrics = Path(cfg["output_dir"]) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        dev = Path(cfg["data_dir"]) / f"{cfg['dev_split']}.jsonl"
        chance = chance_level(read_jsonl(dev)) if dev.is_file() else None
        # a rerun appends to the same file: the last evaluation logged at each step
        evals = sorted({r["step"]: r for r in read_jsonl(metrics) if r.get("kind") == "eval"}.values(),
                       key=lambda r: r["step"])
        if evals:
            out.append({"backbone": cfg["backbone"], "stage": "reading",
                        "step": evals[-1]["step"], "dev_accuracy": evals[-1]["accuracy"], "n": evals[-1]["n"],
                        "chance": chance, "curve": [[r["step"], r["accuracy"]] for r in evals]})
    return sorted(out, key=lambda r: r["backbone"])


def grpo_against_sft(members: list[Member]) -> list[dict]:
    """Each GRPO member beside the SFT member of its backbone it started from, on eval in the option orders both
    were scored in: the two mean-over-orders accuracies with their intervals, and the paired difference (GRPO
    minus SFT, question by question) with its 95 % interval."""
    out = []
    for grpo in (m for m in members if m.stage == "grpo"):
        sft = next((m for m in members if m.stage == "sft" and m.backbone == grpo.backbone), None)
        if sft is None:
            continue
        paths = [Path(m.run_dir) / "infer" / "eval" / "predictions.jsonl" for m in (sft, grpo)]
        rows = [order_rows(p) for p in paths]
        if not all(rows):
            continue
        means = [{r["id"]: r["order_mean"] for r in file_rows} for file_rows in rows]
        ids = sorted(set(means[0]) & set(means[1]))
        out.append({"grpo": grpo.name, "sft": sft.name,
                    "sft_mean_over_orders": order_scores(paths[0], rows[0])["mean_over_orders"],
                    "grpo_mean_over_orders": order_scores(paths[1], rows[1])["mean_over_orders"],
                    **paired_difference([means[0][i] for i in ids], [means[1][i] for i in ids])})
    return out


def member_entry(m: Member) -> dict:
    """The member's ``report.json`` entry from the files its inference wrote: dev and eval accuracy with
    95 % intervals, and the silent-audio accuracy on eval where it was measured."""
    run = Path(m.run_dir)
    dev_pred, eval_pred = run / "infer" / "dev" / "predictions.jsonl", run / "infer" / "eval" / "predictions.jsonl"
    metrics = {"dev": scored(dev_pred), "eval": scored(eval_pred)}
    silent_path = run / "infer_silence" / "eval" / "predictions.jsonl"
    silent = scored(silent_path) if m.audio_floor else None
    silent_orders = order_scores(silent_path) if m.audio_floor else None
    orders = order_scores(eval_pred)
    return {
        "name": m.name, "backbone": m.backbone, "stage": m.stage, **({"note": m.note} if m.note else {}),
        "weights": str(run / "adapter") if (run / "adapter").is_dir() else str(run / "model"),
        "predictions": {"dev": str(dev_pred), "eval": str(eval_pred)},
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "chance": {k: v["chance"] for k, v in metrics.items() if v is not None},
        **({"silent_audio": {"eval": silent, **({"eval_orders": silent_orders} if silent_orders else {})}}
           if silent else {}),
        **({"orders": {"eval": orders}} if orders else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="the run directory the demo configs write to")
    parser.add_argument("--data", default="data/demo", help="where the synthetic data set is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-ranks", type=int, default=2, help="deepspeed --num_gpus (CPU ranks over gloo here)")
    parser.add_argument("--only", nargs="+", help="run only these members (names), e.g. qwen2_audio_sft")
    parser.add_argument("--smoke", action="store_true",
                        help="check the whole chain in a few minutes: 48/24/24 questions and 2 optimizer steps per "
                             "training stage (the scores mean nothing); make clean afterwards for a real demo")
    parser.add_argument("--long", action="store_true",
                        help="also train Kimi-Audio until it reads the audio into the options: its option-reading "
                             "stage and 1,500 SFT steps in full (configs/demo/long/; about 9 minutes more on 2 CPU "
                             "cores), in place of the default demo's 50 LoRA steps, which stay at the floor")
    args = parser.parse_args(argv)
    if Path(args.out) != Path("runs/demo") or Path(args.data) != Path("data/demo"):
        print("note: the demo configs read data/demo and write runs/demo; --out/--data only move the report "
              "and the data summary.", file=sys.stderr)

    t0 = time.time()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    py = sys.executable
    # a free port rather than the launcher's 29500, which another job on the machine may hold
    ds = [str(Path(py).parent / "deepspeed"), "--num_gpus", str(args.num_ranks), "--master_port", str(free_port())]
    members = build_members(py, ds, long=args.long)
    if args.only:
        members = [m for m in members if m.name in args.only]
    timings: dict[str, float] = {}
    report = load_report(out / "report.json")
    report["members"] = []

    def stage(title: str, cmd: list[str]) -> None:
        timings[title] = run_stage(title, smoke_command(cmd) if args.smoke else cmd, logs)

    try:
        # -- data: the embedded default, written in the DCASE layout and converted by data_prep.dcase
        stage("synthetic data", [py, "-m", "data_prep.synth", "--out", str(data), "--seed", str(args.seed),
                                 *(SMOKE_SIZES if args.smoke else [])])
        report["data_summary"] = summarize(data)
        # -- the option-reading questions of the tiny backbones' first stage, in the words of the demo's options
        stage("option-reading data", [py, "-m", "data_prep.option_reading", "--out", READING_DATA, "--words-from",
                                      str(data), "--seed", str(args.seed), *(SMOKE_READING if args.smoke else [])])
        # -- tiny random-init backbones, written as HF directories and loaded like a 7B checkpoint
        for title, cmd in tiny_models(py, members, args.seed):
            stage(title, cmd)
        # -- per member: train, then score dev and eval
        for m in members:
            for title, cmd in m.train:
                stage(title, cmd)
            # scoring is cheap: score afresh, so a rerun after a config change never meets stale predictions. Each
            # question in 8 option orders (the configs' permutations): mean and strict accuracy over the orders
            # say whether the member reads the options or only their positions
            shutil.rmtree(Path(m.run_dir) / "infer", ignore_errors=True)
            stage(f"{m.name} inference dev and eval", [py, "inference/run.py", "--config", m.infer_config,
                                                       "--split", "dev,eval", *m.infer_overrides])
            if m.audio_floor:  # the same eval questions, every clip silenced: how much the member needs audio
                shutil.rmtree(Path(m.run_dir) / "infer_silence", ignore_errors=True)
                stage(f"{m.name} inference eval, silent audio", [
                    py, "inference/run.py", "--config", m.infer_config, "--split", "eval", *m.infer_overrides,
                    "audio=silence", f"output_dir={m.run_dir}/infer_silence", f"model_name={m.name}_silence"])
            upsert_member(report, member_entry(m))
            save_report(report, out)
        # -- the learnable ensemble over every member's dev predictions, applied to eval: the members of
        #    configs/ensemble.yaml (what `make ensemble` fuses), named here so --only fuses its subset
        if len(members) >= 2:
            names = [m.name for m in members]
            dev = [str(Path(m.run_dir) / "infer/dev/predictions.jsonl") for m in members]
            ev = [str(Path(m.run_dir) / "infer/eval/predictions.jsonl") for m in members]
            stage("ensemble", [py, "ensemble/fit.py", "--config", "configs/ensemble.yaml", "--dev", *dev,
                               "--eval", *ev, "--names", *names, "--out", str(out / "ensemble")])
            from aqa.ensemble.run import report_entry

            report["ensemble"] = report_entry(out / "ensemble", relative_to=out)
        report["grpo_vs_sft"] = grpo_against_sft(members)
        report["option_reading"] = reading_entries(members)
        section = next((m.report_section(py, stage) for m in members if m.report_section), None)
        report["sections"] = [section] if section else []
        if section:
            report["cascade"] = {"cllr": section["cllr"], "dev_accuracy": section["dev_accuracy"]}
            if section.get("text_only_floor"):
                report["text_only_floor"] = {"eval": section["text_only_floor"]}
                if section.get("text_only_floor_orders"):
                    report["text_only_floor"]["eval_orders"] = section["text_only_floor_orders"]
    except StageFailed as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    finally:
        report["timings_s"] = timings
        report["wall_s"] = time.time() - t0
        save_report(report, out)

    print("\n" + (out / "report.md").read_text(encoding="utf-8"))
    print(f"report: {out / 'report.md'} and {out / 'report.json'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
