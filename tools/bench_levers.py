"""`make bench` (part 1): each speed lever of the `cpu` course against fp32, measured in one run.

Every lever times the same real work on the `cpu` profile's own models and data (the LM from
notebook 01, the tiny CLIP from 02, the projector from 03, ShapesWorld conversations): a fixed
list of real stage-2 micro-batches, or tiny-CLIP steps, repeated with the variants interleaved so
that a noisy neighbour slows every variant alike. Prints ms per step and the ratio to fp32
(> 1: faster), and writes ``runs/bench/levers.json``. Missing earlier stages are trained first
(``ensure_*``, announced), so run it after ``make course`` to measure only.

Levers: bf16 autocast (with PyTorch's fused attention and with eager attention), the 4-bit base
against a full-precision base, ``torch.compile`` (compile time counted separately), LitGPT
pretraining at ``32-true`` vs ``bf16-mixed``, the padding of length-grouped vs shuffled batches,
and the share of a step spent collating batches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capstone_lib.batching import collate_padded, length_grouped_batches, shuffled_batches  # noqa: E402
from capstone_lib.precision import autocast, cpu_bf16_units  # noqa: E402
from capstone_lib.profiles import get_profile  # noqa: E402


def interleaved(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """Median seconds of each function over ``reps`` rounds, the functions taking turns each round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def stage2_batches(profile, n_batches: int) -> tuple[list[dict], Any, dict[str, Any]]:
    """Real stage-2 micro-batches (collated), the dataset, and padding / collate figures."""
    from capstone_lib.feature_cache import ensure_feature_cache
    from capstone_lib.language_model import ensure_language_model
    from capstone_lib.lm_spec import lm_spec
    from capstone_lib.stage2 import conversation_data
    from capstone_lib.tokenizer import load_tokenizer

    cache = ensure_feature_cache(profile, "train")
    tokenizer = load_tokenizer(ensure_language_model(profile), lm_spec(profile))
    s2 = profile.stage2
    data = conversation_data(profile, tokenizer, cache.feature_shape[0], s2.max_len)
    lengths = data.lengths
    seed, mbs = profile.runtime.seed, s2.micro_batch_size

    def padding(batches: list[list[int]]) -> float:
        real = sum(lengths[i] for b in batches for i in b)
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - real / padded

    grouped = length_grouped_batches(lengths, mbs, seed, 0)
    shuffled = shuffled_batches(len(lengths), mbs, seed, 0)
    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    batches = [collate_padded([data[i] for i in b], pad, cache.get_batch) for b in grouped[:n_batches]]
    collate_ms = (time.perf_counter() - t0) / len(batches) * 1e3
    return batches, data, {"padding_length_grouped": padding(grouped), "padding_shuffled": padding(shuffled),
                           "collate_ms_per_batch": collate_ms}


def stage2_variant(base_profile, precision: str, quantize: bool, attention: str | None,
                   batches: list[dict], compile_model: bool = False) -> tuple[Callable[[], None], float]:
    """A function running every batch once (forward, backward, AdamW) and its set-up/compile seconds."""
    from capstone_lib.qlora import lora_parameters
    from capstone_lib.stage2 import build_stage2_model

    profile = get_profile(base_profile.name, runtime={"precision": precision},
                          stage2={"quantize_4bit": quantize})
    t0 = time.perf_counter()
    vlm, _, _ = build_stage2_model(profile)
    if attention:
        vlm.lm.get_base_model().set_attn_implementation(attention)
    vlm.train()
    params = lora_parameters(vlm.lm) + list(vlm.projector.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    model = torch.compile(vlm, dynamic=False) if compile_model else vlm

    def run() -> None:
        for batch in batches:
            with autocast(precision, "cpu"):
                loss = model(**batch).loss
            loss.float().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    if compile_model:
        run()                                  # compiles one graph per batch shape
    return run, time.perf_counter() - t0


def bench_stage2(profile, n_batches: int, reps: int, with_compile: bool) -> dict[str, Any]:
    """Stage-2 steps on real batches: precision, attention, 4-bit base, torch.compile."""
    batches, _, data_figures = stage2_batches(profile, n_batches)
    variants = {
        "fp32 (4-bit base, fused attention)": ("fp32", True, None),
        "bf16 autocast, fused attention": ("bf16", True, "sdpa"),
        "bf16 autocast, eager attention": ("bf16", True, "eager"),
        "fp32, full-precision base": ("fp32", False, None),
        "bf16 autocast, eager, full-precision base": ("bf16", False, "eager"),
    }
    fns, setup = {}, {}
    for name, (precision, quantize, attention) in variants.items():
        fns[name], setup[name] = stage2_variant(profile, precision, quantize, attention, batches)
    if with_compile:
        # Fixed shapes give compile its best case: one graph per distinct batch width.
        name = "torch.compile + bf16, eager, full-precision base"
        fns[name], setup[name] = stage2_variant(profile, "bf16", False, "eager", batches, compile_model=True)
    seconds = interleaved(fns, reps)
    base = seconds["fp32 (4-bit base, fused attention)"]
    rows = {name: {"ms_per_step": s / len(batches) * 1e3, "speedup_vs_fp32": base / s,
                   "setup_seconds": setup[name]} for name, s in seconds.items()}
    step_ms = rows["fp32 (4-bit base, fused attention)"]["ms_per_step"]
    data_figures["collate_share_of_fp32_step"] = data_figures["collate_ms_per_batch"] / step_ms
    return {"variants": rows, "data": data_figures, "batches": len(batches),
            "tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in batches)}


def bench_clip(profile, steps: int, reps: int) -> dict[str, Any]:
    """Tiny-CLIP training steps (batch and hard negatives as in notebook 02): fp32 vs bf16 towers."""
    from transformers import CLIPModel

    from capstone_lib.coco import load_coco_captions
    from capstone_lib.shapesworld import ensure_shapesworld
    from capstone_lib.vision import load_pixel_values
    from capstone_lib.tiny_clip import fit_tiny_clip, tiny_clip_config, tiny_image_processor, train_caption_tokenizer

    v, tiny = profile.vision, profile.vision.tiny_config
    train = load_coco_captions(ensure_shapesworld(profile).coco_root, "train")[:2000]
    tok = train_caption_tokenizer([c for r in train for c in r.captions], max_length=tiny.get("text_max_len", 32))
    pixels = load_pixel_values(tiny_image_processor(tiny["image_size"]), [r.path for r in train])
    captions = [r.captions for r in train]
    model = CLIPModel(tiny_clip_config(tiny, tok))

    def variant(precision: str) -> Callable[[], None]:
        return lambda: fit_tiny_clip(model, tok, pixels, captions, steps=steps, batch_size=v.clip_batch_size,
                                     lr=v.clip_lr, hard_negatives=v.clip_hard_negatives, precision=precision)

    seconds = interleaved({"fp32": variant("fp32"), "bf16 autocast (eager attention)": variant("bf16")}, reps)
    return {name: {"ms_per_step": s / steps * 1e3, "speedup_vs_fp32": seconds["fp32"] / s}
            for name, s in seconds.items()}


def bench_pretrain(profile, tokens: int) -> dict[str, Any]:
    """LitGPT pretraining of the cpu model for ``tokens`` tokens: 32-true vs bf16-mixed (ms per iteration)."""
    from capstone_lib.pretrain import run_pretraining

    out: dict[str, Any] = {}
    old = os.environ.get("CAPSTONE_RUNS")
    for litgpt_precision in ("32-true", "bf16-mixed"):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["CAPSTONE_RUNS"] = tmp
            p = get_profile(profile.name, pretrain={"precision": litgpt_precision, "max_tokens": tokens})
            result = run_pretraining(p, resume=False)
            out[litgpt_precision] = {"seconds": result.seconds, "final_val_loss": result.final_val_loss}
    if old is None:
        os.environ.pop("CAPSTONE_RUNS", None)
    else:
        os.environ["CAPSTONE_RUNS"] = old
    base = out["32-true"]["seconds"]
    for row in out.values():
        row["speedup_vs_fp32"] = base / row["seconds"]
    return out


def format_report(res: dict[str, Any]) -> str:
    """The figures as a table."""
    lines = [f"machine: {res['machine']}", "", "stage 2 (real micro-batches of the cpu profile):"]
    for name, row in res["stage2"]["variants"].items():
        extra = f"  (set-up incl. compile {row['setup_seconds']:.0f} s)" if "compile" in name else ""
        lines.append(f"  {name:<50} {row['ms_per_step']:7.1f} ms/step  x{row['speedup_vs_fp32']:.2f}{extra}")
    d = res["stage2"]["data"]
    lines += [f"  padding: {100 * d['padding_length_grouped']:.1f}% of tokens with length-grouped batches, "
              f"{100 * d['padding_shuffled']:.1f}% shuffled",
              f"  collating a batch: {d['collate_ms_per_batch']:.2f} ms "
              f"({100 * d['collate_share_of_fp32_step']:.1f}% of an fp32 step)", "", "tiny CLIP (notebook 02):"]
    for name, row in res["clip"].items():
        lines.append(f"  {name:<50} {row['ms_per_step']:7.1f} ms/step  x{row['speedup_vs_fp32']:.2f}")
    if "pretrain" in res:
        lines += ["", "LitGPT pretraining (notebook 01):"]
        for name, row in res["pretrain"].items():
            lines.append(f"  --precision {name:<38} {row['seconds']:7.1f} s      x{row['speedup_vs_fp32']:.2f}"
                         f"  (val loss {row['final_val_loss']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Many batches: a dozen short ones overstated bf16's gain (x1.5 on 12 batches, x1.1 on 120).
    ap.add_argument("--batches", type=int, default=64, help="stage-2 micro-batches per round")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (the median is reported)")
    ap.add_argument("--clip-steps", type=int, default=20)
    ap.add_argument("--pretrain-tokens", type=int, default=150_000, help="0 skips the LitGPT lever")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile lever")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "levers.json")
    args = ap.parse_args(argv)
    profile = get_profile("cpu")
    import platform

    res: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                      f"torch {torch.__version__}, bf16 units: {cpu_bf16_units() or 'none'}",
                           "profile_precision": profile.runtime.precision}
    if not args.no_compile and os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        print("note: TORCHDYNAMO_DISABLE=1 turns torch.compile into a no-op; skipping that lever "
              "(`make bench` runs this script without it)")
        args.no_compile = True
    res["stage2"] = bench_stage2(profile, args.batches, args.reps, with_compile=not args.no_compile)
    res["clip"] = bench_clip(profile, args.clip_steps, args.reps)
    if args.pretrain_tokens:
        res["pretrain"] = bench_pretrain(profile, args.pretrain_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(format_report(res))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
