"""BEATs in the project: the official 252 names/shapes, SED directories, .pt conversion, label maps, padding."""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from aqa.check_checkpoint import main as check_main
from aqa.check_checkpoint import run_check
from aqa.sed.beats import BeatsModel, relative_position_bucket
from aqa.sed.config import BeatsConfig, BeatsConfigError, load_beats_config
from aqa.sed.convert import main as convert_main
from aqa.sed.labels import LabelMap, LabelMapError
from aqa.sed.weights import SedCheckpointError, convert_official, load_sed_dir, read_official_checkpoint
from tests.helpers import FIXTURES, ROOT, tiny_beats

PARAMS = FIXTURES / "beats_params.json"  # the official 252 names and shapes
BEATS_CONFIGS = ROOT / "configs" / "cascade" / "beats"


def _labels(n: int) -> LabelMap:
    return LabelMap.from_pairs([(f"/m/c{i}", f"class {i}") for i in range(n)])


def test_reference_listing_matches_252_of_252(capsys):
    assert check_main(["--backbone", "beats", "--index", str(PARAMS)]) == 0
    out = capsys.readouterr().out
    assert "beats: matched 252/252" in out and out.strip().endswith("all checks passed")


def test_state_dict_order_and_parameter_count_equal_the_official_model():
    listing = json.loads(PARAMS.read_text())
    cfg = load_beats_config(BEATS_CONFIGS / "as2m_finetuned.json")
    with torch.device("meta"):
        model = BeatsModel(cfg)
    assert list(model.state_dict()) == list(listing["shapes"])  # same names in the same order
    assert sum(p.numel() for p in model.parameters()) == 90_717_055  # the 11 shared bias copies counted once
    a = model.encoder.layers[0].self_attn.relative_attention_bias
    assert all(layer.self_attn.relative_attention_bias is a for layer in model.encoder.layers)


def test_a_renamed_and_a_misshapen_tensor_fail_naming_them(tmp_path, capsys):
    listing = json.loads(PARAMS.read_text())
    shapes = listing["shapes"]
    shapes["encoder.pos_conv.0.parametrizations.weight.original1"] = shapes.pop("encoder.pos_conv.0.weight_v")
    shapes["predictor.weight"] = [447, 768]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(listing))
    ok, lines = run_check("beats", None, bad)
    text = "\n".join(lines)
    assert not ok
    assert "matched 250/252" in text
    assert "MISSING    encoder.pos_conv.0.weight_v [768, 48, 128]" in text
    assert "UNEXPECTED encoder.pos_conv.0.parametrizations.weight.original1" in text
    assert "MISSHAPEN  predictor.weight: checkpoint [447, 768] vs model [527, 768]" in text
    assert check_main(["--backbone", "beats", "--index", str(bad)]) == 1
    capsys.readouterr()


def test_the_447_class_strong_config_differs_only_in_the_predictor():
    strong = load_beats_config(BEATS_CONFIGS / "strong_447.json")
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in BeatsModel(strong).state_dict().items()}
    ref = json.loads(PARAMS.read_text())["shapes"]
    assert shapes["predictor.weight"] == [447, 768] and shapes["predictor.bias"] == [447]
    assert {k: v for k, v in shapes.items() if not k.startswith("predictor")} == \
        {k: v for k, v in ref.items() if not k.startswith("predictor")}


def test_config_rejects_unknown_keys_and_bad_types(tmp_path):
    with pytest.raises(BeatsConfigError, match="unknown BEATs config keys"):
        BeatsConfig.from_dict({"input_patch_size": 16, "encoder_layer": 3})
    with pytest.raises(BeatsConfigError, match="must be an integer"):
        BeatsConfig.from_dict({"input_patch_size": "16"})
    cfg, ignored = BeatsConfig.from_dict({"input_patch_size": 16, "something_new": 1}, strict=False)
    assert ignored == ["something_new"] and cfg.input_patch_size == 16


def test_bucket_function_on_hand_worked_distances():
    # 32 buckets: 16 per direction, distances < 8 exact, log-spaced up to max_distance 64, capped at 15.
    rel = torch.tensor([0, -1, 1, -7, 7, -8, 8, -16, 16, -63, -1000, 1000])
    got = relative_position_bucket(rel, 32, 64).tolist()
    # 16 -> 8 + floor(log(2)/log(8) * 8) = 8 + 2; 63 -> 8 + floor(log(63/8)/log(8) * 8) = 8 + 7 = 15
    assert got == [0, 1, 17, 7, 23, 8, 24, 10, 26, 15, 15, 31]


def test_tiny_directory_round_trip_keeps_outputs_and_labels(tiny):
    labels = _labels(3)
    model, loaded = load_sed_dir(tiny.beats(labels, seed=3))
    assert loaded.mids == labels.mids and loaded.names == labels.names
    ref = tiny_beats(3, seed=3)
    fbank = torch.randn(1, 64, 128)
    with torch.no_grad():
        assert torch.equal(model(fbank).token_logits, ref(fbank).token_logits)


def test_a_label_map_of_another_size_is_a_clear_error(tmp_path, tiny):
    tiny.write_beats(tmp_path / "sed", _labels(3))  # its own copy: the test replaces its label map
    _labels(5).save(tmp_path / "sed" / "labels.json")
    with pytest.raises(LabelMapError, match="predicts 3 classes but its label map has 5"):
        load_sed_dir(tmp_path / "sed")


def _official_pt(path: Path, model: BeatsModel, label_dict: dict) -> Path:
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in ("fbank_mean", "fbank_std", "num_mel_bins")}
    torch.save({"cfg": cfg, "model": model.state_dict(), "label_dict": label_dict}, path)
    return path


def test_official_pt_converts_through_label_dict_with_display_names(tmp_path, capsys):
    model = tiny_beats(3, seed=1)
    # the checkpoint's own row order, not that of class_labels_indices.csv
    pt = _official_pt(tmp_path / "beats.pt", model, {0: "/m/dog", 1: "/m/cat", 2: "/m/bird"})
    names = tmp_path / "class_labels_indices.csv"
    names.write_text('index,mid,display_name\n0,/m/bird,Bird\n1,/m/cat,Cat\n2,/m/dog,"Dog"\n')
    assert convert_main([str(pt), "--out", str(tmp_path / "out"), "--names", str(names)]) == 0
    assert "3 classes" in capsys.readouterr().out
    loaded, labels = load_sed_dir(tmp_path / "out")
    assert labels.mids == ["/m/dog", "/m/cat", "/m/bird"] and labels.names == ["Dog", "Cat", "Bird"]
    fbank = torch.randn(2, 40, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(fbank).clip_probs, model(fbank).clip_probs)


def test_pt_that_weights_only_refuses_is_not_unpickled(tmp_path):
    model = tiny_beats(2)
    path = tmp_path / "pickled.pt"
    torch.save({"cfg": argparse.Namespace(input_patch_size=16), "model": model.state_dict(),
                "label_dict": {0: "/m/a", 1: "/m/b"}}, path)
    with pytest.raises(SedCheckpointError, match=r"argparse\.Namespace\. Weights-only loading refuses.*re-save"):
        read_official_checkpoint(path)


class _RunsACommand:
    """A pickle that calls os.system when unpickled: what a malicious checkpoint looks like."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload, blocked", [
    ("system", "posix.system"),
    ("numpy", "numpy._core.multiarray.scalar"),
])
def test_converter_names_the_blocked_global_and_the_safe_fix(tmp_path, capsys, payload, blocked):
    marker = tmp_path / "ran"
    extra = _RunsACommand(marker) if payload == "system" else np.float64(0.5)
    path = tmp_path / "beats.pt"
    torch.save({"cfg": {}, "model": tiny_beats(2).state_dict(), "extra": extra}, path)
    assert convert_main([str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert blocked in err and "re-save it once on a trusted machine" in err
    assert "weights_only=False" not in err and "set to `False`" not in err and "\x1b[" not in err  # no advice to
    assert not marker.exists()  # turn the check off, no terminal codes, and the command never ran


def test_pt_with_a_label_dict_of_another_size_fails(tmp_path, capsys):
    pt = _official_pt(tmp_path / "beats.pt", tiny_beats(3), {0: "/m/a", 1: "/m/b"})
    assert convert_main([str(pt), "--out", str(tmp_path / "out")]) == 1
    assert "predicts 3 classes but its label map has 2" in capsys.readouterr().err


def test_pt_whose_tensors_do_not_fit_its_cfg_names_them(tmp_path):
    model = tiny_beats(3)
    state = model.state_dict()
    state["encoder.extra.weight"] = torch.zeros(2)
    del state["encoder.layer_norm.bias"]
    path = tmp_path / "beats.pt"
    cfg = dataclasses.asdict(model.cfg)
    torch.save({"cfg": cfg, "model": state, "label_dict": {0: "a", 1: "b", 2: "c"}}, path)
    with pytest.raises(SedCheckpointError, match=r"1 missing \(encoder.layer_norm.bias\); 1 unexpected"):
        convert_official(path, tmp_path / "out")


def test_padded_batch_equals_one_clip_at_a_time():
    model = tiny_beats(4, seed=2)
    a, b = torch.randn(1, 5 * 16 + 3, 128), torch.randn(1, 3 * 16, 128)
    batch = torch.zeros(2, 5 * 16 + 3, 128)
    batch[0], batch[1, : 3 * 16] = a[0], b[0]
    mask = torch.zeros(2, 5 * 16 + 3, dtype=torch.bool)
    mask[0], mask[1, : 3 * 16] = True, True
    with torch.no_grad():
        out = model(batch, mask)
        one_a, one_b = model(a), model(b)
    assert out.row_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.allclose(out.row_logits[0], one_a.row_logits[0], atol=1e-5)
    assert torch.allclose(out.row_logits[1, :3], one_b.row_logits[0], atol=1e-5)
    assert torch.allclose(out.clip_logits, torch.cat([one_a.clip_logits, one_b.clip_logits]), atol=1e-5)


def test_fewer_frames_than_one_row_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 16 fbank frames"):
        tiny_beats(2)(torch.randn(1, 15, 128))


def test_token_padding_follows_the_official_rule_inside_a_row():
    from aqa.sed.beats import token_padding

    # 3 rows of 16 frames, 8 frequency patches per row: 24 tokens of 2 consecutive frames each (official
    # forward_padding_mask). 37 real frames end inside row 2: its tokens 0-2 still see a real frame.
    mask = torch.zeros(1, 48, dtype=torch.bool)
    mask[0, :37] = True
    pad = token_padding(mask, 24).view(3, 8)
    assert not pad[:2].any()
    assert pad[2].tolist() == [False, False, False, True, True, True, True, True]
    # frames past a multiple of the token count are dropped first (40 frames, 2 rows: 32 kept)
    tail = torch.ones(1, 40, dtype=torch.bool)
    tail[0, 32:] = False
    assert not token_padding(tail, 16).any()


def test_whole_row_masks_pad_whole_rows_and_the_model_uses_them():
    from aqa.sed.beats import token_padding

    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 32:] = False  # sample 1: rows 2 and 3 are padding
    rows = ~mask.view(2, 4, 16).all(-1)
    assert torch.equal(token_padding(mask, 32), rows.repeat_interleave(8, dim=1))
    model = tiny_beats(3).eval()
    fbank = torch.randn(2, 64, 128)
    with torch.no_grad():
        out = model(fbank, mask)
        alone = model(fbank[1:, :32])
    assert out.row_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert torch.allclose(out.clip_logits[1], alone.clip_logits[0], atol=1e-5)  # padding changes nothing


def test_the_sed_trainer_builds_whole_row_masks():
    from aqa.sed.train import collate_segments

    items = [{"id": "a", "fbank": np.zeros((32, 128), np.float32), "targets": np.zeros((2, 3), np.float32)},
             {"id": "b", "fbank": np.zeros((16, 128), np.float32), "targets": np.zeros((1, 3), np.float32)}]
    batch = collate_segments(items)
    per_row = batch.frame_mask.view(2, -1, 16)
    assert (per_row.all(-1) | ~per_row.any(-1)).all()  # every row all real or all padding
