"""Batches for stages 1 and 2: padding, label masks, and length-grouped sampling."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .chat import IGNORE_INDEX


def collate_padded(samples: Sequence[dict], pad_id: int, feature_lookup: Callable[[list[int]], torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``/``labels`` of samples and fetch their cached image features.

    Padding positions get ``attention_mask`` 0 and label -100, whatever the pad token id is
    (the earlier write-ups masked labels by token id, EOS == pad, so EOS was never learned).
    """
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.as_tensor(s["input_ids"])
        labels[row, :n] = torch.as_tensor(s["labels"])
        mask[row, :n] = 1
    if not (labels != IGNORE_INDEX).any():
        raise ValueError("batch has no supervised token (every label is -100): check the label mask")
    features = feature_lookup([s["image_id"] for s in samples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "image_features": features}


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices shuffled by (seed, epoch) and cut into batches (the last one may be short)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           mega: int = 32) -> list[list[int]]:
    """Shuffle, sort by length inside chunks of ``mega`` batches, then shuffle the batches.

    Samples of similar length share a batch, so little compute goes to padding, while the
    order stays random (as transformers' LengthGroupedSampler does).
    """
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    span = batch_size * mega
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]
