"""The one trainer for stage 1 (projector) and stage 2 (QLoRA): exact resume, rank-aware.

``Trainer(model, param_groups, train_data, collate, cfg, out_dir).fit(resume="auto")`` runs
AdamW with a cosine schedule after a linear warmup (``transformers.get_cosine_schedule_with_warmup``),
gradient accumulation, gradient clipping and mixed precision (``bf16`` autocast, ``fp16``
autocast + ``torch.amp.GradScaler``, or plain ``fp32``). Only parameters that require grad
enter the optimizer, and only they (or the tensors ``state_filter`` names) are checkpointed.

Exact resume: a checkpoint holds the trainable tensors, optimizer, scheduler, scaler, the RNG
states of every rank (python, numpy, torch, cuda) and the data position (epoch, micro-batch
index). Batches come from ``batches_for_epoch(epoch)``, a deterministic function of the seed
and the epoch, so a resumed run replays exactly the batches an uninterrupted one would see:
on CPU its final weights are bit-for-bit equal (``tests/test_faults.py`` kills runs to check).

Several processes (``torchrun`` / ``accelerate launch``, which both set ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``): the process group is initialised (gloo on CPU, nccl on CUDA), each
optimizer step's ``world_size x grad_accum`` micro-batches are dealt round-robin to the ranks,
and the gradients of the trainable parameters are summed with one all-reduce per step. We do
this instead of wrapping the model in DDP or ``accelerate.Accelerator`` because (1) DDP
broadcasts and hooks every parameter, including the frozen 4-bit base, and fights gradient
checkpointing and unused parameters, while the trainable part here (projector, LoRA) is
small enough that one all-reduce per optimizer step costs little; (2) an uneven last step
(fewer micro-batches than ranks) just contributes zero gradients; (3) checkpoints keep our
atomic format with the data position, so they load on any world size. Rank 0 writes
checkpoints, ``metrics.jsonl`` and the progress bar, and runs validation; others wait.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, check_writable, checkpoint_step, clean_partial, copy_into_model,
                         fault_point, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
                         verify_checkpoint)
from .distributed import barrier, dist_env, init_distributed, resolve_device
from .history import METRICS_FILE
from .precision import PRECISIONS, autocast
from .validation import DataError


@dataclass
class TrainConfig:
    """Training settings (each stage builds one from its profile section)."""

    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_steps: int | None = None     # optimizer steps; wins over epochs when set
    epochs: int = 1
    micro_batch_size: int = 8
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    precision: str = "fp32"          # fp32 | bf16 | fp16 (fp16 uses torch.amp.GradScaler)
    eval_every: int | None = None
    save_every: int | None = None
    save_every_minutes: float | None = None   # also checkpoint when this much time passed since the last one
    keep_last: int = 2
    seed: int = 1234
    log_every: int = 10
    device: str = "cpu"
    num_workers: int = 0             # DataLoader workers that collate batches

    @classmethod
    def from_stage(cls, stage: dict[str, Any], runtime: Any) -> "TrainConfig":
        """A stage section's training settings (``vars(profile.stage1)`` + overrides) and the runtime's."""
        from dataclasses import fields

        own = {f.name for f in fields(cls)} & set(stage)
        return cls(**{k: stage[k] for k in own}, precision=runtime.precision, keep_last=runtime.keep_checkpoints,
                   seed=runtime.seed, device=runtime.device, num_workers=runtime.num_workers)


@dataclass
class TrainResult:
    """What ``fit`` returns: per-step history, the last step, and where checkpoints are."""

    history: list[dict[str, Any]]
    step: int
    total_steps: int
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    out_dir: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------
def default_batches(n: int, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A shuffle seeded by ``seed + epoch`` (``torch.Generator``), cut into micro-batches (last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i:i + micro_batch_size] for i in range(0, n, micro_batch_size)]


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON: tensors/numpy scalars to numbers, other objects to str."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and np.size(value) == 1:
        return float(value.item() if hasattr(value, "item") else value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _rng_state() -> dict[str, Any]:
    """All RNG states of this process (python, numpy, torch, cuda), torch.load(weights_only)-safe."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``_rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_4bit_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during validation; returns how many.

    On an AVX512-BF16 CPU, ``Linear4bit.forward`` in eval mode under ``no_grad`` converts its
    weight to an inference-only packed layout for good; the next training forward then fails
    ("a view of a leaf Variable that requires grad is being used in an in-place operation").
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Indexed(torch.utils.data.Dataset):
    """Dataset view returning ``(index, sample)`` so that errors can name the records."""

    def __init__(self, data: Sequence):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]


class _Collate:
    """Picklable wrapper: ``(indices, collate(samples))``."""

    def __init__(self, collate: Callable[[list], dict]):
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], dict]:
        return [i for i, _ in items], self.collate([s for _, s in items])


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------
class Trainer:
    """AdamW + cosine/warmup + accumulation + clipping + AMP, atomic checkpoints, exact resume."""

    def __init__(self, model: nn.Module, param_groups: list[dict], train_data: Sequence,
                 collate: Callable[[list], dict], cfg: TrainConfig, out_dir: str | Path,
                 eval_fn: Callable[[nn.Module, int], dict] | None = None,
                 batches_for_epoch: Callable[[int], list[list[int]]] | None = None,
                 state_filter: Callable[[str], bool] | None = None):
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
        if cfg.grad_accum < 1 or cfg.micro_batch_size < 1:
            raise ValueError(f"grad_accum and micro_batch_size must be >= 1 (got {cfg.grad_accum}, "
                             f"{cfg.micro_batch_size})")
        if len(train_data) == 0:
            raise DataError("the training set is empty")
        self.model, self.data, self.collate, self.cfg = model, train_data, collate, cfg
        keep_4bit_trainable(model)      # validation must not leave 4-bit layers inference-only
        self.out_dir, self.eval_fn = Path(out_dir), eval_fn
        self.batches_for_epoch = batches_for_epoch or (
            lambda epoch: default_batches(len(train_data), cfg.micro_batch_size, cfg.seed, epoch))
        self.rank, self.world, _ = dist_env()
        self.device = resolve_device(cfg.device)
        self._init_distributed()
        if self.device.type == "cuda" and cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16' but this GPU has no bf16 (e.g. a T4): use the 'fp16' profile")

        names = {id(p): n for n, p in model.named_parameters()}
        groups, dropped, seen = [], 0, set()
        for gi, group in enumerate(param_groups):
            params = list(group["params"])
            for p in params:
                if id(p) not in names:
                    raise ValueError(f"param_groups[{gi}] holds a tensor that is not a parameter of the model")
            keep = [p for p in params if p.requires_grad]
            dropped += len(params) - len(keep)
            seen.update(id(p) for p in keep)
            if keep:
                groups.append({**group, "params": keep})
        if dropped:
            self._print(f"note: {dropped} frozen parameter tensor(s) in param_groups left out of the optimizer")
        if not groups:
            raise ValueError("no trainable parameters: every parameter in param_groups has requires_grad=False")
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        if orphans:
            raise ValueError(f"{len(orphans)} parameter(s) require grad but are in no param group, so they "
                             f"would never be trained nor saved (e.g. {orphans[:3]}); freeze them or add them")
        self.params = [p for g in groups for p in g["params"]]
        self.group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        trainable = {n for g in self.group_names for n in g}
        if state_filter is None:
            self.save_names = sorted(trainable)
        else:
            tensors = dict(model.named_parameters())
            tensors.update(dict(model.named_buffers()))
            self.save_names = sorted(n for n in tensors if state_filter(n))
            missing = sorted(trainable - set(self.save_names))
            if missing:
                raise ValueError(f"state_filter leaves out trainable parameters {missing[:3]}: "
                                 f"resume would lose them")
        wrong = [n for n, p in model.named_parameters() if n in trainable and p.device.type != self.device.type]
        if wrong:
            raise ValueError(f"trainable parameters are not on {self.device} (e.g. {wrong[0]}); "
                             f"move the model to cfg.device before building the Trainer")

        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.group_labels = [str(g.get("name", i)) for i, g in enumerate(groups)]
        self.total_steps = self._count_steps()
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        from transformers import get_cosine_schedule_with_warmup
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, self.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.history: list[dict[str, Any]] = []
        self.step, self.epoch, self.batch_index = 0, 0, 0
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self._trained_in_memory = False

    # -------------------------------------------------------------------------- setup
    def _init_distributed(self) -> None:
        if self.world > 1:
            init_distributed(self.device)

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(msg)

    def _barrier(self) -> None:
        barrier()

    def _group_size(self) -> int:
        """Micro-batches per optimizer step, over all ranks."""
        return self.world * self.cfg.grad_accum

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = [list(map(int, b)) for b in self.batches_for_epoch(epoch)]
            n = len(self.data)
            if not batches:
                raise DataError(f"batches_for_epoch({epoch}) returned no batches")
            for bi, b in enumerate(batches):
                if not b or min(b) < 0 or max(b) >= n:
                    raise DataError(f"batches_for_epoch({epoch}) batch {bi} is empty or has an index "
                                    f"outside 0..{n - 1}: {b[:8]}")
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def _count_steps(self) -> int:
        if self.cfg.max_steps is not None:
            if self.cfg.max_steps < 1:
                raise ValueError(f"max_steps must be >= 1, got {self.cfg.max_steps}")
            return int(self.cfg.max_steps)
        g = self._group_size()
        return sum(math.ceil(len(self.batches_for_epoch(e)) / g) for e in range(self.cfg.epochs))

    def _checkpoint_bytes(self) -> int:
        """Rough size of one checkpoint: saved tensors + two fp32 Adam moments per trainable value."""
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        tensors = sum(own[n].numel() * own[n].element_size() for n in self.save_names)
        moments = sum(p.numel() * 4 * 2 for p in self.params)
        return int(1.2 * (tensors + moments)) + (1 << 20)

    def _save_due(self, last_save_time: float) -> bool:
        """True when ``save_every_minutes`` have passed since the last checkpoint (the same on every rank)."""
        minutes = self.cfg.save_every_minutes
        if not minutes:
            return False
        due = torch.tensor(float(time.perf_counter() - last_save_time >= 60 * minutes), device=self.device)
        if self.world > 1:          # rank 0's clock decides for all: every rank must enter save()
            dist.broadcast(due, src=0)
        return bool(due.item())

    def _autocast(self):
        return autocast(self.cfg.precision, self.device.type)

    # -------------------------------------------------------------------------- state
    def _tensors_to_save(self) -> dict[str, torch.Tensor]:
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        return {n: own[n] for n in self.save_names}

    def save(self) -> Path:
        """Write a checkpoint of the current step (collective under torchrun; rank 0 writes)."""
        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        path = self.out_dir / f"step-{self.step:06d}"
        if self.rank == 0:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rngs}
            meta = {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                    "total_steps": self.total_steps, "world_size": self.world,
                    "groups": self.group_names, "tensors": self.save_names,
                    "config": asdict(self.cfg), "history": self.history,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            path = save_checkpoint(self.out_dir, self.step, self._tensors_to_save(), state, meta,
                                   keep_last=self.cfg.keep_last)
        self._barrier()
        return path

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, verify=False)   # rank 0 verified it when choosing it
        meta = ckpt.meta
        if meta.get("tensors") != self.save_names or meta.get("groups") != self.group_names:
            raise CheckpointError(f"{path}: it holds different trainable tensors or param groups than this "
                                  f"model (was the model or state_filter changed?); start fresh with resume=False")
        bad = [name for name, t in ckpt.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"{path}: the saved weights are not finite (NaN/inf in {len(bad)} tensor(s), e.g. "
                                  f"{bad[:3]}): training had diverged before this checkpoint was written; resume "
                                  "from an earlier one (resume=<its path>) or start over (resume=False)")
        copy_into_model(self.model, ckpt.tensors, where=str(path))
        try:
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
            self.scheduler.load_state_dict(ckpt.state["scheduler"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: optimizer/scheduler state does not fit ({err})") from err
        if self.scaler and ckpt.state.get("scaler"):
            self.scaler.load_state_dict(ckpt.state["scaler"])
        rngs = ckpt.state["rng"]
        if self.rank < len(rngs):
            _set_rng_state(rngs[self.rank])
        else:   # more ranks than when saved: a fresh, distinct stream per extra rank
            _seed_all(self.cfg.seed + self.rank + 1000 * ckpt.step)
        self.step, self.epoch, self.batch_index = ckpt.step, meta["epoch"], meta["batch_index"]
        self.history = meta["history"]
        if meta["total_steps"] != self.total_steps:
            self._print(f"warning: {path.name} was made for {meta['total_steps']} steps, this run has "
                        f"{self.total_steps}: the schedule follows {self.total_steps}")
        if meta["world_size"] * meta["config"]["grad_accum"] != self._group_size():
            self._print(f"note: effective batch changes from {meta['world_size']} ranks x "
                        f"{meta['config']['grad_accum']} accum to {self.world} x {self.cfg.grad_accum}")

    def _choose_checkpoint(self, resume: str | bool) -> Path | None:
        """Rank 0 decides where to resume from (or that there is nothing); the others follow."""
        choice: list[Any] = [None]
        if self.rank == 0:
            clean_partial(self.out_dir, log=self._print)
            if resume is False or resume in ("never", "no"):
                old = list_checkpoints(self.out_dir)
                if old:
                    self._print(f"resume=False: removing {len(old)} old checkpoint(s) in {self.out_dir}")
                    for p in old:
                        shutil.rmtree(p)
            elif resume in (True, "auto"):
                path = latest_checkpoint(self.out_dir, log=self._print, quarantine=True)
                if path is None and resume is True:
                    raise CheckpointError(f"resume=True but no loadable checkpoint in {self.out_dir}")
                choice[0] = None if path is None else str(path)
            else:
                path = Path(str(resume))
                checkpoint_step(path)
                verify_checkpoint(path)
                choice[0] = str(path)
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        return None if choice[0] is None else Path(choice[0])

    def _write_metrics(self, records: list[dict], append: bool) -> None:
        if self.rank != 0:
            return
        path = self.out_dir / METRICS_FILE
        if append:
            with open(path, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        else:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, path)

    # -------------------------------------------------------------------------- the loop
    def _loader(self, epoch: int, start: int):
        """This rank's micro-batches for ``epoch`` from global micro-batch ``start`` on, with counts per step."""
        batches, g = self._epoch_batches(epoch), self._group_size()
        mine, per_step = [], []
        for s in range(start, len(batches), g):
            group = batches[s:s + g]
            local = group[self.rank::self.world]
            mine += local
            per_step.append((len(group), len(local)))
        loader = torch.utils.data.DataLoader(
            _Indexed(self.data), batch_sampler=mine, collate_fn=_Collate(self.collate),
            num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
            # its own generator: a DataLoader iterator otherwise draws its base seed from the global
            # torch RNG, a draw a resumed run would make at a different moment (no exact resume)
            generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        return iter(loader), per_step

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _micro_step(self, indices: list[int], batch: dict, n_in_step: int) -> torch.Tensor:
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and not bool((labels != -100).any()):
            raise DataError(f"micro-batch at epoch {self.epoch}, step {self.step + 1} has no supervised "
                            f"label (every label is -100): the loss would be NaN; check the masking or "
                            f"truncation of these samples", record=indices[:16])
        with self._autocast():
            out = self.model(**self._to_device(batch))
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ValueError("model(**batch) returned no .loss: the batch must contain labels")
        scaled = loss.float() / n_in_step
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach().float()

    def _sync_grads(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Sum gradients and losses over ranks (one flat all-reduce per dtype)."""
        if self.world <= 1:
            return loss_sum
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        dist.all_reduce(loss_sum)
        return loss_sum

    def _optimizer_step(self, loss_mean: float) -> dict[str, Any]:
        if not math.isfinite(loss_mean):
            bad = [n for n, t in self._tensors_to_save().items() if not torch.isfinite(t).all()]
            if bad:
                raise FloatingPointError(f"loss is {loss_mean} at step {self.step + 1}: the trainable weights "
                                         f"themselves are not finite (NaN/inf in {bad[:3]}), so every loss is; "
                                         "restart from a checkpoint saved before that (or resume=False)")
            raise FloatingPointError(f"loss is {loss_mean} at step {self.step + 1} (epoch {self.epoch}): "
                                     f"lower the learning rate or check the data / precision")
        record: dict[str, Any] = {"step": self.step + 1, "epoch": self.epoch, "loss": loss_mean}
        for i, (label, group) in enumerate(zip(self.group_labels, self.optimizer.param_groups)):
            record["lr" if i == 0 else f"lr_{label}"] = group["lr"]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        if self.scaler:
            record["loss_scale"] = float(self.scaler.get_scale())
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return record

    def _evaluate(self) -> dict[str, Any]:
        metrics: list[Any] = [None]
        if self.rank == 0:
            fault_point("eval")
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), self._autocast():
                    metrics[0] = _jsonable(dict(self.eval_fn(self.model, self.step) or {}))
            finally:
                self.model.train(was_training)
        if self.world > 1:
            dist.broadcast_object_list(metrics, src=0)
        return metrics[0]

    def fit(self, resume: str | bool = "auto", stop_at_step: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (or ``stop_at_step``), resuming from ``out_dir`` per ``resume``.

        ``resume``: ``"auto"`` = newest good checkpoint if any (a corrupt one is skipped with a
        message), ``True`` = must find one, ``False`` = start over (old checkpoints removed),
        or a checkpoint directory path.
        """
        t0 = time.perf_counter()
        if self.rank == 0:
            check_writable(self.out_dir, self._checkpoint_bytes())
        self._barrier()
        path = self._choose_checkpoint(resume)
        if path is not None:
            self._restore(path)
            self._print(f"resumed from {path} (step {self.step}/{self.total_steps})")
        else:
            if self._trained_in_memory:
                raise RuntimeError(f"this Trainer already trained its model in memory and {self.out_dir} has no "
                                   f"checkpoint to resume from: build a new model and Trainer to start over")
            _seed_all(self.cfg.seed + self.rank)
            self.step, self.epoch, self.batch_index, self.history = 0, 0, 0, []
            if self.world > 1:   # every rank starts from rank 0's trainable weights
                for t in self._tensors_to_save().values():
                    dist.broadcast(t.data, src=0)
        self._write_metrics(self.history, append=False)
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        last_saved, last_save_time = path, time.perf_counter()
        if self.step >= end:
            self._print(f"already trained to step {self.step}; nothing to do")
            return TrainResult(self.history, self.step, self.total_steps, path, path, self.out_dir)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._trained_in_memory = True
        bar = tqdm(total=end, initial=self.step, desc="train", unit="step", disable=self.rank != 0,
                   dynamic_ncols=True)
        try:
            while self.step < end:
                if self.batch_index >= len(self._epoch_batches(self.epoch)):
                    self.epoch, self.batch_index = self.epoch + 1, 0
                it, per_step = self._loader(self.epoch, self.batch_index)
                for n_in_step, n_local in per_step:
                    if self.step >= end:
                        break
                    loss_sum = torch.zeros((), device=self.device)
                    for _ in range(n_local):
                        indices, batch = next(it)
                        loss_sum += self._micro_step(indices, batch, n_in_step)
                        fault_point("step")
                    loss_mean = float(self._sync_grads(loss_sum)) / n_in_step
                    record = self._optimizer_step(loss_mean)
                    self.step += 1
                    self.batch_index += n_in_step
                    if self.eval_fn and self.cfg.eval_every and (
                            self.step % self.cfg.eval_every == 0 or self.step == self.total_steps):
                        record.update(self._evaluate())
                    self.history.append(record)
                    if (self.cfg.save_every and self.step % self.cfg.save_every == 0) or self.step == end \
                            or self._save_due(last_save_time):
                        last_saved = self.save()
                        last_save_time = time.perf_counter()
                    self._write_metrics([record], append=True)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}")
                    if self.cfg.log_every and (self.step % self.cfg.log_every == 0 or self.step == end):
                        self._print(f"step {self.step}/{self.total_steps}  loss {loss_mean:.4f}  "
                                    f"lr {record['lr']:.2e}" + "".join(
                                        f"  {k} {v:.4f}" for k, v in record.items()
                                        if isinstance(v, float) and k not in ("loss", "lr", "grad_norm")
                                        and not k.startswith("lr_") and k != "loss_scale"))
        finally:
            bar.close()
        return TrainResult(self.history, self.step, self.total_steps, last_saved, path, self.out_dir,
                           time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# Loss curves
# ----------------------------------------------------------------------------------------
