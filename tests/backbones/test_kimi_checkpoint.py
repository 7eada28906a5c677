"""The Kimi-Audio checkpoint check: the reference names/shapes (419 LM tensors, whisper-large-v3, the
GLM-4-Voice tokenizer's 247) and a tiny release directory, plus failing cases naming the tensors."""

import json

import pytest
from safetensors.torch import load_file, save_file

from aqa.backbones import get_backbone
from aqa.backbones.kimi_audio.checkpoint import check_release
from aqa.check_checkpoint import checkers, main, run_check
from tests.helpers import FIXTURES

CONFIG = FIXTURES / "kimi_audio_7b_instruct_config.json"
PARAMS = FIXTURES / "kimi_audio_7b_params.json"


def _run(capsys, config, index) -> tuple[int, str]:
    rc = main(["--backbone", "kimi_audio", "--config", str(config), "--index", str(index)])
    return rc, capsys.readouterr().out


def test_reference_matches_419_and_the_whisper_and_glm_layouts(capsys):
    rc, out = _run(capsys, CONFIG, PARAMS)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("kimi_audio language model: matched 419/419 (34 rotary_emb.inv_freq")
    assert lines[1].startswith("whisper-large-v3 encoder: matched 487/487 (772 decoder tensors")
    assert lines[2].startswith("glm-4-voice-tokenizer: matched 247/247 (2 EMA")
    assert lines[-1] == "all checks passed"


def test_a_renamed_tensor_fails_naming_both_names(capsys, tmp_path):
    listing = json.loads(PARAMS.read_text())
    old = "model.layers.7.mlp.up_proj.weight"
    new = "model.layers.7.mlp.upper_proj.weight"
    listing["model"] = {(new if k == old else k): v for k, v in listing["model"].items()}
    bad = tmp_path / "params.json"
    bad.write_text(json.dumps(listing))
    rc, out = _run(capsys, CONFIG, bad)
    assert rc == 1
    assert "matched 418/419" in out
    assert f"MISSING    {old} [18944, 3584]" in out
    assert f"UNEXPECTED {new} [18944, 3584]" in out
    assert out.splitlines()[-1].startswith("FAILED: kimi_audio language model")


def test_misshapen_and_glm_errors_are_named(capsys, tmp_path):
    listing = json.loads(PARAMS.read_text())
    listing["model"]["lm_head.weight"] = [168448, 4096]
    del listing["glm4_voice_tokenizer"]["codebook.weight"]
    bad = tmp_path / "params.json"
    bad.write_text(json.dumps(listing))
    rc, out = _run(capsys, CONFIG, bad)
    assert rc == 1
    assert "MISSHAPEN  lm_head.weight: checkpoint [168448, 4096] vs model [168448, 3584]" in out
    assert "glm-4-voice-tokenizer: matched 246/247" in out
    assert "MISSING    codebook.weight [16384, 1280]" in out


def test_a_config_that_does_not_fit_fails(capsys, tmp_path):
    config = json.loads(CONFIG.read_text())
    config["num_hidden_layers"] = 27
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(config))
    rc, out = _run(capsys, bad, PARAMS)
    assert rc == 1
    assert "UNEXPECTED model.layers.27.self_attn.q_proj.weight" in out


def test_a_tiny_kimi_audio_directory_passes_from_its_own_index(tiny_kimi_audio):
    ok, lines = run_check("kimi_audio", tiny_kimi_audio / "config.json", tiny_kimi_audio / "model.safetensors.index.json")
    assert ok, lines
    assert lines[0].startswith("kimi_audio language model: matched 83/83 (6 rotary_emb.inv_freq")
    assert lines[1].startswith("whisper-large-v3 encoder: matched")
    assert "(28 decoder tensors, not used)" in lines[1]
    assert lines[2].startswith("glm-4-voice-tokenizer: matched 37/37 (2 EMA")


def test_a_release_with_a_changed_shard_fails(tiny_kimi_audio, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_kimi_audio, tmp_path / "copy")
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = copy / index["weight_map"]["mimo_output.weight"]
    tensors = load_file(str(shard))
    tensors["mimo_output.weight"] = tensors["mimo_output.weight"][:, :32].contiguous()
    save_file(tensors, str(shard))
    ok, lines = run_check("kimi_audio", copy / "config.json", copy / "model.safetensors.index.json")
    assert not ok
    assert any(line.startswith("  MISSHAPEN  mimo_output.weight: checkpoint [") for line in lines)


def test_checkers_come_from_the_backbone_protocol_and_beats():
    assert checkers()["kimi_audio"].check is check_release
    assert get_backbone("kimi_audio").checkpoint_checker().check is check_release
    assert get_backbone("qwen2_audio").checkpoint_checker() is None  # a backbone without a check says so
    assert "beats" in checkers()
    with pytest.raises(SystemExit, match="no checkpoint checker for backbone 'no_such_backbone'"):
        run_check("no_such_backbone", CONFIG, PARAMS)
