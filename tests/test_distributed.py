"""Two gloo processes (torchrun) train like one process with the same effective batch; checkpoints cross over.

One process with micro-batch 2 x accumulation 2 and two ranks with micro-batch 2 x accumulation 1
see the same 4 samples per optimizer step. The losses and weights must agree to float tolerance,
and a checkpoint written by either run must resume in the other.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capstone_lib.checkpoint import load_checkpoint
from dist_worker import DIST_CFG
from test_trainer import TinyNet, make_trainer

HERE = Path(__file__).resolve().parent


def _single(out: Path, stop: int | None = None):
    return make_trainer(out, TinyNet(), grad_accum=2, **DIST_CFG).fit(stop_at_step=stop)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "step-000006" / "model.safetensors"))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_checkpoints_cross_over(tmp_path):
    ref = _single(tmp_path / "one")                         # 1 process, the reference
    _single(tmp_path / "one-then-two", stop=3)              # 1 process to step 3, 2 processes after
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), f"{tmp_path / 'two-then-one'}:3", f"{tmp_path / 'one-then-two'}:0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("LOSSES") == 2                 # only rank 0 reports
    meta = load_checkpoint(tmp_path / "two-then-one" / "step-000003").meta
    assert meta["world_size"] == 2 and len(load_checkpoint(tmp_path / "two-then-one" / "step-000003")
                                           .state["rng"]) == 2
    two_then_one = _single(tmp_path / "two-then-one")       # the 2-rank checkpoint resumes in 1 process
    assert two_then_one.resumed_from.name == "step-000003"
    one_then_two = load_checkpoint(tmp_path / "one-then-two" / "step-000006").meta
    ref_losses = [r["loss"] for r in ref.history]
    # steps 1-3 of "two-then-one" and 4-6 of "one-then-two" ran on two ranks
    assert [r["loss"] for r in two_then_one.history] == pytest.approx(ref_losses, rel=1e-6)
    assert [r["loss"] for r in one_then_two["history"]] == pytest.approx(ref_losses, rel=1e-6)
    exact = True
    for name, value in _weights(tmp_path / "one").items():
        for run in ("two-then-one", "one-then-two"):
            other = _weights(tmp_path / run)[name]
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-7)
            exact &= torch.equal(other, value)
    print(f"2 ranks vs 1 process: final weights bit-identical: {exact}")
