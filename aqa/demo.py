"""``make demo``: the whole pipeline on the embedded default, on a CPU, through the users' own commands.

Every stage runs as a subprocess with exactly the command a user would type (``deepspeed train/sft.py
...``), so the demo exercises the real launchers and scripts, not a shortcut through the library.
The report (``report.json`` / ``report.md``) is assembled from the files the stages write.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from aqa.data.summary import summarize
from aqa.report import load_report, save_report


class StageFailed(RuntimeError):
    pass


def run_stage(title: str, cmd: list[str], log_dir: Path) -> float:
    """Run one stage, streaming its output to the console and to ``log_dir/<title>.log``."""
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log_path = log_dir / f"{title.replace(' ', '_')}.log"
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            # tqdm redraws with carriage returns: keep the console readable by showing the last state only.
            sys.stdout.write(line.rsplit("\r", 1)[-1])
        rc = proc.wait()
    dt = time.time() - t0
    if rc != 0:
        raise StageFailed(f"stage '{title}' failed (exit {rc}); its full output is in {log_path}")
    print(f"--- {title}: {dt:.1f} s", flush=True)
    return dt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run directory for models, runs and the report")
    parser.add_argument("--data", default="data/demo", help="where the synthetic data set is written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.time()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    py = sys.executable
    timings: dict[str, float] = {}

    try:
        # -- data: the embedded default, written in the DCASE layout and converted by data_prep.dcase
        timings["data"] = run_stage("synthetic data", [py, "-m", "data_prep.synth", "--out", str(data),
                                                       "--seed", str(args.seed)], logs)
    except StageFailed as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1

    report = load_report(out / "report.json")
    report.setdefault("members", [])
    report["data_summary"] = summarize(data)
    report["timings_s"] = timings
    report["wall_s"] = time.time() - t0
    save_report(report, out)
    print(f"\nreport: {out / 'report.md'} and {out / 'report.json'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
