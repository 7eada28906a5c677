"""The demo report: ``report.json`` (machine-readable) and ``report.md`` (a person's table).

``report.json`` holds a top-level ``members`` list; each member is
``{"name", "backbone", "stage", "adapter", "predictions": {"dev", "eval"}, "metrics": {"dev", "eval"},
"chance": {"dev", "eval"}, "silent_audio": {"eval"}, "orders": {"eval"}}`` (accuracies with a 95 % ``interval``;
``orders``: mean and strict accuracy over K option orders), plus
``"ensemble"``, ``"text_only_floor"`` and ``"wall_s"`` once those stages have run.
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


def floors_table(report: dict[str, Any]) -> str:
    """Markdown: per system, eval accuracy with its 95 % interval beside the chance level, the text-only floor
    and the member's own silent-audio accuracy; dev for reference (the split the configs were tuned on, and
    the one the ensemble is fitted on)."""
    floor = (report.get("text_only_floor") or {}).get("eval")
    head = ["system", "eval [95 % interval]", "silent audio (eval)", "text-only floor (eval)", "chance (eval)",
            "dev [95 % interval]", "n eval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in report.get("members", []):
        ev = m.get("metrics", {}).get("eval")
        silent = (m.get("silent_audio") or {}).get("eval")
        lines.append("| " + " | ".join([
            f"{m['name']} ({m['backbone']}, {m['stage']})", _interval(ev), _interval(silent), _interval(floor),
            _fmt((m.get("chance") or {}).get("eval")), _interval(m.get("metrics", {}).get("dev")),
            str(ev["n"]) if ev else "–"]) + " |")
    ens = (report.get("ensemble") or {}).get("metrics") or {}
    if ens.get("eval"):
        lines.append("| " + " | ".join([
            "**ensemble** (fitted on dev)", _interval(ens["eval"]), "–", _interval(floor),
            _fmt(ens["eval"].get("chance")), _interval(ens.get("dev")) + " in-sample", str(ens["eval"].get("n", ""))])
            + " |")
    return "\n".join(lines)


def orders_table(report: dict[str, Any]) -> str:
    """Markdown: per system, eval accuracy in the manifest's option order beside the same questions scored in
    K shuffled orders: the mean over orders, strict (right in every order) and the order-averaged prediction's
    accuracy. A model that reads the options scores alike in every order; one that learned answer positions
    falls to chance."""
    head = ["system", "manifest order", "mean over orders", "strict", "order-averaged prediction", "orders (at most)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floor = report.get("text_only_floor") or {}
    rows = [(f"{m['name']} ({m['backbone']}, {m['stage']})", m.get("metrics", {}).get("eval"),
             (m.get("orders") or {}).get("eval")) for m in report.get("members", [])]
    rows.append(("text-only floor", floor.get("eval"), floor.get("eval_orders")))
    for name, canonical, orders in rows:
        if not orders:
            continue
        lines.append("| " + " | ".join([
            name, _interval(canonical), _interval(orders["mean_over_orders"]), _interval(orders["strict"]),
            _fmt(orders["canonical_aggregate"]), str(orders["orders"])]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


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
        out += ["## Eval accuracy (%), with how much the audio matters", "",
                "Held-out eval questions, 95 % Wilson intervals. *Silent audio*: the same model with every clip "
                "silenced; *text-only floor*: the cascade's text LLM reading the question and options alone.", "",
                floors_table(report), ""]
    orders = orders_table(report)
    if orders:
        out += ["## Eval accuracy (%) in shuffled option orders", "",
                "The same eval questions with their options shuffled (the first order is the manifest's). Mean and "
                "strict with approximate 95 % Wilson intervals over the questions.", "", orders, ""]
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
