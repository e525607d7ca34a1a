"""Train from a shell, on one GPU or several: ``python -m capstone_lib.train STAGE ... --profile NAME``.

The stages run in the course's order (whatever order they are given in), each through the same library functions the notebooks
call: ``pretrain`` (LitGPT, then the conversion to transformers), ``features`` (the frozen
CLIP features of train and val), ``stage1`` (projector), ``stage2`` (QLoRA + projector),
``export`` (the standard Llava checkpoint). Checkpoints resume by default (``--resume auto``).

One process::

    python -m capstone_lib.train features stage1 stage2 export --profile a100

Stages 1-2 on 8 GPUs of one node (``accelerate launch --multi_gpu --num_processes 8 -m ...``
starts the same processes): every rank trains on its share of each step, rank 0 writes the
checkpoints, the metrics and this summary, and exports::

    torchrun --nproc_per_node 8 -m capstone_lib.train stage1 stage2 --profile a100x8

``pretrain`` is launched once, with plain ``python``, even on 8 GPUs or several nodes: LitGPT's
Lightning Fabric starts one process per device itself (``profile.pretrain.devices`` and
``num_nodes``), so it refuses to run under ``torchrun``. See ``docs/MULTI_GPU.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Iterator

from .distributed import barrier
from .profiles import PROFILE_NAMES, Profile, get_profile

STAGES = ("pretrain", "features", "stage1", "stage2", "export")
# What torchrun / accelerate launch put in the environment of each rank.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                 "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["stage1.max_steps=10", ...]`` -> ``{"stage1": {"max_steps": 10}}``; values are JSON when they parse."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. stage1.max_steps=100")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(section, {})[name] = parsed
    return out


def parse_resume(value: str) -> str | bool:
    """``auto`` (newest good checkpoint, else fresh), ``true`` (must resume) or ``false`` (start over)."""
    choices = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"--resume must be auto, true or false, got {value!r}")
    return choices[value.lower()]


@contextlib.contextmanager
def without_launcher_env() -> Iterator[None]:
    """Hide the torchrun variables, so that a subprocess (LitGPT) does not think it is one of our ranks."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _allow_hub(profile: Profile) -> None:
    """GPU profiles download Phi-2, CLIP, COCO: undo the offline default ``capstone_lib`` set on import."""
    import capstone_lib

    needs_hub = profile.name not in ("smoke", "cpu")
    if needs_hub and not capstone_lib._ONLINE and os.environ.get("CAPSTONE_ONLINE") != "0":
        for key in _OFFLINE_VARS:
            if os.environ.get(key) == "1":
                del os.environ[key]


def _agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _ensure_lm(profile: Profile) -> Any:
    """The stage-1/2 language model: rank 0 pretrains it first on cpu/smoke if it is missing."""
    from .language_model import ensure_language_model
    from .distributed import rank_zero_first

    with rank_zero_first(), without_launcher_env():
        return ensure_language_model(profile)


def _history_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """First/last loss and the last validation loss of a trainer history."""
    losses = [r["loss"] for r in history if "loss" in r]
    vals = [r["val_loss"] for r in history if "val_loss" in r]
    return {"steps": len(history), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "val_loss": vals[-1] if vals else None}


def run_pretrain(profile: Profile, resume: str | bool, world: int) -> dict[str, Any]:
    """LitGPT pretraining on ``profile.pretrain.devices`` x ``num_nodes``, then the transformers export."""
    from .pretrain import run_pretraining
    from .language_model import export_language_model

    if world > 1:
        raise SystemExit("pretrain: launch it once with plain python, not under torchrun/accelerate: "
                         "LitGPT (Lightning Fabric) starts one process per device itself "
                         f"(profile.pretrain.devices={profile.pretrain.devices}, "
                         f"num_nodes={profile.pretrain.num_nodes})")
    result = run_pretraining(profile, resume=resume is not False)
    hf = export_language_model(profile, result)
    return {"lit_dir": str(result.out_dir), "hf_dir": str(hf), "final_val_loss": result.final_val_loss,
            "devices": profile.pretrain.devices, "num_nodes": profile.pretrain.num_nodes,
            "seconds": round(result.seconds, 1)}


def run_features(profile: Profile) -> dict[str, Any]:
    """The train and val feature caches (sharded over the ranks under torchrun)."""
    from .feature_cache import ensure_feature_cache

    out = {}
    for split in ("train", "val"):
        cache = ensure_feature_cache(profile, split)
        out[split] = {"images": len(cache), "shape": list(cache.feature_shape), "dir": str(cache.cache_dir)}
    return out


def run_stage1(profile: Profile, resume: str | bool) -> dict[str, Any]:
    """``train_stage1`` after making sure the language model exists."""
    from .stage1 import train_stage1

    _ensure_lm(profile)
    res = train_stage1(profile, resume=resume)
    return {**_history_summary(res["history"]), "out_dir": str(res["out_dir"])}


def run_stage2(profile: Profile, resume: str | bool) -> dict[str, Any]:
    """``train_stage2``; trains stage 1 first (all ranks together) if its projector is missing."""
    from .stage1 import projector_dir, train_stage1
    from .stage2 import train_stage2

    _ensure_lm(profile)
    if not _agree((projector_dir(profile) / "projector.json").is_file()):
        print("stage2: no stage-1 projector yet, training stage 1 first")
        train_stage1(profile)
    res = train_stage2(profile, resume=resume)
    return {**_history_summary(res["history"]), "out_dir": str(res["out_dir"]),
            "samples": res["samples"], "truncated": res["truncated"]}


def run_export(profile: Profile, rank: int) -> dict[str, Any]:
    """The Llava checkpoint (rank 0 writes it); trains stage 2 first, on all ranks, if needed."""
    from .export import assistant_dir
    from .stage2 import ensure_assistant, stage2_dir

    if not _agree((stage2_dir(profile) / "adapter" / "adapter_config.json").is_file()):
        run_stage2(profile, "auto")
    out = ensure_assistant(profile) if rank == 0 else assistant_dir(profile)
    barrier()
    return {"assistant_dir": str(out)}


def build_parser() -> argparse.ArgumentParser:
    """The command line (``python -m capstone_lib.train --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m capstone_lib.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run course stages from a shell, on one process or under torchrun.",
        epilog="examples:\n"
               "  python -m capstone_lib.train features stage1 stage2 export --profile a100\n"
               "  torchrun --nproc_per_node 8 -m capstone_lib.train stage1 stage2 --profile a100x8\n"
               "  python -m capstone_lib.train pretrain --profile a100x8\n\n"
               "pretrain is launched ONCE with plain python, also on several GPUs or nodes: LitGPT's\n"
               "Lightning Fabric starts one process per device (profile.pretrain.devices, num_nodes).\n"
               "features/stage1/stage2/export run unchanged under torchrun or accelerate launch:\n"
               "the feature cache is built in shards by all ranks, rank 0 writes checkpoints,\n"
               "prints the summary and exports. See docs/MULTI_GPU.md.")
    parser.add_argument("stages", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"one or more of {', '.join(STAGES)} (run in this order)")
    parser.add_argument("--profile", default=None,
                        help=f"one of {', '.join(PROFILE_NAMES)}, auto (default: $CAPSTONE_PROFILE or auto)")
    parser.add_argument("--resume", type=parse_resume, default="auto",
                        help="auto (default): newest good checkpoint, else fresh; true: must resume; "
                             "false: start over (old checkpoints removed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one profile setting, e.g. --set stage1.max_steps=100 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the requested stages; under torchrun only rank 0 prints the summary."""
    args = build_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    base = get_profile(args.profile).raw
    for section, keys in overrides.items():
        if section not in base:
            raise SystemExit(f"--set {section}.*: the profile has no section {section!r} "
                             f"(sections: {', '.join(base)})")
        for key in keys:
            if key not in base[section]:
                print(f"warning: --set {section}.{key}: not a key of the profile's {section!r} section "
                      f"(a typo?); passed on anyway", file=sys.stderr)
    profile = get_profile(args.profile, **overrides)
    _allow_hub(profile)
    from .distributed import cleanup_distributed, dist_env, init_distributed

    if "pretrain" in args.stages and dist_env()[1] > 1:     # before joining a group that would wait
        run_pretrain(profile, args.resume, dist_env()[1])
    rank, world = init_distributed(profile.runtime.device)
    summary: dict[str, Any] = {"profile": profile.name, "world_size": world, "stages": {}}
    try:
        for stage in [s for s in STAGES if s in args.stages]:
            t0 = time.perf_counter()
            if stage == "pretrain":
                out = run_pretrain(profile, args.resume, world)
            elif stage == "features":
                out = run_features(profile)
            elif stage == "stage1":
                out = run_stage1(profile, args.resume)
            elif stage == "stage2":
                out = run_stage2(profile, args.resume)
            else:
                out = run_export(profile, rank)
            summary["stages"][stage] = {**out, "wall_seconds": round(time.perf_counter() - t0, 1)}
            if rank == 0:
                print(f"[{stage}] " + json.dumps(summary["stages"][stage]), flush=True)
    finally:
        cleanup_distributed()
    if rank == 0:
        print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
