"""Fault injection: SIGKILL training runs mid-step, mid-validation and mid-checkpoint, resume, compare.

For each stage look-alike (``tests/fault_worker.py``: stage 1 = frozen LM + projector, stage 2
= 4-bit LM + LoRA + projector), a reference run trains uninterrupted. Then one run is killed
12 times (8 named kill points, 4 at random moments; seeded), each time resumed with
``resume="auto"``, and finally allowed to finish. After every kill, every complete checkpoint
on disk must verify and load; at the end the trainable weights and the metrics history must be
bit-for-bit those of the reference run.

Runs are forked from a ``multiprocessing`` forkserver that imports torch/transformers/peft once,
so each of the ~30 short training processes starts in milliseconds rather than seconds.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capstone_lib.checkpoint import MODEL_FILE, list_checkpoints, load_checkpoint

NAMED = ["step", "eval", "eval_mid", "ckpt_begin", "ckpt_files", "ckpt_manifest", "ckpt_rename", "ckpt_prune"]
N_RANDOM = 4
FINAL = "step-000012"


@pytest.fixture(scope="module")
def ctx():
    """A forkserver context whose server has already imported the worker (and torch, peft ...)."""
    here = Path(__file__).resolve().parent
    # Python 3.11's forkserver ignores the parent's sys.path: PYTHONPATH makes the preload work
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), str(here.parent), old]))
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fault_worker", "transformers", "peft", "bitsandbytes",
                                "transformers.models.gpt_neox.modeling_gpt_neox"])
    ctx.Process(target=time.sleep, args=(0,)).start()      # start the server now, with that path
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old
    return ctx


def _segment(ctx, kind: str, out: Path, env: dict | None = None, kill_after: float | None = None,
             timeout: float = 120.0) -> tuple[int, float]:
    """Run one training process; SIGKILL it after ``kill_after`` s if still alive. -> (exitcode, seconds)."""
    import fault_worker

    env = {"TQDM_DISABLE": "1", **(env or {})}
    p = ctx.Process(target=fault_worker.run_segment, args=(kind, str(out)), kwargs={"env": env})
    t0 = time.perf_counter()
    p.start()
    p.join(kill_after if kill_after is not None else timeout)
    if p.is_alive():
        if kill_after is None:
            p.kill()
            pytest.fail(f"{kind} segment in {out} did not finish in {timeout} s")
        p.kill()                                   # SIGKILL at a random moment
        p.join()
    return p.exitcode, time.perf_counter() - t0


def _assert_all_checkpoints_load(out: Path) -> int:
    ckpts = list_checkpoints(out)
    for c in ckpts:
        load_checkpoint(c)                         # verifies the manifest (sizes + sha256) and parses
    return len(ckpts)


def _assert_same_as_reference(ref: Path, out: Path) -> None:
    a, b = load_file(str(ref / FINAL / MODEL_FILE)), load_file(str(out / FINAL / MODEL_FILE))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{out}: {name} differs from the uninterrupted run"
    assert (ref / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stage1", "stage2"])
def test_sigkill_anywhere_then_resume_is_bit_identical(ctx, kind, tmp_path):
    ref = tmp_path / "reference"
    code, seconds = _segment(ctx, kind, ref)
    assert code == 0 and (ref / FINAL).is_dir()
    rng = random.Random(f"faults-{kind}")
    plan = [("named", f"{name}:{rng.randint(1, 2)}") for name in NAMED]
    plan += [("random", rng.uniform(0.15, 0.6) * seconds) for _ in range(N_RANDOM)]
    rng.shuffle(plan)

    chains, kills, partial_writes = [tmp_path / "chain-0"], [], 0
    for how, what in plan:
        for _attempt in range(2):                  # a kill planned too late just ends the chain
            out = chains[-1]
            if how == "named":
                code, _ = _segment(ctx, kind, out, env={"CAPSTONE_FAULT_KILL": what})
            else:
                code, _ = _segment(ctx, kind, out, env={"CAPSTONE_FAULT_SLEEP": "0.004"}, kill_after=what)
            if code == -signal.SIGKILL:
                kills.append((how, what, out.name))
                partial_writes += any(p.name.endswith(".tmp") for p in out.iterdir())
                _assert_all_checkpoints_load(out)  # no kill may leave a checkpoint that fails to load
                break
            assert code == 0, f"{kind}: training process failed (exit code {code}) in {out}"
            _assert_same_as_reference(ref, out)    # the run finished before the kill point
            chains.append(tmp_path / f"chain-{len(chains)}")
        else:
            pytest.fail(f"{kind}: kill {how} {what} never landed")
    assert len(kills) >= 10
    assert {w.split(":")[0] for h, w, _ in kills if h == "named"} == set(NAMED)
    code, _ = _segment(ctx, kind, chains[-1])      # finish the last chain
    assert code == 0
    _assert_same_as_reference(ref, chains[-1])
    print(f"{kind}: {len(kills)} kills over {len(chains)} chain(s), {partial_writes} left a partial "
          f"checkpoint dir; reference run {seconds:.2f} s")
