"""inference: outputs on a tiny split with known answers, resume without duplicates, eval-split behaviour."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aqa.config import ConfigError, load_config
from aqa.data.manifest import Record
from aqa.eval.predict import InferConfig, compute_metrics, run_inference
from tests.helpers import ROOT, noise, write_manifest, write_wave

PARTS = {"bqa": [0, 0, 1], "cqa": [0, 2]}  # answer index per question: the flat model gets index 0 right


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory, tiny_qwen2_audio):
    """A tiny model whose final norm is zero: every logit is 0, so every question's pick is its first option."""
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio)
    torch.nn.init.zeros_(model.model.language_model.norm.weight)
    out = tmp_path_factory.mktemp("m") / "flat"
    model.save_pretrained(out)
    Qwen2AudioProcessor.from_pretrained(tiny_qwen2_audio).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    choices = ["dog bark", "siren", "rain, heavy"]
    for split in ("dev", "eval"):
        records = []
        for part, answers in PARTS.items():
            for i, a in enumerate(answers):
                name = f"{part}_{split}_{i}.wav"
                write_wave(root / "audio" / name, noise(1 + 0.25 * i, rng))  # 1, 1.25 and 1.5 s
                records.append(Record(id=f"{part}_{split}_{i}", part=part, split=split, audio=name,
                                      question="Which sound comes first?", choices=choices[: 2 + i % 2],
                                      answer=None if split == "eval" else choices[a]))
        write_manifest(root, split, records)
    return root


def _cfg(model, data, out, **kw):
    return InferConfig(model_path=str(model), data_dir=str(data), output_dir=str(out), batch_size=2,
                       progress=False, **kw)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_dev_outputs_with_known_answers(flat_model, data_dir, tmp_path):
    summary = run_inference(_cfg(flat_model, data_dir, tmp_path, permutations=3), "dev")
    rows = _rows(summary["predictions"])
    assert [r["id"] for r in rows] == ["bqa_dev_0", "bqa_dev_1", "bqa_dev_2", "cqa_dev_0", "cqa_dev_1"]
    for r in rows:
        assert set(r) >= {"id", "part", "choices", "option_logits", "pred", "answer", "model"}
        assert r["pred"] == r["choices"][0] and len(r["option_logits"]) == len(r["choices"])
        np.testing.assert_allclose(r["option_logits"], np.log(1 / len(r["choices"])), atol=1e-5)
    m = json.loads((tmp_path / "dev" / "metrics.json").read_text())
    assert m["per_part"] == {"bqa": pytest.approx(2 / 3), "cqa": pytest.approx(1 / 2)}
    assert m["arithmetic_mean"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["weighted_mean"] == pytest.approx(3 / 5)
    assert m["counts"] == {"bqa": 3, "cqa": 2} and m["permutations"] == 3
    assert m["strict"]["weighted_mean"] == pytest.approx(3 / 5)  # canonical option 0 under every order
    assert m["chance"] == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 2, 1 / 2, 1 / 3]))
    with open(tmp_path / "dev" / "submission.csv", newline="") as fh:
        sub = list(csv.reader(fh))
    assert sub[0] == ["question", "answer"]
    assert sub[1:] == [[r["id"], r["choices"][0]] for r in rows]  # verbatim text, comma included


def test_resume_skips_scored_ids_and_never_duplicates(flat_model, data_dir, tmp_path):
    cfg = _cfg(flat_model, data_dir, tmp_path)
    cfg.limit = 2
    first = run_inference(cfg, "dev")
    assert first["scored"] == 2
    before = _rows(first["predictions"])
    with open(first["predictions"], "a") as fh:
        fh.write('{"id": "cqa_dev_0", "part": "c')  # a run killed mid-line
    cfg.limit = None
    again = run_inference(cfg, "dev")
    assert (again["scored"], again["resumed"]) == (3, 2)
    rows = _rows(again["predictions"])
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    assert rows[:2] == before
    third = run_inference(cfg, "dev")
    assert third["scored"] == 0 and len(_rows(third["predictions"])) == 5
    cfg.permutations = 4  # other scoring settings: resuming would mix predictions
    with pytest.raises(ConfigError, match="permutations"):
        run_inference(cfg, "dev")


def test_eval_split_writes_submission_and_no_accuracy(flat_model, data_dir, tmp_path):
    summary = run_inference(_cfg(flat_model, data_dir, tmp_path, permutations=2), "eval")
    assert "metrics" not in summary and not (tmp_path / "eval" / "metrics.json").exists()
    rows = _rows(summary["predictions"])
    assert all(r["answer"] is None for r in rows)
    lines = (tmp_path / "eval" / "submission.csv").read_text().splitlines()
    assert lines[0] == "question,answer" and len(lines) == 6


def test_generate_mode_and_feature_cache(flat_model, data_dir, tmp_path, tiny):
    gen = run_inference(_cfg(flat_model, data_dir, tmp_path / "g", mode="generate", max_new_tokens=3), "dev")
    rows = _rows(gen["predictions"])
    assert all(isinstance(r["generated"], str) and isinstance(r["parsed"], bool) for r in rows)
    assert gen["metrics"]["unparsed"] == sum(not r["parsed"] for r in rows)
    model = tiny.shared("qwen2_audio", seed=4)
    plain = _rows(run_inference(_cfg(model, data_dir, tmp_path / "a"), "dev")["predictions"])
    cached = run_inference(_cfg(model, data_dir, tmp_path / "b", cache_dir=str(tmp_path / "c")), "dev")
    assert list((tmp_path / "c").iterdir())  # the cache was built
    for p, c in zip(plain, _rows(cached["predictions"])):
        np.testing.assert_allclose(p["option_logits"], c["option_logits"], atol=1e-6)


def test_strict_is_below_mean_when_orders_disagree():
    rows = [{"id": "a", "part": "p", "choices": ["x", "y"], "pred": "x", "answer": "x", "model": "m",
             "order_preds": [0, 1]},
            {"id": "b", "part": "p", "choices": ["x", "y"], "pred": "y", "answer": "y", "model": "m",
             "order_preds": [1, 1]}]
    cfg = InferConfig(model_path="m", data_dir="d", output_dir="o", permutations=2)
    m = compute_metrics(rows, cfg, "dev")
    assert m["weighted_mean"] == 1.0
    assert m["mean_over_orders"]["weighted_mean"] == 0.75
    assert m["strict"]["weighted_mean"] == 0.5


def test_run_script_and_config_files(flat_model, data_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_run", ROOT / "inference" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--config", str(ROOT / "configs" / "demo" / "qwen2_audio_infer.yaml"), "--split", "dev",
                 f"model_path={flat_model}", "adapter=null", f"data_dir={data_dir}", f"output_dir={tmp_path}",
                 "cache_dir=null", "progress=false"])
    out = capsys.readouterr().out
    assert "bqa" in out and "weighted" in out and (tmp_path / "dev" / "metrics.json").is_file()
    for path in (ROOT / "configs" / "qwen2_audio" / "infer.yaml", ROOT / "configs" / "demo" / "qwen2_audio_infer.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "inference/run.py" in first
        load_config(InferConfig, path)
    with pytest.raises(ConfigError, match="permutation"):
        load_config(InferConfig, path, ["permutaions=4"])
    with pytest.raises(FileNotFoundError, match="data_prep"):
        run_inference(_cfg(flat_model, tmp_path / "nowhere", tmp_path), "dev")
    with pytest.raises(FileNotFoundError, match="adapter"):
        run_inference(_cfg(flat_model, data_dir, tmp_path / "x", adapter=str(tmp_path / "no_adapter")), "dev")
