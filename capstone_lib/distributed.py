"""Processes and devices: torchrun/accelerate ranks, the device each trains on, barriers.

Alone (no ``WORLD_SIZE`` or 1) every helper here is a no-op or returns rank 0 of 1.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun/accelerate environment (0, 1, 0 alone)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str) -> torch.device:
    """The device this process trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    dev = torch.device(device)
    if dev.type == "cuda" and (dev.index is None or dist_env()[1] > 1):
        dev = torch.device("cuda", dist_env()[2] if dist_env()[1] > 1 else torch.cuda.current_device())
    return dev


def init_distributed(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join the torchrun/accelerate process group once (idempotent); returns ``(rank, world_size)``.

    Alone (``WORLD_SIZE`` unset or 1, no group) it does nothing. Otherwise gloo on CPU, nccl on
    CUDA; on CUDA this process is first pinned to ``cuda:LOCAL_RANK``, so that a plain ``"cuda"``
    (``.to("cuda")``, ``device_map``) loads onto this rank's GPU. Call it before loading models.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, _ = dist_env()
    if world <= 1:
        return rank, world
    dev = resolve_device(str(device))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def rank_zero_first():
    """Run the block on rank 0 first (training a tiny model, a download), then on the other ranks."""
    group = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if group else 0
    if group and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if group and rank == 0:
            dist.barrier()


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised (call at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
