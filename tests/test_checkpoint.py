"""Checkpoint directories: round trip, manifest checks, fallback past corrupt ones, pruning, space."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from capstone_lib import get_profile
from capstone_lib.checkpoint import (MANIFEST_FILE, META_FILE, MODEL_FILE, STATE_FILE, CheckpointError,
                                     check_writable, clean_partial, copy_into_model, latest_checkpoint,
                                     list_checkpoints, load_checkpoint, load_trainable, save_checkpoint,
                                     stage_checkpoint_dir, verify_checkpoint)


def _save(root, step, keep_last=None, value=None):
    tensors = {"proj.weight": torch.full((4, 3), float(step if value is None else value)),
               "proj.bias": torch.arange(4, dtype=torch.bfloat16)}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
             "rng": [{"python": (3, tuple(range(5)), None), "torch": torch.get_rng_state()}]}
    return save_checkpoint(root, step, tensors, state, {"step": step, "history": [{"loss": 1.5}]},
                           keep_last=keep_last)


def test_round_trip_and_manifest(tmp_path):
    path = _save(tmp_path, 7)
    assert path == tmp_path / "step-000007" and not (tmp_path / "step-000007.tmp").exists()
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {MODEL_FILE, STATE_FILE, META_FILE} and manifest["step"] == 7
    for name, info in manifest["files"].items():
        assert (path / name).stat().st_size == info["size"] and len(info["sha256"]) == 64
    ckpt = load_checkpoint(path)
    assert ckpt.step == 7 and ckpt.meta["history"] == [{"loss": 1.5}]
    assert torch.equal(ckpt.tensors["proj.weight"], torch.full((4, 3), 7.0))
    assert ckpt.tensors["proj.bias"].dtype == torch.bfloat16
    assert ckpt.state["rng"][0]["python"] == (3, (0, 1, 2, 3, 4), None)
    assert torch.equal(ckpt.state["rng"][0]["torch"], torch.get_rng_state())


def test_keep_last_prunes_oldest_and_ignores_partial_dirs(tmp_path):
    for step in (1, 2, 3, 10):
        _save(tmp_path, step, keep_last=2)
    (tmp_path / "step-000011.tmp").mkdir()                    # what a kill during a write leaves
    (tmp_path / "step-000012").mkdir()                        # a dir with no manifest at all
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000010", "step-000012"]
    assert clean_partial(tmp_path, log=lambda m: None) == 1
    assert not (tmp_path / "step-000011.tmp").exists()


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 4, value=1.0)
    _save(tmp_path, 4, value=2.0)
    assert torch.equal(load_checkpoint(tmp_path / "step-000004").tensors["proj.weight"], torch.full((4, 3), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step-000004"]


def _flip_byte(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": (lambda c: _flip_byte(c / MODEL_FILE), "sha256 does not match"),
    "truncated": (lambda c: (c / STATE_FILE).write_bytes((c / STATE_FILE).read_bytes()[:50]), "truncated"),
    "missing file": (lambda c: (c / META_FILE).unlink(), "missing"),
    "no manifest": (lambda c: (c / MANIFEST_FILE).unlink(), "partial checkpoint"),
    "garbled manifest": (lambda c: (c / MANIFEST_FILE).write_text('{"files": '), "unreadable manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_checkpoint_is_skipped_with_a_message(tmp_path, damage):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    hurt, reason = DAMAGE[damage]
    hurt(newest)
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(newest)
    messages = []
    assert latest_checkpoint(tmp_path, log=messages.append) == tmp_path / "step-000002"
    assert len(messages) == 1 and "step-000004 is corrupt or partial" in messages[0] and reason in messages[0]
    assert latest_checkpoint(tmp_path, log=messages.append, quarantine=True) == tmp_path / "step-000002"
    assert (tmp_path / "step-000004.corrupt").is_dir() and "moved to step-000004.corrupt" in messages[-1]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]


def test_no_good_checkpoint_gives_none(tmp_path):
    _flip_byte(_save(tmp_path, 1) / STATE_FILE)
    messages = []
    assert latest_checkpoint(tmp_path, log=messages.append) is None and len(messages) == 1
    assert latest_checkpoint(tmp_path / "missing") is None


def test_copy_into_model_checks_names_and_shapes(tmp_path):
    path = _save(tmp_path, 3)
    model = nn.Module()
    model.proj = nn.Linear(3, 4)
    assert load_trainable(model, path) == ["proj.bias", "proj.weight"]
    assert torch.equal(model.proj.weight, torch.full((4, 3), 3.0))
    with pytest.raises(CheckpointError, match="shape"):
        copy_into_model(model, {"proj.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="not in the model"):
        copy_into_model(model, {"other.weight": torch.zeros(2, 2)})


def test_check_writable_reports_space_and_unwritable_paths(tmp_path):
    check_writable(tmp_path / "new" / "dir", need_bytes=1024)
    assert (tmp_path / "new" / "dir").is_dir() and not any((tmp_path / "new" / "dir").iterdir())
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CheckpointError, match="not enough free space"):
        check_writable(tmp_path, need_bytes=2 * free)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=f"{blocker}/ckpt is not writable"):
        check_writable(blocker / "ckpt")


def test_save_into_an_unusable_place_raises_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint step 5"):
        _save(blocker, 5)


def test_stage_checkpoint_dir_follows_drive_dir(tmp_path):
    local = get_profile("smoke")
    assert stage_checkpoint_dir(local, "stage1") == local.run_dir / "stage1" / "checkpoints"
    drive = get_profile("smoke", runtime={"drive_dir": str(tmp_path / "MyDrive")})
    assert stage_checkpoint_dir(drive, "stage2") == tmp_path / "MyDrive" / "smoke" / "stage2" / "checkpoints"
