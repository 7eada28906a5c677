"""Run-directory and data checks every recipe makes before it trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aqa.config import ConfigError


def check_run_dir(run_dir: str | Path, resume_dir: Path | None, resume: str) -> None:
    """Refuse a fresh start (``resume=none``) in a run dir that holds checkpoints of an earlier run: a later
    ``resume=auto`` would mix the two runs."""
    from aqa.runtime.checkpoint import CHECKPOINTS, list_checkpoints

    existing = list_checkpoints(Path(run_dir) / CHECKPOINTS)
    if resume_dir is None and existing and resume != "auto":
        raise ConfigError(f"{run_dir} holds checkpoints of an earlier run ({existing[-1].name}); resume it with "
                          "checkpoint.resume=auto, or pick another output_dir.")


def require_answers(manifest: Any) -> None:
    """SFT trains on answers: a split without them (eval) cannot be the train split."""
    missing = [r.id for r in manifest.records if r.answer is None]
    if missing:
        raise ConfigError(f"{manifest.path} has {len(missing)} questions without an answer (e.g. {missing[0]}); "
                          "train_split must name an answered split such as train.")
