"""Resume stage-1/2 runs under ``torchrun`` (used by tests/test_scale_out.py).

``torchrun --standalone --nproc_per_node 2 tests/scale_worker.py stage1:OUT_DIR [stage2:OUT_DIR ...]``
resumes (``resume=True``: a checkpoint must be there) the real ``train_stage1``/``train_stage2`` of
the ``smoke`` profile in each OUT_DIR, with ``scale_profile(world_size)``: the same effective batch
on any number of ranks. ``CAPSTONE_RUNS`` says where the profile's runs are.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

MICRO = 4        # micro-batch per rank
GROUP = 2        # micro-batches per optimizer step over all ranks (1 rank: accumulate 2)
STEPS = 4        # optimizer steps; checkpoints at 2 and 4


def scale_settings(world_size: int) -> dict[str, dict]:
    """Profile overrides for ``world_size`` ranks: 2 micro-batches of 4 per step in total."""
    if GROUP % world_size:
        raise ValueError(f"world_size {world_size} does not divide {GROUP}")
    stage = dict(micro_batch_size=MICRO, grad_accum=GROUP // world_size, max_steps=STEPS, save_every=2,
                 eval_every=STEPS)
    # batches of 8 images: both ranks build part of the 48-image smoke cache
    return {"vision": dict(cache_batch_size=8), "stage1": dict(stage), "stage2": dict(stage)}


def scale_profile(world_size: int):
    """The ``smoke`` profile with ``scale_settings(world_size)``."""
    from capstone_lib import get_profile

    return get_profile("smoke", **scale_settings(world_size))


def cli_settings(world_size: int) -> list[str]:
    """``scale_settings`` as ``--set SECTION.KEY=VALUE`` arguments of ``python -m capstone_lib.train``."""
    return [arg for section, keys in scale_settings(world_size).items() for k, v in keys.items()
            for arg in ("--set", f"{section}.{k}={v}")]


def main(jobs: list[str]) -> None:
    """Each job is ``stage1:OUT_DIR`` or ``stage2:OUT_DIR``; rank 0 prints the losses."""
    import torch

    from capstone_lib.stage1 import train_stage1
    from capstone_lib.stage2 import train_stage2
    from capstone_lib.distributed import cleanup_distributed

    torch.set_num_threads(1)
    profile = scale_profile(int(os.environ.get("WORLD_SIZE", 1)))
    for job in jobs:
        stage, out = job.split(":", 1)
        train = {"stage1": train_stage1, "stage2": train_stage2}[stage]
        res = train(profile, resume=True, out_dir=out)
        if int(os.environ.get("RANK", 0)) == 0:
            print("LOSSES", stage, [r["loss"] for r in res["history"]], flush=True)
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
