"""Run trainer jobs under ``torchrun`` (used by tests/test_distributed.py).

``torchrun --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR:STOP_AT [OUT_DIR:STOP_AT ...]``
trains the tiny classifier of ``test_trainer`` in each OUT_DIR (resuming what is there) up to
step STOP_AT (0 = to the end), with micro-batch 2 and no accumulation per rank.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402

from capstone_lib.distributed import cleanup_distributed  # noqa: E402
from test_trainer import TinyNet, make_trainer  # noqa: E402

DIST_CFG = dict(max_steps=6, micro_batch_size=2, save_every=3, eval_every=None)


def main(jobs: list[str]) -> None:
    """Each job is ``out_dir:stop_at``; rank 0 prints the losses it logged."""
    torch.set_num_threads(1)
    for job in jobs:
        out, stop = job.rsplit(":", 1)
        res = make_trainer(out, TinyNet(), grad_accum=1, **DIST_CFG).fit(stop_at_step=int(stop) or None)
        if int(os.environ.get("RANK", 0)) == 0:
            print("LOSSES", out, [round(r["loss"], 6) for r in res.history], flush=True)
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
