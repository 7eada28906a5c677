"""aqa.runtime.checkpoint: RNG capture/restore, the JSON train state, finding checkpoints to resume, weights-only loading."""

import json
import random

import numpy as np
import pytest
import torch

from aqa.runtime import checkpoint as ckpt


def _draws():
    return (random.random(), float(np.random.rand()), float(np.random.standard_normal()), torch.rand(3).tolist(),
            torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())


def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    state = json.loads(json.dumps(ckpt.capture_rng()))  # must survive the trip through a file
    expected = _draws()
    _draws()  # move every generator on
    ckpt.restore_rng(state)
    assert _draws() == expected


def test_train_state_json_round_trip():
    state = ckpt.TrainState(global_step=7, epoch=2, consumed=12, nonfinite_steps=1, world_size=2,
                            rng=ckpt.capture_rng())
    again = ckpt.TrainState.from_json(state.to_json())
    assert again == state


def _fake_checkpoint(root, step, complete=True):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / ckpt.COMPLETE).write_text(f"{step}\n")
    return d


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / ckpt.CHECKPOINTS
    assert ckpt.resolve_resume("auto", root) is None  # nothing yet: a fresh start
    _fake_checkpoint(root, 10)
    newest = _fake_checkpoint(root, 200)
    _fake_checkpoint(root, 30)
    _fake_checkpoint(root, 300, complete=False)  # killed while saving
    (root / "latest").write_text("step_00000300")  # DeepSpeed's own pointer is not trusted
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(root)] == [10, 30, 200]
    assert ckpt.resolve_resume("auto", root) == newest
    assert ckpt.resolve_resume("none", root) is None
    assert ckpt.resolve_resume(None, root) is None
    assert ckpt.resolve_resume(str(root / "step_00000030"), root) == root / "step_00000030"


def test_resume_from_a_bad_path_says_what_to_do(tmp_path):
    root = tmp_path / ckpt.CHECKPOINTS
    with pytest.raises(ckpt.CheckpointError, match="resume=auto"):
        ckpt.resolve_resume(str(tmp_path / "missing"), root)
    half = _fake_checkpoint(root, 5, complete=False)
    with pytest.raises(ckpt.CheckpointError, match="killed while saving"):
        ckpt.resolve_resume(str(half), root)


class Payload:
    """Not on the allowlist: unpickling it would run this module's code."""

    def __init__(self):
        self.x = 1


def test_safe_load_reads_tensors_and_refuses_other_objects(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4), "step": 3, "names": ["a"]}, good)
    loaded = ckpt.safe_torch_load(good)
    assert loaded["step"] == 3 and loaded["w"].tolist() == [0, 1, 2, 3]
    bad = tmp_path / "bad.pt"
    torch.save({"payload": Payload()}, bad)
    with pytest.raises(ckpt.CheckpointError, match="allowlist"):
        ckpt.safe_torch_load(bad)


def test_safe_load_accepts_deepspeed_zero_state_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "zero.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                "frag": fragment_address(numel=4, start=0)}, path)
    loaded = ckpt.safe_torch_load(path)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["frag"].numel == 4 and loaded["loss_scaler"].cur_scale == 1.0
