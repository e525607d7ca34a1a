"""Stages 1 and 2 on two gloo ranks (torchrun, CPU) train like one process with the same effective batch.

At ``smoke`` size, the real ``train_stage1``/``train_stage2``: one process with micro-batch 4 x
accumulation 2 and two ranks (``python -m capstone_lib.train`` under torchrun) with micro-batch 4 x
accumulation 1 see the same 8 samples per optimizer step. Their losses and final weights agree to
float tolerance (rel 1e-5 / atol 1e-6; they are usually bit-identical), a checkpoint written by one
world size resumes in the other, and the feature cache built by two ranks equals the one-process
cache byte for byte. The language model and the tiny CLIP are built once, by one process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capstone_lib.checkpoint import load_checkpoint
from capstone_lib.history import read_history
from scale_worker import STEPS, cli_settings, scale_profile

HERE = Path(__file__).resolve().parent
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


def _torchrun(args: list[str], runs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPSTONE_RUNS": str(runs), "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    """Start ``dst_run`` with nothing but ``src_run``'s checkpoint of ``step``."""
    name = f"step-{step:06d}"
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process reference runs in ``one/``, two-rank runs in ``two/``, and the runs resumed across."""
    from capstone_lib.feature_cache import ensure_feature_cache
    from capstone_lib.language_model import ensure_language_model
    from capstone_lib.stage1 import train_stage1
    from capstone_lib.stage2 import train_stage2

    root = tmp_path_factory.mktemp("scale")
    one, two = root / "one", root / "two"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPSTONE_RUNS", str(one))
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(key, raising=False)
        p1 = scale_profile(1)
        ensure_language_model(p1)                          # LitGPT pretraining, once
        for split in ("train", "val"):                     # trains the tiny CLIP, one-process cache
            ensure_feature_cache(p1, split)
        (two / "smoke" / "pretrain").mkdir(parents=True)
        shutil.copytree(one / "smoke" / "pretrain" / "hf", two / "smoke" / "pretrain" / "hf")
        shutil.copytree(one / "smoke" / "clip", two / "smoke" / "clip")

        ref1 = train_stage1(p1, resume=False)["history"]   # 1 process, micro 4 x accum 2
        ref2 = train_stage2(p1, resume=False)["history"]
        _copy_checkpoint(one / "smoke" / "projector", 2, two / "smoke" / "s1-from-one")
        _copy_checkpoint(one / "smoke" / "stage2", 2, two / "smoke" / "s2-from-one")

        # 2 ranks, micro 4 x accum 1, through the command line; then resume the 1-process checkpoints
        cli = _torchrun(["-m", "capstone_lib.train", "features", "stage1", "stage2", "--profile", "smoke",
                         *cli_settings(2)], two)
        crossed = _torchrun([str(HERE / "scale_worker.py"), f"stage1:{two / 'smoke' / 's1-from-one'}",
                             f"stage2:{two / 'smoke' / 's2-from-one'}"], two)

        # 1 process resumes the 2-rank checkpoints
        _copy_checkpoint(two / "smoke" / "projector", 2, one / "smoke" / "s1-from-two")
        _copy_checkpoint(two / "smoke" / "stage2", 2, one / "smoke" / "s2-from-two")
        back1 = train_stage1(p1, resume=True, out_dir=one / "smoke" / "s1-from-two")["history"]
        back2 = train_stage2(p1, resume=True, out_dir=one / "smoke" / "s2-from-two")["history"]
    return {"one": one / "smoke", "two": two / "smoke", "ref1": ref1, "ref2": ref2, "cli": cli,
            "crossed": crossed, "back1": back1, "back2": back2}


def _losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
def test_two_ranks_train_like_one_process(runs):
    one, two = runs["one"], runs["two"]
    for stage, run in (("ref1", "projector"), ("ref2", "stage2")):
        ref = _losses(runs[stage])
        assert len(ref) == STEPS and len(set(ref)) > 1                # really trained, losses move
        two_ranks = read_history(two / run / "checkpoints")
        assert load_checkpoint(two / run / "checkpoints" / f"step-{STEPS:06d}").meta["world_size"] == 2
        assert _losses(two_ranks) == pytest.approx(ref, rel=LOSS_RTOL)
        assert "val_loss" in two_ranks[-1]                             # rank 0 validated
    _assert_same_weights(load_file(one / "projector" / "projector.safetensors"),
                         load_file(two / "projector" / "projector.safetensors"))
    _assert_same_weights(load_file(one / "stage2" / "adapter" / "adapter_model.safetensors"),
                         load_file(two / "stage2" / "adapter" / "adapter_model.safetensors"))
    out = runs["cli"].stdout
    assert out.count("SUMMARY ") == 1 and out.count("[stage1] ") == 1     # rank 0 alone reports
    summary = json.loads(out.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["world_size"] == 2 and summary["stages"]["stage2"]["steps"] == STEPS


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes(runs):
    one, two = runs["one"], runs["two"]
    for stage, ref, run in (("stage1", "ref1", "s1-from-one"), ("stage2", "ref2", "s2-from-one")):
        last = load_checkpoint(two / run / "checkpoints" / f"step-{STEPS:06d}").meta
        assert last["world_size"] == 2 and last["config"]["grad_accum"] == 1
        # steps 1-2 were trained by 1 process (in the checkpoint), 3-4 by 2 ranks after resuming it
        assert _losses(read_history(two / run / "checkpoints")) == pytest.approx(_losses(runs[ref]),
                                                                                rel=LOSS_RTOL)
    assert runs["crossed"].stdout.count("resumed from") == 2
    for back, ref, run in (("back1", "ref1", "s1-from-two"), ("back2", "ref2", "s2-from-two")):
        first = load_checkpoint(one / run / "checkpoints" / "step-000002").meta
        last = load_checkpoint(one / run / "checkpoints" / f"step-{STEPS:06d}").meta
        assert first["world_size"] == 2 and last["world_size"] == 1 and last["config"]["grad_accum"] == 2
        assert _losses(runs[back]) == pytest.approx(_losses(runs[ref]), rel=LOSS_RTOL)
    _assert_same_weights(load_file(one / "projector" / "projector.safetensors"),
                         load_file(one / "s1-from-two" / "projector.safetensors"))


@pytest.mark.slow
def test_feature_cache_from_two_ranks_equals_one_process_cache(runs):
    for split in ("train", "val"):
        a, b = runs["one"] / "features" / split, runs["two"] / "features" / split
        for name in ("features.npy", "index.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{split}/{name} differs"
        meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
        meta_a.pop("encoder"), meta_b.pop("encoder")                   # the path of each root's CLIP copy
        assert meta_a == meta_b
        assert not (b / "shards").exists()                             # merged, shards removed


def test_pretrain_refuses_torchrun(monkeypatch):
    from capstone_lib.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="launch it once with plain python"):
        main(["pretrain", "--profile", "smoke"])


def test_cli_settings_parse():
    from capstone_lib.train import main, parse_overrides, parse_resume

    assert parse_overrides(["stage1.max_steps=10", "vision.cache_dtype=float16", "stage2.lora_targets=[\"q\"]"]) \
        == {"stage1": {"max_steps": 10}, "vision": {"cache_dtype": "float16"}, "stage2": {"lora_targets": ["q"]}}
    assert (parse_resume("auto"), parse_resume("True"), parse_resume("false")) == ("auto", True, False)
    with pytest.raises(SystemExit, match="SECTION.KEY=VALUE"):
        parse_overrides(["max_steps=10"])
    with pytest.raises(SystemExit, match="no section 'stag1'"):
        main(["stage1", "--profile", "smoke", "--set", "stag1.max_steps=3"])


def test_gpu_profiles_switch_the_hub_back_on(monkeypatch):
    import capstone_lib
    from capstone_lib import get_profile
    from capstone_lib.train import _allow_hub

    monkeypatch.setattr(capstone_lib, "_ONLINE", False)      # as imported without a GPU CAPSTONE_PROFILE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CAPSTONE_ONLINE", raising=False)
    _allow_hub(get_profile("smoke"))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    _allow_hub(get_profile("a100x16"))
    assert "HF_HUB_OFFLINE" not in os.environ
