"""SED training library: head rebuilt by MID, strong labels over manifest audio, crops, masked BCE, configs."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from aqa.config import ConfigError, load_config
from aqa.data.cache import build_feature_cache
from aqa.data.manifest import load_manifest
from aqa.sed.annotate import SedEventsConfig
from aqa.sed.calibrate import CalibrateConfig
from aqa.sed.labels import LabelMap
from aqa.sed.strong import StrongLabelError, load_strong_clips
from aqa.sed.train import (
    SedDataConfig,
    SedModelOverrides,
    StrongSegmentDataset,
    collate_segments,
    fbank_extractor,
    full_state_dict,
    load_sed_train_config,
    prepare_model,
    row_bce,
)
from tests.helpers import ROOT, noise, record, write_manifest, write_wave


def _data(root: Path, n=3):
    rng = np.random.default_rng(0)
    rows, tsv = [], ["segment_id\tstart_time_seconds\tend_time_seconds\tlabel"]
    for i in range(n):
        write_wave(root / "audio" / f"clip{i}.wav", noise(1 + 0.5 * i, rng))  # 1 s, 1.5 s, 2 s
        rows.append(record(i, split="train", audio=f"clip{i}.wav"))
        tsv.append(f"clip{i}\t0.16\t0.48\t/m/dog")
    rows.append(replace(rows[0], id="q0b"))  # a second question about clip 0: the clip is used once
    write_wave(root / "audio" / "extra.wav", np.zeros(16000, dtype=np.float32))
    rows.append(replace(rows[0], id="q_extra", audio="extra.wav"))  # no TSV rows: left out
    tsv += ["clip1\t0.5\t0.9\t/m/cat", "clip2\t0.0\t0.3\t/m/unknown", "notinmanifest\t0\t1\t/m/dog"]
    write_manifest(root, "train", rows)
    (root / "strong.tsv").write_text("\n".join(tsv) + "\n")
    (root / "labels.tsv").write_text("/m/dog\tDog\n/m/bird\tBird\n/m/cat\tCat\n/m/noise\tNoise\n")
    return root


def test_strong_clips_match_audio_names_and_count_what_is_left_out(tmp_path):
    d = _data(tmp_path)
    labels = LabelMap.from_pairs([("/m/dog", "Dog"), ("/m/cat", "Cat")])
    clips, report = load_strong_clips(d / "train.jsonl", d / "strong.tsv", labels)
    assert [c.clip_id for c in clips] == ["clip0", "clip1", "clip2"]
    assert clips[1].events == [(0.16, 0.48, 0), (0.5, 0.9, 1)]
    assert report.unlabelled_clips == 1 and report.tsv_clips_without_audio == 1
    assert report.dropped_mids == {"/m/unknown": 1}
    (d / "other.tsv").write_text("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\nzzz\t0\t1\t/m/dog\n")
    with pytest.raises(StrongLabelError, match="must equal the audio file names"):
        load_strong_clips(d / "train.jsonl", d / "other.tsv", labels)


def test_head_is_rebuilt_for_the_trained_classes_keeping_rows_by_mid(tmp_path, tiny):
    old = LabelMap.from_pairs([("/m/cat", "Cat"), ("/m/dog", "Dog"), ("/m/car", "Car")])
    sed = tiny.beats(old, seed=5)
    d = _data(tmp_path / "data")
    data = SedDataConfig(train_manifest="x", train_tsv="y", labels=str(d / "labels.tsv"), drop_labels=["Noise"])
    model, labels, kept = prepare_model(sed, data, SedModelOverrides(dropout=0.3), seed=0)
    assert labels.mids == ["/m/dog", "/m/bird", "/m/cat"] and kept == 2
    assert model.cfg.predictor_class == 3 and model.cfg.dropout == 0.3
    init = load_file(str(sed / "model.safetensors"))
    w = model.predictor.weight.detach()
    assert torch.equal(w[0], init["predictor.weight"][1]) and torch.equal(w[2], init["predictor.weight"][0])
    assert torch.equal(model.encoder.layer_norm.weight.detach(), init["encoder.layer_norm.weight"])
    # no data.labels: the init model's own classes
    same, labels2, kept2 = prepare_model(sed, SedDataConfig("x", "y"), SedModelOverrides(), 0)
    assert labels2.mids == old.mids and kept2 == 3


def test_dataset_crops_pads_and_the_loss_ignores_padding(tmp_path, tiny):
    d = _data(tmp_path / "data")
    labels = LabelMap.from_pairs([("/m/dog", "Dog"), ("/m/cat", "Cat")])
    model, labels, _ = prepare_model(tiny.beats(labels), SedDataConfig("x", "y"), SedModelOverrides(), 0)
    clips, _ = load_strong_clips(d / "train.jsonl", d / "strong.tsv", labels)
    extract, settings = fbank_extractor(model.cfg)
    cache = build_feature_cache(load_manifest(d / "train.jsonl"), tmp_path / "cache", extract, settings, progress=False)
    ds = StrongSegmentDataset(clips, cache, 2, segment_rows=7, min_overlap=0.5, patch=16, train=True, seed=1)
    item = ds[(0, 0)]  # 1 s clip: 98 frames -> 6 rows, shorter than the crop: whole
    assert item["fbank"].shape == (96, 128) and item["targets"][:, 0].tolist() == [0, 1, 1, 0, 0, 0]
    long = [ds[(epoch, 2)]["targets"].shape for epoch in range(4)]  # 2 s clip: 12 rows, cropped to 7
    assert all(s == (7, 2) for s in long)
    assert ds[(3, 2)]["fbank"].shape == (7 * 16, 128)
    batch = collate_segments([ds[(0, 0)], ds[(0, 2)]])
    assert len(batch) == 2 and batch.fbank.shape == (2, 112, 128) and batch.frame_mask[0].sum() == 96
    loss, logits, row_mask = row_bce(model, batch, torch.device("cpu"), torch.float32)
    assert row_mask.tolist()[0] == [True] * 6 + [False]
    # the loss equals the mean BCE over the real rows only
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")
    expect = (per[0, :6].sum() + per[1].sum()) / (13 * 2)
    assert torch.allclose(loss, expect)
    state = full_state_dict(None, model)
    assert set(state) == set(model.state_dict()) and all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("path", ["configs/cascade/sed.yaml", "configs/demo/cascade_sed.yaml"])
def test_sed_recipe_configs_load_and_open_with_their_command(path):
    text = (ROOT / path).read_text()
    assert text.startswith("# deepspeed train/sed.py --config " + path)
    cfg = load_sed_train_config(ROOT / path)
    assert cfg.model.encoder_layerdrop == 0.0
    with pytest.raises(ConfigError, match="unknown config key 'data.segment_row'"):
        load_sed_train_config(ROOT / path, ["data.segment_row=4"])


@pytest.mark.parametrize("path,cls,command", [
    ("configs/cascade/calibrate.yaml", CalibrateConfig, "# python -m aqa.sed.calibrate"),
    ("configs/demo/cascade_calibrate.yaml", CalibrateConfig, "# python -m aqa.sed.calibrate"),
    ("configs/cascade/events.yaml", SedEventsConfig, "# python -m data_prep.sed_events"),
    ("configs/demo/cascade_events.yaml", SedEventsConfig, "# python -m data_prep.sed_events"),
])
def test_calibrate_and_events_configs_load(path, cls, command):
    assert (ROOT / path).read_text().startswith(command)
    cfg = load_config(cls, ROOT / path)
    assert cfg.posteriors.hop_rows >= 1
    if cls is SedEventsConfig:
        assert cfg.events.threshold == 0.1  # the brief's default


def test_calibrate_and_events_configs_agree_on_the_segment_grid():
    for a, b in (("configs/cascade/calibrate.yaml", "configs/cascade/events.yaml"),
                 ("configs/demo/cascade_calibrate.yaml", "configs/demo/cascade_events.yaml")):
        pa, pb = (yaml.safe_load((ROOT / p).read_text())["posteriors"] for p in (a, b))
        assert (pa["hop_rows"], pa["window_rows"]) == (pb["hop_rows"], pb["window_rows"])
