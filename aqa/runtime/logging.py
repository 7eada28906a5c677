"""Run logging: ``metrics.jsonl`` in the run dir, console lines, W&B (offline by default), progress bars.

Only rank 0 logs; on other ranks a :class:`RunLogger` is silent, so recipes call it unconditionally.
``metrics.jsonl`` is the record of truth (one JSON object per line with ``step`` and ``kind``); W&B
mirrors it. A resumed run first drops the lines logged after its checkpoint (a killed run may have
logged steps it then lost), so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
SUPPORTED_REPORTERS = ("wandb",)


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> tqdm:
    """A tqdm bar over optimizer steps; disabled (a no-op) unless ``enabled`` (rank 0)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def format_line(step: int, metrics: dict[str, Any], kind: str = "train") -> str:
    """``"[train] step 12 | loss 1.2345 | lr 5.00e-05"``: compact numbers for a console line."""
    parts = [f"[{kind}] step {step}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            text = f"{value:.2e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact readable
    return value


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Drop the lines of ``path`` whose step is after ``last_step``; returns how many were dropped.

    A torn last line (a run killed mid-write) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return dropped


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (of one ``kind`` if given), in file order."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


class RunLogger:
    """Writes metrics of one run to ``<run_dir>/metrics.jsonl``, the console and W&B.

    ``report_to``: ``[]`` or ``["wandb"]``. W&B runs offline unless ``WANDB_MODE`` says otherwise, and a
    resumed run continues the same W&B run (its id is kept in the run dir). ``resume_step``: the step
    of the checkpoint a resumed run starts from (None: a fresh run, which starts a new file).
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, report_to: list[str] | None = None,
                 config: dict[str, Any] | None = None, project: str = "aqa", run_name: str | None = None,
                 resume_step: int | None = None, console: bool = True):
        self.enabled = enabled
        self.console = console
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._wandb = None
        self._bar: tqdm | None = None
        report_to = list(report_to or [])
        unknown = [r for r in report_to if r not in SUPPORTED_REPORTERS]
        if unknown:
            raise ValueError(f"report_to {unknown} is not supported; use [] or {list(SUPPORTED_REPORTERS)}.")
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            truncate_metrics(self.path, resume_step)
        if "wandb" in report_to:
            self._wandb = self._start_wandb(config or {}, project, run_name, resume_step is not None)

    def _start_wandb(self, config: dict[str, Any], project: str, run_name: str | None, resumed: bool):
        # Offline by default: runs on clusters without network still log, and `wandb sync` uploads later.
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        if resumed and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        return wandb.init(project=project, name=run_name or self.run_dir.name, id=run_id, resume="allow",
                          dir=str(self.run_dir), config=config)

    def attach(self, bar: tqdm | None) -> None:
        """Console lines go through ``bar.write`` so they do not tear the progress bar."""
        self._bar = bar

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """One row: ``{"step", "kind", "time", **metrics}`` to the file, a console line, and W&B as ``kind/key``."""
        if not self.enabled:
            return
        clean = self._write(step, metrics, kind)
        if self._wandb is not None:
            numeric = {f"{kind}/{k}": v for k, v in clean.items() if isinstance(v, (int, float))}
            self._wandb.log(numeric, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Final values: a ``kind: summary`` row in the file and the W&B run summary (not its history)."""
        if not self.enabled:
            return
        clean = self._write(int(values.get("step", 0)), {k: v for k, v in values.items() if k != "step"}, "summary")
        if self._wandb is not None:
            self._wandb.summary.update(clean)

    def _write(self, step: int, metrics: dict[str, Any], kind: str) -> dict[str, Any]:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **clean}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.console:
            line = format_line(step, clean, kind)
            if self._bar is not None and not self._bar.disable:
                self._bar.write(line)
            else:
                print(line, flush=True)
        return clean

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
