"""inference: outputs on a tiny split with known answers, resume without duplicates, eval-split behaviour."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aqa.config import ConfigError, load_config
from aqa.data.manifest import Record
from aqa.eval.predict import InferConfig
from aqa.eval.runner import compute_metrics, run_inference
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


def test_several_splits_in_one_process_load_the_model_once_and_write_what_separate_runs_write(
        flat_model, data_dir, tmp_path, monkeypatch, capsys):
    import importlib.util

    from aqa.errors import UserError
    from aqa.eval import runner

    spec = importlib.util.spec_from_file_location("infer_run", ROOT / "inference" / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    loads = []
    real_load = runner.load_scoring_backbone
    monkeypatch.setattr(runner, "load_scoring_backbone", lambda *a: loads.append(a) or real_load(*a))
    args = ["--config", str(ROOT / "configs" / "demo" / "qwen2_audio_infer.yaml"), f"model_path={flat_model}",
            "adapter=null", f"data_dir={data_dir}", "cache_dir=null", "progress=false", "permutations=2"]
    both = script.main(["--split", "dev,eval", *args, f"output_dir={tmp_path / 'both'}"])
    assert len(loads) == 1 and [s["split"] for s in both["splits"]] == ["dev", "eval"]
    printed = capsys.readouterr().out
    assert "dev: scored 5," in printed and "eval: scored 5," in printed
    for split in ("dev", "eval"):
        script.main(["--split", split, *args, f"output_dir={tmp_path / split}"])
        for name in ("predictions.jsonl", "submission.csv"):
            assert (tmp_path / "both" / split / name).read_bytes() == (tmp_path / split / split / name).read_bytes()
    assert len(loads) == 3  # one per process-like call: the two single-split calls loaded their own
    for bad in ("dev,dev", "dev,", ","):
        with pytest.raises(UserError, match="name each split once"):
            script.main(["--split", bad, *args, f"output_dir={tmp_path / 'bad'}"])


def test_unparsed_generated_answers_are_wrong_and_counted(monkeypatch, flat_model, data_dir, tmp_path):
    from aqa.backbones.qwen2_audio import Qwen2AudioBackbone
    from aqa.eval.runner import format_metrics

    # every generated answer names no option (as MMAU's scorer would see "I cannot tell")
    monkeypatch.setattr(Qwen2AudioBackbone, "generate_answers", lambda self, model, exs, n: ["I cannot tell"] * len(exs))
    out = run_inference(_cfg(flat_model, data_dir, tmp_path / "g", mode="generate"), "dev")
    rows = _rows(out["predictions"])
    assert all(r["pred"] is None and not r["parsed"] for r in rows)
    assert all(set(r["option_logits"]) == {0.0} for r in rows)  # flat: no preference for any option
    assert out["metrics"]["weighted_mean"] == 0.0 and out["metrics"]["unparsed"] == 5  # never option A's luck
    assert "unparsed (wrong)          5 of 5" in format_metrics(out["metrics"])
    sub = list(csv.reader((tmp_path / "g" / "dev" / "submission.csv").open()))
    assert sub[0] == ["question", "answer"] and len(sub) == 6 and all(r[1] == "" for r in sub[1:])


def test_metrics_break_accuracy_down_by_meta_keys():
    rows = [{"id": str(i), "part": "mmau", "choices": ["a", "b"], "option_logits": [0.0, 0.0], "pred": pred,
             "answer": "a", "model": "m", "meta": {"task": task, "difficulty": diff}}
            for i, (pred, task, diff) in enumerate([("a", "sound", "easy"), ("b", "sound", "hard"),
                                                    ("a", "music", "hard"), ("a", "speech", "easy")])]
    metrics = compute_metrics(rows, InferConfig(model_path="m", data_dir="d", output_dir="o",
                                                breakdown=["task", "difficulty", "sub_category"]), "dev")
    assert metrics["breakdown"]["task"] == {"music": {"accuracy": 1.0, "n": 1}, "sound": {"accuracy": 0.5, "n": 2},
                                            "speech": {"accuracy": 1.0, "n": 1}}
    assert metrics["breakdown"]["difficulty"] == {"easy": {"accuracy": 1.0, "n": 2}, "hard": {"accuracy": 0.5, "n": 2}}
    assert "sub_category" not in metrics["breakdown"]  # no row has it


def test_repeated_options_are_scored_by_text_in_every_order():
    row = {"id": "q", "part": "mmau", "choices": ["three", "one", "three", "zero"], "option_logits": [0.0, 0.0, 1.0, 0.0],
           "pred": "three", "answer": "three", "model": "m", "order_preds": [2, 0]}  # either "three" is right
    metrics = compute_metrics([row], InferConfig(model_path="m", data_dir="d", output_dir="o", permutations=2), "dev")
    assert metrics["weighted_mean"] == 1.0
    assert metrics["mean_over_orders"]["weighted_mean"] == 1.0 and metrics["strict"]["weighted_mean"] == 1.0


def test_submission_writes_the_official_option_strings_verbatim(tmp_path, tiny):
    """The synthetic DCASE raw layout letters its BQA/TSQA options ("A. engine hum"): the manifest keeps those
    strings beside the cleaned ones, prompts use the cleaned text, and submission.csv writes the raw one."""
    from data_prep.synth import main as synth

    assert synth(["--out", str(tmp_path / "d"), "--train", "3", "--dev", "9", "--eval", "3", "--no-progress"]) == 0
    official = {}
    for path in (tmp_path / "d" / "raw").glob("Part*/dev/*.json"):
        official[path.stem] = json.loads(path.read_text())["choice"]
    out = run_inference(_cfg(tiny.shared("qwen2_audio", seed=4), tmp_path / "d", tmp_path / "o"), "dev")
    rows = {r["id"]: r for r in _rows(out["predictions"])}
    submitted = dict(list(csv.reader((tmp_path / "o" / "dev" / "submission.csv").open()))[1:])
    assert set(submitted) == set(official) == set(rows)
    lettered = [qid for qid, raw in official.items() if raw[0].startswith("A. ")]
    assert lettered and any(not raw[0].startswith("A. ") for raw in official.values())  # both kinds present
    for qid, answer in submitted.items():
        assert answer in official[qid], (qid, answer, official[qid])  # verbatim, "B. rattle" and not "rattle"
        assert answer.endswith(rows[qid]["pred"])
    assert all(not c.startswith(("A. ", "B. ")) for r in rows.values() for c in r["choices"])  # cleaned for prompts


@pytest.mark.parametrize("audio", ["silence", "noise"])
def test_audio_floor_scores_the_same_questions_without_their_audio(data_dir, tmp_path, audio, tiny):
    from aqa.eval.predict import replace_audio

    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    other = replace_audio(wave, audio)
    assert other.shape == wave.shape and not np.allclose(other, wave)
    assert (other == 0).all() if audio == "silence" else np.array_equal(other, replace_audio(wave, audio))
    model = tiny.shared("qwen2_audio", seed=4)
    real = run_inference(_cfg(model, data_dir, tmp_path / "real", cache_dir=str(tmp_path / "c")), "dev")
    floor = run_inference(_cfg(model, data_dir, tmp_path / audio, cache_dir=str(tmp_path / "c"), audio=audio), "dev")
    rows, real_rows = _rows(floor["predictions"]), _rows(real["predictions"])
    assert [r["id"] for r in rows] == [r["id"] for r in real_rows]  # the same questions
    assert all(r["audio"] == audio for r in rows) and floor["metrics"]["audio"] == audio
    assert any(not np.allclose(a["option_logits"], b["option_logits"]) for a, b in zip(rows, real_rows))
    assert len(list((tmp_path / "c").iterdir())) == 2  # its own cache folder: real features are never reused


def test_audio_contribution_splits_training_questions_by_the_silent_pass(data_dir, tmp_path, tiny):
    from aqa.data.audio_contribution import split_by_audio_contribution
    from aqa.data.manifest import load_manifest
    from aqa.errors import UserError
    from data_prep.audio_contribution import main as contribution_main

    model = tiny.shared("qwen2_audio", seed=4)
    silent = run_inference(_cfg(model, data_dir, tmp_path / "silent", audio="silence"), "dev")
    rows = {r["id"]: r for r in _rows(silent["predictions"])}
    out = tmp_path / "labels"
    contribution_main(["--manifest", str(data_dir / "dev.jsonl"), "--predictions", silent["predictions"],
                       "--out", str(out)])
    weak, strong = load_manifest(out / "dev_weak.jsonl"), load_manifest(out / "dev_strong.jsonl")
    assert {r.id for r in weak.records} == {i for i, r in rows.items() if r["pred"] == r["answer"]}
    assert {r.id for r in strong.records} == {i for i, r in rows.items() if r["pred"] != r["answer"]}
    assert len(weak.records) + len(strong.records) == 5
    summary = json.loads((out / "dev_audio_contribution.json").read_text())
    assert summary["weak"] == len(weak.records) and summary["audio"] == ["silence"]
    heard = run_inference(_cfg(model, data_dir, tmp_path / "heard"), "dev")
    with pytest.raises(UserError, match="audio=silence"):  # predictions that heard the audio are refused
        split_by_audio_contribution(data_dir / "dev.jsonl", heard["predictions"], tmp_path / "x")
