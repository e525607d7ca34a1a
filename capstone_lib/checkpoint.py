"""Atomic, verifiable training checkpoints: ``step-000123/`` directories with a manifest.

A checkpoint is written into ``step-000123.tmp/``; every file is flushed and fsynced, then
``manifest.json`` (file names, sizes, sha256) is written LAST, and only then is the directory
renamed to ``step-000123/``. A process killed at any moment therefore leaves either a complete
checkpoint or a ``.tmp`` directory that is never read. Loading re-checks the manifest, and a
corrupt or partial checkpoint (truncated file, flipped byte, missing manifest) is skipped with
a printed message in favour of the previous good one. Only the newest ``keep_last`` are kept.

Files inside a checkpoint::

    model.safetensors   trainable tensors only (never a frozen base model)
    state.pt            optimizer, scheduler, grad scaler and RNG states (torch.load weights_only)
    meta.json           step, data position, history, config (human-readable)
    manifest.json       {"files": {name: {"size", "sha256"}}, "step"}, written last
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .validation import file_in

MODEL_FILE, STATE_FILE, META_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "meta.json", "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or does not verify; the message names the path."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: trainable tensors, torch state (optimizer ...), JSON meta."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


# ----------------------------------------------------------------------------------------
# Fault injection (used by tests/test_faults.py; a no-op unless the variables are set)
# ----------------------------------------------------------------------------------------
_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: ``CAPSTONE_FAULT_KILL=name:n`` SIGKILLs this process at the n-th hit of ``name``.

    ``CAPSTONE_FAULT_SLEEP=seconds`` sleeps at every point, so that kills sent at random
    moments land inside steps, validations and checkpoint writes more often.
    """
    kill, sleep = os.environ.get("CAPSTONE_FAULT_KILL"), os.environ.get("CAPSTONE_FAULT_SLEEP")
    if not kill and not sleep:
        return
    if sleep:
        time.sleep(float(sleep))
    if kill:
        target, _, nth = kill.partition(":")
        if target == name:
            _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
            if _FAULT_HITS[name] >= int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """``step-000123`` for step 123."""
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Completed checkpoint directories under ``root`` (``.tmp`` and others excluded), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The step number encoded in a checkpoint directory name."""
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected step-NNNNNN)")
    return int(m.group(1))


def stage_checkpoint_dir(profile: Any, stage: str, default: str | Path | None = None) -> Path:
    """Where a stage's checkpoints go: ``<drive_dir>/<profile>/<stage>/checkpoints`` when
    ``profile.runtime.drive_dir`` is set (Google Drive on Colab), else ``<default or
    run_dir/stage>/checkpoints``."""
    drive = getattr(profile.runtime, "drive_dir", None)
    base = Path(drive) / profile.name / stage if drive else Path(default or profile.run_dir / stage)
    return base / "checkpoints"


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:          # some filesystems (Drive FUSE, Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _remove_dir(path: Path) -> None:
    """Rename ``path`` aside (atomic: it stops being a checkpoint at once), then delete it."""
    trash = path.with_name(f"{path.name}.del-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int | None = 2) -> Path:
    """Write ``root/step-NNNNNN`` atomically (tmp dir, fsync, manifest last, rename); prune to ``keep_last``.

    On an ``OSError`` (disk full, read-only, quota) the partial ``.tmp`` directory is removed,
    earlier checkpoints are left untouched and a ``CheckpointError`` names the failing path.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp"
    current = tmp
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        fault_point("ckpt_begin")
        current = tmp / MODEL_FILE
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(current),
                  metadata={"step": str(step)})
        _fsync_file(current)
        fault_point("ckpt_files")
        current = tmp / STATE_FILE
        with open(current, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        current = tmp / META_FILE
        with open(current, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fault_point("ckpt_manifest")
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                 for name in (MODEL_FILE, STATE_FILE, META_FILE)}
        current = tmp / MANIFEST_FILE
        with open(current, "w") as f:
            json.dump({"step": step, "files": files, "format": 1}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        fault_point("ckpt_rename")
        current = final
        if final.exists():                 # a stale or corrupt checkpoint of the same step
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else (
            "not writable" if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else err.strerror)
        raise CheckpointError(
            f"could not write checkpoint step {step} at {current} ({reason}: {err}); "
            f"the partial checkpoint was removed and earlier checkpoints in {root} are intact") from err
    fault_point("ckpt_prune")
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            _remove_dir(old)
    return final


def clean_partial(root: str | Path, log: Callable[[str], None] = print) -> int:
    """Delete leftovers of interrupted writes (``*.tmp`` and ``*.del-*`` dirs); returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.is_dir() and (p.name.endswith(".tmp") or ".del-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log(f"removed {len(stale)} partial checkpoint dir(s) left by an interrupted run in {root}")
    return len(stale)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``manifest.json`` against the files (presence, size, sha256); return it or raise CheckpointError."""
    path = Path(path)
    mpath = path / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} (partial checkpoint)") from None
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{mpath}: unreadable manifest ({type(err).__name__}: {err})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{mpath}: 'files' must be an object, got {type(files).__name__}")
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        if name not in files:
            raise CheckpointError(f"{mpath}: {name} is not listed")
    for name, info in files.items():
        f, problem = file_in(path, name)
        if f is None or name not in (MODEL_FILE, STATE_FILE, META_FILE):
            raise CheckpointError(f"{mpath}: lists {name!r}, which is not a file of a checkpoint ({problem or 'unknown name'})")
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{mpath}: the entry of {name!r} needs an integer 'size' and a 'sha256'")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{f}: size {size} bytes, manifest says {info['size']} (truncated?)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (corrupt)")
    return manifest


def latest_checkpoint(root: str | Path, log: Callable[[str], None] = print,
                      quarantine: bool = False) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None; each bad one is reported via ``log``.

    With ``quarantine=True`` a bad checkpoint is renamed ``step-NNNNNN.corrupt`` (kept for
    inspection, never read again) so later saves and pruning do not count it.
    """
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            msg = f"checkpoint {path.name} is corrupt or partial and is skipped: {err}"
            if quarantine:
                bad = path.with_name(f"{path.name}.corrupt")
                if bad.exists():
                    shutil.rmtree(bad, ignore_errors=True)
                os.replace(path, bad)
                msg += f" (moved to {bad.name})"
            log(msg + "; trying the previous one")
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Load a checkpoint directory (verified against its manifest unless ``verify=False``)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        tensors = load_file(str(path / MODEL_FILE), device=str(map_location))
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
        meta = json.loads((path / META_FILE).read_text())
    except Exception as err:   # noqa: BLE001 - any parse failure is a bad checkpoint
        raise CheckpointError(f"{path}: could not be loaded ({type(err).__name__}: {err})") from err
    return Checkpoint(path=path, step=int(meta["step"]), tensors=tensors, state=state, meta=meta)


def load_trainable(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy a checkpoint's tensors into ``model`` (by name); returns the names loaded."""
    ckpt = load_checkpoint(path)
    copy_into_model(model, ckpt.tensors, where=str(ckpt.path))
    return sorted(ckpt.tensors)


def copy_into_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy tensors into the model's parameters/buffers of the same names, checking shapes."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"{where}: tensors not in the model (different model?): {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            target = own[name]
            if target.shape != value.shape:
                raise CheckpointError(f"{where}: {name} has shape {tuple(value.shape)}, "
                                      f"the model has {tuple(target.shape)}")
            target.copy_(value.to(device=target.device, dtype=target.dtype))


# ----------------------------------------------------------------------------------------
# Before training: can we write there at all?
# ----------------------------------------------------------------------------------------
def check_writable(root: str | Path, need_bytes: int = 0) -> None:
    """Raise CheckpointError now if ``root`` cannot be created/written or has < ``need_bytes`` free."""
    root = Path(root)
    probe = root / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise CheckpointError(
            f"checkpoint directory {root} is not writable ({err.strerror or err}); choose another "
            f"output directory (or profile.runtime.drive_dir) before training") from err
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = shutil.disk_usage(root).free
    if need_bytes and free < need_bytes:
        raise CheckpointError(
            f"not enough free space in {root}: a checkpoint needs about {need_bytes / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free; free some space or choose another output directory")
