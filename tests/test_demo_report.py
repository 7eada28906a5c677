"""The demo report's tables, from predictions files scored in K option orders (no launch)."""

from __future__ import annotations

import json

import pytest

from aqa.eval.metrics import paired_difference
from demo.report import floors_table, grpo_verdict, render_markdown
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


def test_the_report_shows_each_member_against_the_floor_in_shuffled_orders(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(_row(i, "a", [0, 0, 0, 0] if i < 18 else [1, 1, 1, 1])) + "\n"
                            for i in range(20)))
    orders = order_scores(path)  # mean 0.9 over 20 questions
    floor_path = tmp_path / "floor.jsonl"
    floor_path.write_text("".join(json.dumps(_row(i, "a", [0, 1, 1, 1])) + "\n" for i in range(20)))
    floor = order_scores(floor_path)  # mean 0.25
    canonical = {"weighted_mean": 0.9, "n": 20, "interval": [0.7, 0.97]}
    report = {"members": [{"name": "m1", "backbone": "b", "stage": "sft", "metrics": {"eval": canonical},
                           "orders": {"eval": orders}},
                          {"name": "m2", "backbone": "b", "stage": "sft", "metrics": {"eval": canonical}}],
              "text_only_floor": {"eval": canonical, "eval_orders": floor}}
    table = floors_table(report)
    assert "| m1 (b, sft) | 90.0 [" in table and "| +65.0 | yes |" in table
    assert "| m2 (b, sft) | 90.0 [70.0, 97.0] |" in table  # one order only: its single-order accuracy
    assert "| text-only floor | 25.0 [" in table
    text = render_markdown(report)
    assert "## Eval accuracy (%) in shuffled option orders, against the floors" in text
    assert "## GRPO against its SFT start" not in text  # no GRPO member
    assert "- *" not in table  # no member says its recipe is short
    report["members"][1]["note"] = "50 LoRA steps; run --long"
    assert floors_table(report).endswith("\n\n- *m2*: 50 LoRA steps; run --long")


def test_grpo_is_reported_beside_its_sft_start_with_a_paired_interval():
    mean = {"weighted_mean": 0.5, "n": 40, "interval": [0.35, 0.65]}
    row = {"grpo": "g", "sft": "s", "sft_mean_over_orders": mean, "grpo_mean_over_orders": mean, "n": 40,
           **paired_difference([0.5] * 20 + [0.4] * 20, [0.5] * 20 + [0.6] * 20)}
    assert row["difference"] == pytest.approx(0.1) and 0 < row["interval"][0] < 0.1 < row["interval"][1]
    text = render_markdown({"members": [], "grpo_vs_sft": [row]})
    assert "| g | s | 50.0 [35.0, 65.0] | 50.0 [35.0, 65.0] | +10.0 [" in text
    assert "g: GRPO helped, +10.0 points over s" in text
    same = {**row, **paired_difference([0.5, 0.0, 1.0], [0.5, 1.0, 0.0])}
    assert "no difference the eval split can show" in grpo_verdict(same)
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1.0], [1.0, 0.0])


def test_long_demo_trains_kimi_audio_through_its_reading_stage_and_full_sft(monkeypatch):
    """``--long`` swaps Kimi-Audio's chain for configs/demo/long/ (reading, then SFT in full from its model, in a
    run dir of its own) and leaves every other member as the default demo has it."""
    from aqa.sft.config import load_sft_config
    from demo.run import LONG_CONFIGS, build_members, reading_configs
    from tests.helpers import ROOT

    monkeypatch.chdir(ROOT)
    default = {m.name: m for m in build_members("python", ["deepspeed"])}
    long = {m.name: m for m in build_members("python", ["deepspeed"], long=True)}
    assert set(default) == set(long) and "kimi_audio_sft" in long
    kimi = long["kimi_audio_sft"]
    configs = [cmd[cmd.index("--config") + 1] for _, cmd in kimi.train]
    assert configs == [str(LONG_CONFIGS / "kimi_audio_reading.yaml"), str(LONG_CONFIGS / "kimi_audio_sft.yaml")]
    reading, sft = (load_sft_config(LONG_CONFIGS / f"kimi_audio_{s}.yaml") for s in ("reading", "sft"))
    assert sft.model_path == f"{reading.output_dir}/model" and sft.finetune == reading.finetune == "full"
    assert sft.batch.global_size == reading.batch.global_size == 64
    assert kimi.run_dir == sft.output_dir != default["kimi_audio_sft"].run_dir
    assert {f"model_path={sft.output_dir}/model", "adapter=null", f"output_dir={sft.output_dir}/infer"} <= set(
        kimi.infer_overrides)
    assert all(default[n].train == long[n].train for n in default if n != "kimi_audio_sft")
    # the default demo's report says where Kimi-Audio's longer recipe is; the long demo's has nothing to add
    assert "DEMO_ARGS=--long" in default["kimi_audio_sft"].note and kimi.note is None
    # the report's reading table: the stages this run trained, Kimi-Audio's only in the long demo
    assert LONG_CONFIGS / "kimi_audio_reading.yaml" in reading_configs(list(long.values()))
    assert not any(p.name.startswith("kimi") for p in reading_configs(list(default.values())))
