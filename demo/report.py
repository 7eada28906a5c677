"""The demo report: ``report.json`` (machine-readable) and ``report.md`` (a person's table).

``report.json`` holds a top-level ``members`` list; each member is
``{"name", "backbone", "stage", "weights", "predictions": {"dev", "eval"}, "metrics": {"dev", "eval"},
"chance": {"dev", "eval"}, "silent_audio": {"eval"}, "orders": {"eval"}, "note"}`` (accuracies with a 95 %
``interval``; ``orders``: mean and strict accuracy over K option orders; ``silent_audio`` likewise; ``note``, where
present, why the demo's recipe leaves the member where it is), plus ``"ensemble"``,
``"text_only_floor"`` (``eval``, ``eval_orders``), ``"option_reading"`` (per backbone, the dev accuracy of its
option-reading stage by step), ``"grpo_vs_sft"`` (each GRPO member beside its SFT start: both
means over orders and the paired difference with its interval) and ``"wall_s"`` once those stages have run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aqa.eval.metrics import wilson_interval, write_json


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"members": []}


def upsert_member(report: dict[str, Any], member: dict[str, Any]) -> None:
    """Add a member, replacing one of the same name (a rerun of a stage)."""
    report["members"] = [m for m in report.get("members", []) if m["name"] != member["name"]] + [member]


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def accuracy_table(rows: list[tuple[str, dict[str, Any], float | None]]) -> str:
    """Markdown table: one row per (name, metrics, chance) with per-part accuracy and the two means."""
    parts = sorted({p for _, m, _ in rows for p in (m.get("per_part") or {})})
    head = ["system", *parts, "arith. mean", "weighted mean", "chance", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m, chance in rows:
        per = m.get("per_part") or {}
        cells = [name, *[_fmt(per.get(p)) for p in parts], _fmt(m.get("arithmetic_mean")),
                 _fmt(m.get("weighted_mean")), _fmt(chance), str(m.get("n", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(m: dict[str, Any] | None) -> str:
    if not m or m.get("weighted_mean") is None:
        return "–"
    lo, hi = m.get("interval") or wilson_interval(m["weighted_mean"], m["n"])
    return f"{_fmt(m['weighted_mean'])} [{_fmt(lo)}, {_fmt(hi)}]"


def _mean(m: dict[str, Any] | None) -> float | None:
    return None if not m else m.get("weighted_mean")


def floors_table(report: dict[str, Any]) -> str:
    """Markdown: per system, eval accuracy over the K option orders each question was scored in (mean and strict)
    and of the order-averaged prediction, beside the member's own silent-audio accuracy and the text-only floor:
    how far above the floor the member's mean lies and whether its 95 % interval clears it. Dev for reference."""
    floor = report.get("text_only_floor") or {}
    floor_acc = (floor.get("eval_orders") or {}).get("mean_over_orders") or floor.get("eval")
    floor_mean = _mean(floor_acc)
    head = ["system", "mean over orders [95 %]", "strict", "order-averaged [95 %]", "silent audio (mean)",
            "above the text-only floor", "interval clears it", "dev (order-averaged)", "chance", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in report.get("members", []):
        orders = (m.get("orders") or {}).get("eval")
        ev, dev = m.get("metrics", {}).get("eval"), m.get("metrics", {}).get("dev")
        silent, chance = m.get("silent_audio") or {}, (m.get("chance") or {}).get("eval")
        name = f"{m['name']} ({m['backbone']}, {m['stage']})"
        mean = (orders or {}).get("mean_over_orders") or ev
        silent_m = (silent.get("eval_orders") or {}).get("mean_over_orders") or silent.get("eval")
        above = clears = "–"
        if floor_mean is not None and _mean(mean) is not None:
            above = f"{100 * (_mean(mean) - floor_mean):+.1f}"
            clears = "yes" if mean["interval"][0] > floor_mean else "no"
        lines.append("| " + " | ".join([
            name, _interval(mean), _fmt(_mean((orders or {}).get("strict"))), _interval(ev), _fmt(_mean(silent_m)),
            above, clears, _fmt(_mean(dev)), _fmt(chance), str(ev["n"]) if ev else "–"]) + " |")
    if floor_acc:
        lines.append("| " + " | ".join([
            "text-only floor", _interval(floor_acc),
            _fmt(_mean((floor.get("eval_orders") or {}).get("strict"))), _interval(floor.get("eval")),
            "–", "–", "–",
            "–", "–", str((floor.get("eval") or {}).get("n", "–"))]) + " |")
    ens = (report.get("ensemble") or {}).get("metrics") or {}
    if ens.get("eval"):
        lines.append("| " + " | ".join([
            "**ensemble** (fitted on dev)", "–", "–", _interval(ens["eval"]), "–", "–", "–",
            _fmt(_mean(ens.get("dev"))) + " in-sample", _fmt(ens["eval"].get("chance")),
            str(ens["eval"].get("n", ""))]) + " |")
    notes = [f"- *{m['name']}*: {m['note']}" for m in report.get("members", []) if m.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def grpo_table(report: dict[str, Any]) -> str:
    """Markdown: each GRPO member beside its SFT start on eval (mean over orders) and the paired difference."""
    rows = report.get("grpo_vs_sft") or []
    if not rows:
        return ""
    lines = ["| GRPO member | its SFT start | SFT [95 %] | GRPO [95 %] | GRPO - SFT, paired [95 %] | n |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["interval"]
        lines.append(f"| {r['grpo']} | {r['sft']} | {_interval(r['sft_mean_over_orders'])} | "
                     f"{_interval(r['grpo_mean_over_orders'])} | {100 * r['difference']:+.1f} "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {r['n']} |")
    return "\n".join(lines)


def grpo_verdict(row: dict[str, Any]) -> str:
    """One sentence: did GRPO help its SFT start, by how much, or can the eval split not tell."""
    lo, hi = row["interval"]
    d, grpo, sft = 100 * row["difference"], row["grpo"], row["sft"]
    span = f"95 % interval {100 * lo:+.1f} to {100 * hi:+.1f}"
    if lo > 0:
        return f"{grpo}: GRPO helped, {d:+.1f} points over {sft} ({span})."
    if hi < 0:
        return f"{grpo}: GRPO hurt, {d:+.1f} points against {sft} ({span})."
    return f"{grpo}: no difference the eval split can show ({d:+.1f} points against {sft}, {span})."


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown: data summary, the dev table, ensemble weights, extra sections."""
    out = ["# Demo report", ""]
    if report.get("wall_s") is not None:
        out += [f"Whole demo: {report['wall_s']:.0f} s wall-clock.", ""]
    if report.get("data_summary"):
        out += ["## Data", "", "```", report["data_summary"].rstrip(), "```", ""]
    rows = [(f"{m['name']} ({m['backbone']}, {m['stage']})", m["metrics"]["dev"], m.get("chance", {}).get("dev"))
            for m in report.get("members", []) if m.get("metrics", {}).get("dev")]
    ens = report.get("ensemble")
    if ens and ens.get("metrics", {}).get("dev"):
        chance = rows[0][2] if rows else None
        rows.append(("**ensemble**", ens["metrics"]["dev"], chance))
    if any(m.get("metrics", {}).get("eval") for m in report.get("members", [])):
        out += ["## Eval accuracy (%) in shuffled option orders, against the floors", "",
                "Held-out eval questions, each scored in K option orders (the inference config's `permutations`; "
                "fewer for a question with fewer distinct orders). *Mean*: the fraction of its orders a question is "
                "right in, averaged; *strict*: right in every order; *order-averaged*: the prediction from the "
                "log-probabilities averaged over the orders (what the submission holds). *Silent audio*: the same "
                "model with every clip silenced; *text-only floor*: the cascade's text LLM reading the question and "
                "options alone, in the same orders. 95 % Wilson intervals over the questions (approximate for the "
                "mean).", "", floors_table(report), ""]
    grpo = grpo_table(report)
    if grpo:
        out += ["## GRPO against its SFT start", "", grpo, "",
                *[grpo_verdict(r) for r in report.get("grpo_vs_sft", [])], ""]
    reading = report.get("option_reading") or []
    if reading:
        out += ["## Option-reading stage", "",
                "Each tiny backbone's first stage: questions that name their answer (\"Which option says ...?\"), "
                "options in random order. Dev accuracy over the run (one order per question) beside chance.", "",
                "| backbone | stage | dev accuracy by step | last [95 %] | chance |", "|---|---|---|---|---|"]
        for r in reading:
            curve = ", ".join(f"{step}: {_fmt(acc)}" for step, acc in r["curve"])
            last = {"weighted_mean": r["dev_accuracy"], "n": r["n"]}
            stage = "text only" if r["backbone"] == "text_llm" else "beside a 0.1 s clip"
            out.append(f"| {r['backbone']} | {stage} | {curve} | "
                       f"{_interval(last)} | {_fmt(r['chance'])} |")
        out.append("")
    if rows:
        out += ["## Dev accuracy (%)", "", accuracy_table(rows), ""]
    else:
        out += ["No trained members yet.", ""]
    if ens:
        out += ["## Ensemble", "", "| member | weight | temperature |", "|---|---|---|"]
        for name, w, t in zip(ens.get("members", []), ens.get("weights", []), ens.get("temperatures", [])):
            out.append(f"| {name} | {w:.3f} | {t:.3f} |")
        out.append("")
        for plot in ens.get("plots", []):
            out.append(f"![{Path(plot).stem}]({plot})")
        out.append("")
    for section in report.get("sections", []):
        out += [f"## {section['title']}", "", section["body"].rstrip(), ""]
    return "\n".join(out)


def save_report(report: dict[str, Any], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_json(report, out_dir / "report.json")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
