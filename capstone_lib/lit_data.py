"""A LitGPT ``DataModule`` over RedPajama-format jsonl text, without litdata.

Each line of a corpus file is a JSON object with a ``"text"`` field (RedPajama's format;
``"meta"`` is ignored). Documents are tokenized once, each followed by the end-of-text
token, concatenated into one stream of ids and cut into blocks of ``max_seq_length + 1``
tokens (inputs and next-token targets overlap by one). The ids are cached as ``.npy``
files keyed by the corpus and the tokenizer, so a resumed run does not tokenize again.

LitGPT uses it as::

    litgpt pretrain ... --data capstone_lib.lit_data.JsonlText \\
        --data.train_path corpus/train.jsonl --data.val_path corpus/val.jsonl

The training loader is *resumable*: it reports its position (epoch, batches served) to
Fabric, which stores it in every checkpoint, so ``--resume auto`` continues with the very
next batch instead of replaying the epoch from the start.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset

from .redpajama import iter_jsonl_texts, jsonl_files
from .validation import DataError

ENCODE_BATCH = 512   # documents per call to the Rust tokenizer


def corpus_files(path: str | Path) -> list[Path]:
    """The jsonl files of a corpus: ``path`` itself, or every ``*.jsonl(.gz)`` in a directory."""
    files = jsonl_files(path)
    for f in files:
        if not f.is_file():
            raise DataError("corpus file not found", path=f)
    return files


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (LitGPT tokenizer; no BOS unless the tokenizer asks for one)."""
    if tokenizer.backend == "huggingface":
        ids = [enc.ids for enc in tokenizer.processor.encode_batch(texts)]
    else:
        ids = [tokenizer.processor.encode(t) for t in texts]
    if tokenizer.use_bos and tokenizer.bos_id is not None:
        ids = [[tokenizer.bos_id] + x for x in ids]
    return ids


def tokenize_jsonl(path: str | Path, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """All documents of one jsonl file as one array of ids, each document ending with one EOS.

    Bad lines raise ``DataError`` naming the file and line; a file without any document
    raises too. ``max_tokens`` stops reading once that many ids were collected.
    """
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_token in tokenizer_config.json)")
    dtype = np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.int32
    chunks: list[np.ndarray] = []
    batch: list[str] = []
    n_docs = n_tokens = 0

    def flush() -> None:
        nonlocal n_tokens
        for ids in _encode_texts(tokenizer, batch):
            if not ids or ids[-1] != tokenizer.eos_id:   # chat documents already end with EOS
                ids = ids + [tokenizer.eos_id]
            arr = np.asarray(ids, dtype=dtype)
            chunks.append(arr)
            n_tokens += arr.size
        batch.clear()

    for text in iter_jsonl_texts(path):
        batch.append(text)
        n_docs += 1
        if len(batch) >= ENCODE_BATCH:
            flush()
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    flush()
    if n_docs == 0:
        raise DataError("empty corpus: no documents with text", path=path)
    ids = np.concatenate(chunks)
    return ids[:max_tokens] if max_tokens is not None else ids


def _cache_key(files: list[Path], tokenizer_fp: str, extra: Any) -> str:
    parts = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    blob = json.dumps([parts, tokenizer_fp, extra], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_token_ids(path: str | Path, tokenizer, cache_dir: str | Path | None = None,
                   max_tokens: int | None = None, verbose: bool = True) -> np.ndarray:
    """Token ids of a corpus (file or directory), read from / written to ``cache_dir``.

    With several files and ``max_tokens``, each file contributes at most an equal share.
    """
    files = corpus_files(path)
    per_file = None if max_tokens is None else max(1, max_tokens // len(files))
    cache = None
    if cache_dir is not None:
        fp = hashlib.sha256(json.dumps([tokenizer.processor.to_str()] if tokenizer.backend == "huggingface"
                                       else [str(tokenizer.model_name)]).encode()).hexdigest()[:16]
        key = _cache_key(files, fp, [per_file, tokenizer.use_bos, tokenizer.eos_id])
        cache = Path(cache_dir) / f"{Path(path).stem}-{key}.npy"
        if cache.is_file():
            return np.load(cache, mmap_mode="r")
    t0 = time.perf_counter()
    ids = np.concatenate([tokenize_jsonl(f, tokenizer, per_file) for f in files])
    if verbose:
        print(f"tokenized {path}: {ids.size:,} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.tmp-{os.getpid()}.npy")
        np.save(tmp, ids)
        os.replace(tmp, cache)
    return ids


def check_blocks(ids: np.ndarray, block: int, path: str | Path, split: str) -> int:
    """Number of full blocks in ``ids``; ``DataError`` naming the file if not even one."""
    n = (len(ids) - 1) // (block - 1) if len(ids) >= block else 0
    if n < 1:
        raise DataError(f"{split} corpus too small: {len(ids)} tokens, fewer than one block of "
                        f"{block} (max_seq_length {block - 1} + 1 target)", path=path)
    return n


class TokenBlocks(Dataset):
    """Blocks of ``block`` ids from a token stream (consecutive blocks share one token).

    With ``seed`` set, block order is a permutation that changes with ``set_epoch``.
    """

    def __init__(self, ids: np.ndarray, block: int, seed: int | None = None):
        self.ids, self.block, self.seed = ids, block, seed
        self.n = (len(ids) - 1) // (block - 1)
        self.order = np.arange(self.n)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the block order for ``epoch`` (no-op without a seed)."""
        if self.seed is not None:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.order[i]) * (self.block - 1)
        return torch.from_numpy(np.asarray(self.ids[start:start + self.block], dtype=np.int64))


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over ``TokenBlocks`` whose position Fabric saves with the checkpoint."""

    def __init__(self, dataset: TokenBlocks, batch_size: int = 1, **kwargs: Any):
        kwargs.setdefault("drop_last", len(dataset) >= batch_size)
        kwargs.pop("shuffle", None)
        super().__init__(dataset, batch_size=batch_size, shuffle=False, **kwargs)
        self.epoch = 0
        self.served = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.dataset.set_epoch(self.epoch)
        batches = super().__iter__()
        for _ in range(self.served):       # skip what the checkpoint had already trained on
            next(batches, None)
        for batch in batches:
            self.served += 1
            yield batch
        self.epoch += 1
        self.served = 0

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches served in it (what ``--resume`` needs to continue exactly)."""
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position."""
        self.epoch, self.served = int(state["epoch"]), int(state["served"])


@dataclass
class JsonlText(DataModule):
    """RedPajama-format jsonl text as blocks of token ids for ``litgpt pretrain``."""

    train_path: Path = Path("data/train.jsonl")
    """A jsonl file, or a directory of them."""
    val_path: Path | None = None
    """Validation jsonl; when ``None`` the last ``val_fraction`` of the training tokens is held out."""
    val_fraction: float = 0.02
    cache_dir: Path | None = None
    """Where token ids are cached (``None``: tokenize on every run)."""
    max_tokens: int | None = None
    """Read at most this many training tokens (large corpora); ``None`` reads everything."""
    seed: int = 42
    num_workers: int = 0

    tokenizer: Any = field(default=None, init=False, repr=False)
    batch_size: int = field(default=1, init=False, repr=False)
    block: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__init__()
        self.train_ids: np.ndarray | None = None
        self.val_ids: np.ndarray | None = None

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = -1, **kwargs) -> None:
        """Receive the tokenizer, micro-batch size and context length from LitGPT."""
        if tokenizer is None:
            raise ValueError("JsonlText needs a tokenizer: pass --tokenizer_dir to litgpt pretrain")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.block = max_seq_length + 1   # +1: the next token of the last position is the target

    def prepare_data(self) -> None:
        """Tokenize (or read the cache) and check that each split holds at least one block."""
        if self.block < 2:
            raise ValueError("call connect() with max_seq_length >= 1 first")
        ids = load_token_ids(self.train_path, self.tokenizer, self.cache_dir, self.max_tokens)
        if self.val_path is not None:
            self.train_ids = ids
            self.val_ids = load_token_ids(self.val_path, self.tokenizer, self.cache_dir)
            check_blocks(self.val_ids, self.block, self.val_path, "validation")
        else:
            n_val = max(int(len(ids) * self.val_fraction), self.block)
            self.train_ids, self.val_ids = ids[:-n_val], ids[-n_val:]
            check_blocks(self.val_ids, self.block, self.train_path, "held-out validation")
        check_blocks(self.train_ids, self.block, self.train_path, "training")

    def setup(self, stage: str = "") -> None:
        """Load the ids if ``prepare_data`` ran in another process."""
        if self.train_ids is None:
            self.prepare_data()

    def train_dataloader(self) -> DataLoader:
        """Shuffled blocks, resumable (see ``ResumableLoader``)."""
        return ResumableLoader(TokenBlocks(self.train_ids, self.block, seed=self.seed),
                               batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in a fixed order (the same batches at every evaluation)."""
        return DataLoader(TokenBlocks(self.val_ids, self.block), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers)
