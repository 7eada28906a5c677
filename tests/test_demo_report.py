"""The demo report's option-order table, from a predictions file scored in K orders (no launch)."""

from __future__ import annotations

import json

import pytest

from demo.report import orders_table, render_markdown
from demo.run import order_scores


def _row(i: int, part: str, order_preds: list[int], answer: int = 0, n: int = 3) -> dict:
    choices = [f"opt{j}" for j in range(n)]
    return {"id": f"q{i}", "part": part, "choices": choices, "option_logits": [0.0] * n, "pred": choices[order_preds[0]],
            "answer": choices[answer], "model": "m", "order_preds": order_preds}


def test_order_scores_weigh_each_question_by_the_orders_it_got_right(tmp_path):
    rows = [_row(0, "a", [0, 0, 0, 0]),  # right in every order: mean 1, strict 1
            _row(1, "a", [0, 1, 2, 0]),  # right in 2 of 4: mean 0.5, strict 0
            _row(2, "b", [1, 1, 1, 1]),  # never right
            _row(3, "b", [2, 0]), ]      # 1 of 2 (a question with fewer distinct orders)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = order_scores(path)
    assert out["orders"] == 4
    assert out["mean_over_orders"]["weighted_mean"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert out["mean_over_orders"]["per_part"] == pytest.approx({"a": 0.75, "b": 0.25})
    assert out["strict"]["weighted_mean"] == pytest.approx(1 / 4)
    assert out["canonical_aggregate"] == pytest.approx(2 / 4)  # pred == answer for q0 and q1
    lo, hi = out["mean_over_orders"]["interval"]
    assert lo < out["mean_over_orders"]["weighted_mean"] < hi


def test_order_scores_is_none_for_a_one_order_file_or_no_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    assert order_scores(path) is None
    path.write_text(json.dumps({**_row(0, "a", [0]), "order_preds": [0]}) + "\n")
    assert order_scores(path) is None


def test_the_report_shows_each_member_and_the_floor_in_shuffled_orders(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(_row(0, "a", [0, 1, 0, 0])) + "\n")
    orders = order_scores(path)
    canonical = {"weighted_mean": 1.0, "n": 1, "interval": [0.2, 1.0]}
    report = {"members": [{"name": "m1", "backbone": "b", "stage": "sft", "metrics": {"eval": canonical},
                           "orders": {"eval": orders}},
                          {"name": "m2", "backbone": "b", "stage": "sft", "metrics": {"eval": canonical}}],
              "text_only_floor": {"eval": canonical, "eval_orders": orders}}
    table = orders_table(report)
    assert "| m1 (b, sft) | 100.0 [20.0, 100.0] | 75.0 [" in table
    assert "m2" not in table  # scored in one order only: no row
    assert "| text-only floor |" in table
    assert "## Eval accuracy (%) in shuffled option orders" in render_markdown(report)
    assert orders_table({"members": []}) == ""
