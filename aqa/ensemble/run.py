"""``ensemble/fit.py``'s work: load members, fit on dev, apply to eval, write the files and print a table.

Outputs in ``out`` (see DESIGN.md's contracts):
- ``ensemble.json``: members, ``weights``, ``temperatures``, sources, fit settings, and on dev per member
  and fused the accuracy, NLL and ECE ``before`` and ``after`` calibration, plus the baselines and the plot
  file names. A member before = T 1; after = its own calibration temperature (fitted alone, the same Adam
  fit with one member); ``in_ensemble`` = at the ensemble's temperature for it, which is usually sharper
  than its own because averaging probabilities of independent members flattens them. The fused model
  before = the uniform average of uncalibrated members (the baseline); after = the fit.
- ``dev.jsonl`` / ``eval.jsonl``: fused predictions (``option_logits`` = log fused probabilities, ``model:
  "ensemble"``); ``metrics.json``: ``{"dev": metrics, "eval": metrics (when eval has answers)}`` in
  inference's metrics shape plus ``nll`` and ``ece``; ``submission.csv`` from eval when eval is given.
- PNGs: ``reliability_<member>.png``, ``reliability_ensemble.png``, ``accuracy_by_part.png``, ``fit_curve.png``.

Dev metrics are in-sample (the 2 parameters per member are fitted on dev); eval is the honest number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aqa.config import ConfigError
from aqa.ensemble.fusion import (
    Aligned,
    align,
    fit,
    fused_log_probs,
    load_member,
    member_log_probs,
    prediction_rows,
    system_metrics,
)
from aqa.ensemble.plots import accuracy_bars, fit_curve, reliability_diagram
from aqa.eval.metrics import accuracy_by_part, chance_level, write_json, write_submission

FUSED = "ensemble"  # the fused predictions' "model" field and plot name


@dataclass
class MemberSpec:
    """One member: its dev predictions (to fit) and, optionally, its eval predictions (to apply)."""

    dev: str
    name: str | None = None  # None: the predictions' "model" field
    eval: str | None = None


@dataclass
class FitConfig:
    steps: int  # full-batch Adam steps
    lr: float
    init_temperature: float = 1.0


@dataclass
class EnsembleConfig:
    """What ``ensemble/fit.py`` fuses and how (``configs/ensemble.yaml``)."""

    out: str
    fit: FitConfig
    members: list[MemberSpec] = field(default_factory=list)
    ece_bins: int = 10
    plots: bool = True


def members_from_paths(dev: list[str], eval_paths: list[str] | None = None,
                       names: list[str] | None = None) -> list[MemberSpec]:
    """Members from the CLI's ``--dev A B``, ``--eval A_eval B_eval`` and ``--names a b`` (same order)."""
    if eval_paths and len(eval_paths) != len(dev):
        raise ConfigError(f"--eval names {len(eval_paths)} files for {len(dev)} --dev files; give one eval file "
                          "per member, in the same order.")
    if names and len(names) != len(dev):
        raise ConfigError(f"--names gives {len(names)} names for {len(dev)} --dev files; give one per member.")
    return [MemberSpec(dev=d, name=names[i] if names else None, eval=eval_paths[i] if eval_paths else None)
            for i, d in enumerate(dev)]


def _member_names(specs: list[MemberSpec], dev_rows: list[list[dict[str, Any]]]) -> list[str]:
    """Names from the specs, else the predictions' ``model``; repeats get ``_2``, ``_3`` so none collide."""
    names, seen = [], {}
    for spec, rows in zip(specs, dev_rows):
        name = spec.name or str(rows[0]["model"])
        if spec.name and spec.name in seen:
            raise ConfigError(f"member name '{spec.name}' is used twice; give each member its own name.")
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    if FUSED in names:
        raise ConfigError(f"a member may not be named '{FUSED}' (the fused model's name); rename it.")
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _split_metrics(rows: list[dict[str, Any]], data: Aligned, log_probs: np.ndarray, split: str, bins: int
                   ) -> dict[str, Any]:
    """Inference's metrics.json shape for the fused rows, plus NLL and ECE."""
    m = system_metrics(data, log_probs, bins)
    return {"split": split, "model": FUSED, **accuracy_by_part(rows), "chance": chance_level(rows),
            "nll": m["nll"], "ece": m["ece"]}


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _plots(out: Path, dev: Aligned, before: np.ndarray, after: np.ndarray, uniform: np.ndarray, fused: np.ndarray,
           dev_metrics: dict[str, Any], losses: list[float], bins: int) -> list[str]:
    """Reliability diagrams (members and fused), per-part bars and the fit curve; returns file names."""
    files = []
    systems = [(n, before[m], after[m], f"{n} (T={dev_metrics['members'][n]['calibration_temperature']:.2f})")
               for m, n in enumerate(dev.members)]
    systems.append((FUSED, uniform, fused, "ensemble (before: uniform average)"))
    for name, lp_before, lp_after, title in systems:
        pred = np.where(dev.mask, lp_after, -np.inf).argmax(-1)  # [N]; a temperature keeps the argmax
        correct = pred == dev.answers
        conf_b = np.exp(lp_before.max(-1, where=dev.mask, initial=-np.inf))
        conf_a = np.exp(lp_after.max(-1, where=dev.mask, initial=-np.inf))
        file = f"reliability_{_slug(name)}.png"
        reliability_diagram(conf_b, conf_a, correct, f"Reliability on dev: {title}", out / file, bins)
        files.append(file)
    per_part = {n: dev_metrics["members"][n]["after"]["per_part"] for n in dev.members}
    per_part["uniform average"] = dev_metrics["fused"]["before"]["per_part"]
    per_part[FUSED] = dev_metrics["fused"]["after"]["per_part"]
    chance = float(np.mean(1.0 / dev.mask.sum(-1)))
    accuracy_bars(per_part, out / "accuracy_by_part.png", chance=chance, muted=("uniform average",))
    fit_curve(losses, out / "fit_curve.png", baseline=dev_metrics["fused"]["before"]["nll"])
    return [*files, "accuracy_by_part.png", "fit_curve.png"]


def run_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Fit on the members' dev predictions, apply to eval, write every output; returns ``ensemble.json``."""
    if not cfg.members:
        raise ConfigError("no ensemble members: pass --dev A.jsonl B.jsonl ... or list members in the config.")
    has_eval = [m.eval is not None for m in cfg.members]
    if any(has_eval) and not all(has_eval):
        missing = [m.name or m.dev for m, e in zip(cfg.members, has_eval) if not e]
        raise ConfigError(f"eval predictions are given for some members but not for {missing}; give every member "
                          "an eval file, or none.")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- load and align dev, fit
    dev_rows = [load_member(m.dev) for m in cfg.members]
    names = _member_names(cfg.members, dev_rows)
    dev = align(dict(zip(names, dev_rows)), need_answers=True)
    result = fit(dev, cfg.fit.steps, cfg.fit.lr, cfg.fit.init_temperature)

    # -- dev metrics: members before/after their temperature, the uniform average and the fit
    own_t = [fit(dev.member(m), cfg.fit.steps, cfg.fit.lr, cfg.fit.init_temperature).temperatures[0]
             for m in range(len(names))]
    before, after = member_log_probs(dev), member_log_probs(dev, own_t)  # [M, N, K]
    inside = member_log_probs(dev, result.temperatures)  # [M, N, K]
    uniform, fused = fused_log_probs(dev), fused_log_probs(dev, result.fusion)  # [N, K]
    bins = cfg.ece_bins
    members = {n: {"weight": result.weights[m], "temperature": result.temperatures[m],
                   "calibration_temperature": own_t[m], "before": system_metrics(dev, before[m], bins),
                   "after": system_metrics(dev, after[m], bins), "in_ensemble": system_metrics(dev, inside[m], bins)}
               for m, n in enumerate(names)}
    best = max(names, key=lambda n: (members[n]["before"]["accuracy"], -members[n]["before"]["nll"]))
    dev_metrics = {"n": len(dev.ids), "members": members,
                   "fused": {"before": system_metrics(dev, uniform, bins), "after": system_metrics(dev, fused, bins)}}

    # -- fused predictions and metrics; eval aligned the same way and fused with the dev fit
    dev_pred = prediction_rows(dev, fused, FUSED)
    _write_jsonl(dev_pred, out / "dev.jsonl")
    metrics = {"dev": _split_metrics(dev_pred, dev, fused, "dev", bins)}
    if all(has_eval):
        ev = align(dict(zip(names, [load_member(m.eval) for m in cfg.members])))
        ev_fused = fused_log_probs(ev, result.fusion)
        ev_pred = prediction_rows(ev, ev_fused, FUSED)
        _write_jsonl(ev_pred, out / "eval.jsonl")
        write_submission(ev_pred, out / "submission.csv")
        if ev.has_answers:
            metrics["eval"] = _split_metrics(ev_pred, ev, ev_fused, "eval", bins)
    write_json(metrics, out / "metrics.json")

    plots = _plots(out, dev, before, after, uniform, fused, dev_metrics, result.losses, bins) if cfg.plots else []
    summary = {
        "members": names, "weights": result.weights, "temperatures": result.temperatures,
        "sources": {n: {"dev": m.dev, "eval": m.eval} for n, m in zip(names, cfg.members)},
        "fit": {"steps": cfg.fit.steps, "lr": cfg.fit.lr, "init_temperature": cfg.fit.init_temperature,
                "nll_start": result.losses[0], "nll_end": result.losses[-1]},
        "dev": dev_metrics,
        "baselines": {"uniform_average": dev_metrics["fused"]["before"],
                      "best_single": {"name": best, **members[best]["before"]}},
        "eval": {"n": len(ev.ids), "has_answers": ev.has_answers} if all(has_eval) else None,
        "plots": plots,
    }
    write_json(summary, out / "ensemble.json")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Members, the two baselines and the fitted ensemble on dev: accuracy, NLL and ECE before -> after
    calibration (a member's own temperature ``T cal``), and the ensemble's weight and temperature per member."""
    base = summary["baselines"]
    rows = [(n, f"{m['calibration_temperature']:.2f}", f"{m['weight']:.3f}", f"{m['temperature']:.2f}",
             m["before"], m["after"]) for n, m in summary["dev"]["members"].items()]
    rows.append(("baseline: uniform average", "-", "-", "1", base["uniform_average"], None))
    rows.append((f"baseline: best single ({base['best_single']['name']})", "-", "1", "1", base["best_single"], None))
    rows.append(("ensemble (fitted)", "-", "-", "-", summary["dev"]["fused"]["after"], None))
    width = max(len(r[0]) for r in rows) + 2
    head = (f"{'system':<{width}}{'acc %':>7}{'NLL before->after':>20}{'ECE before->after':>20}{'T cal':>7}"
            f"{'weight':>8}{'T ens':>7}")
    lines = [f"dev, {summary['dev']['n']} questions (in-sample: the ensemble is fitted on dev)", head, "-" * len(head)]
    for name, t_cal, w, t, b, a in rows:
        nll = f"{b['nll']:.3f} -> {a['nll']:.3f}" if a else f"{b['nll']:.3f}"
        ece = f"{b['ece']:.3f} -> {a['ece']:.3f}" if a else f"{b['ece']:.3f}"
        lines.append(f"{name:<{width}}{100 * b['accuracy']:>7.1f}{nll:>20}{ece:>20}{t_cal:>7}{w:>8}{t:>7}")
    return "\n".join(lines)


def report_entry(out_dir: str | Path, relative_to: str | Path | None = None) -> dict[str, Any]:
    """The demo report's ``"ensemble"`` entry: members, weights, temperatures, ``metrics`` (metrics.json) and
    plot paths (relative to ``relative_to``, e.g. the report's folder, so Markdown links resolve)."""
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "ensemble.json").read_text(encoding="utf-8"))
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    base = Path(relative_to).resolve() if relative_to is not None else None
    plots = [str((out_dir / p).resolve().relative_to(base)) if base else str(out_dir / p) for p in summary["plots"]]
    return {"members": summary["members"], "weights": summary["weights"], "temperatures": summary["temperatures"],
            "metrics": metrics, "baselines": summary["baselines"], "plots": plots}
