"""The performance benchmark: ``make bench`` / ``python -m capstone_lib.bench``.

It measures, on whatever device is present, the three hot loops of the course and writes
``runs/bench/bench.json``. Each figure is measured in the same run as its reference: every
timed training step is followed by a peak-matmul probe, ``mfu`` is the median of the
per-repetition ratios, and ``cache_speedup``/``kv_speedup`` compare runs of the same process,
so ratios hold on a noisy shared machine. Warm-up steps are excluded; every figure is the
median of several timed repetitions.

* ``peak_flops``  FLOP/s of a large square matmul in the dtype the stages compute in
  (fp32 on CPU, bf16 on an A100/H100, fp16 on a T4): 1024 on CPU, 8192 on GPU.
* ``stage1``  the projector training step (``Trainer``'s micro-step + optimizer step) on
  features read from a real on-disk ``FeatureCache``; ``cache_speedup`` = its throughput
  divided by the same step with the CLIP vision tower run in the loop on pixel values.
* ``stage2``  the QLoRA step (4-bit NF4 base via ``qlora.load_base_lm`` + LoRA via
  ``qlora.add_lora`` + trainable projector), gradient checkpointing on and off, with peak
  memory (``torch.cuda.max_memory_allocated`` on GPU; on CPU the process' peak resident
  set ``VmHWM``, reset with ``/proc/self/clear_refs`` before the step).
* ``generate``  ``generate.stream_generate`` at 128 new tokens: time to first token,
  tokens/s, and ``kv_speedup`` = tokens/s with the KV cache / tokens/s recomputing the
  whole prefix at every step (both include the same prefill).
* ``course_seconds``  the stages of the last ``runs/cpu/report.json``, if there is one.

Model shapes: on a GPU the real Phi-2 and CLIP ViT-B/32 configurations with random weights
(throughput and memory do not depend on the weights, so nothing is downloaded); on a CPU a
scaled-down Phi (``PhiForCausalLM``) and CLIP vision shape, printed with the results, plus
``cache_speedup`` with the full ViT-B/32 vision shape; ``--shape tiny`` for the test.

Model FLOPs (what ``mfu`` counts; recomputation by gradient checkpointing is NOT counted,
so ``mfu`` is the same formula with checkpointing on and off). Every ``nn.Linear``
(including bitsandbytes' 4-bit ``Linear4bit`` and the LoRA A/B matrices) is counted with a
forward hook on a real batch, so a projector that sees only image positions is counted on
those only. For a ``k x n`` weight applied to ``t`` token rows:

    forward                                    2 k n t
    backward, input gradient (if it needs one)  2 k n t   frozen LM layers still need it:
                                                         the gradient flows down to the
                                                         projector under them
    backward, weight gradient (if trainable)    2 k n t   frozen weights (the LM, CLIP, the
                                                         4-bit base) have none

so a frozen LM layer costs 4 k n t, a trainable layer 6 k n t, and the projector's first
layer (its input, the cached features, needs no gradient) 4 k n t. Attention scores and
weighted sums add ``4 T^2 d`` per layer per sequence forward (the full ``T x T`` square, as
in PaLM's MFU; causal masking not subtracted) and twice that backward. A vision tower run in
the loop costs forward only. Embedding lookups, norms, activations, softmax, the loss and
the optimizer are not counted: they are the overhead MFU exposes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .profiles import REPO_ROOT

PHI2 = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, partial_rotary_factor=0.4, vocab_size=51200, hidden_act="gelu_new",
            resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, max_position_embeddings=2048,
            layer_norm_eps=1e-5, tie_word_embeddings=False)          # microsoft/phi-2 config.json
VIT_B32 = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
               num_hidden_layers=12, num_attention_heads=12)          # openai/clip-vit-base-patch32
PHI_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
T4_BUDGET_GIB = 14.5     # a "16 GB" T4 shows 15.0 GiB to PyTorch; keep room for the CUDA context
GOALS = {"stage1_mfu_cpu": 0.40, "stage1_mfu_gpu": 0.45, "cache_speedup": 3.0, "kv_speedup": 5.0}


@dataclass(frozen=True)
class BenchShape:
    """Model shapes and batch sizes of one benchmark scale."""

    name: str
    lm: dict                  # PhiConfig keyword arguments
    vision: dict              # CLIPVisionConfig keyword arguments
    stage1_batch: int         # samples per stage-1 micro-batch
    stage1_text: int          # text tokens per stage-1 sample (prompt + caption) next to the patches
    stage2_batch: int
    stage2_len: int           # tokens per stage-2 sample (patches included)
    lora_r: int
    lora_alpha: int
    gen_prompt_text: int      # text tokens of the generation prompt next to the patches
    new_tokens: int
    warmup: int
    reps: int
    gen_reps: int             # timed generations with the KV cache
    nocache_reps: int         # ... and recomputing the prefix (the slow path)
    matmul_n: int             # side of the square matmul that measures peak FLOP/s
    vit_b32_check: bool       # also measure cache_speedup with the full ViT-B/32 tower (CPU shape)

    def describe(self) -> str:
        """One line naming the LM and vision shapes."""
        lm, v = self.lm, self.vision
        patches = (v["image_size"] // v["patch_size"]) ** 2
        return (f"Phi d={lm['hidden_size']} L={lm['num_hidden_layers']} H={lm['num_attention_heads']} "
                f"ffn={lm['intermediate_size']} vocab={lm['vocab_size']} | CLIP {v['image_size']}px/"
                f"{v['patch_size']} ({patches} patches) d={v['hidden_size']} L={v['num_hidden_layers']}")


SHAPES: dict[str, BenchShape] = {
    "gpu": BenchShape("gpu (Phi-2 + CLIP ViT-B/32)", PHI2, VIT_B32, stage1_batch=32, stage1_text=79,
                      stage2_batch=4, stage2_len=512, lora_r=128, lora_alpha=256, gen_prompt_text=15,
                      new_tokens=128, warmup=3, reps=10, gen_reps=3, nocache_reps=3, matmul_n=8192, vit_b32_check=False),
    "cpu": BenchShape("cpu (scaled-down Phi + CLIP)",
                      dict(PHI2, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, partial_rotary_factor=0.5,
                           vocab_size=4096),
                      dict(VIT_B32, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=4),
                      stage1_batch=8, stage1_text=31, stage2_batch=4, stage2_len=128, lora_r=16,
                      lora_alpha=32, gen_prompt_text=15, new_tokens=128, warmup=2, reps=5, gen_reps=3, nocache_reps=2,
                      matmul_n=1024, vit_b32_check=True),
    "tiny": BenchShape("tiny (test)",
                       dict(PHI2, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                            vocab_size=256),
                       dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2),
                       stage1_batch=2, stage1_text=8, stage2_batch=2, stage2_len=24, lora_r=4,
                       lora_alpha=8, gen_prompt_text=4, new_tokens=8, warmup=1, reps=2, gen_reps=2, nocache_reps=2,
                       matmul_n=256, vit_b32_check=False),
}


# ------------------------------------------------------------------------------------------
# Timing, peak FLOP/s, FLOP counting, memory
# ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reps(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int,
              ref: Callable[[], float] | None = None) -> tuple[list[float], list[float]]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (device-synchronised).

    With ``ref`` (a peak-FLOP/s probe), each timed call is followed by one probe, so that each
    repetition has its own reference taken within a second of it; returns ``(times, refs)``.
    """
    for _ in range(warmup):
        fn()
    times, refs = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if ref is not None:
            refs.append(ref())
    return times, refs


def peak_probe(device: torch.device, dtype: torch.dtype, n: int) -> Callable[[], float]:
    """A probe returning the FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (best of two, 2 n^3 FLOPs each)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    torch.mm(a, b)

    def probe() -> float:
        best = float("inf")
        for _ in range(2):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best
    return probe


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Median over ``reps`` probes of the matmul FLOP/s of this device in ``dtype``."""
    probe = peak_probe(device, dtype, n)
    return statistics.median(probe() for _ in range(reps))


def throughput(times: list[float], refs: list[float], flops: int, items: int, tokens: int) -> dict[str, Any]:
    """samples/s, tokens/s and mfu from paired (step time, peak probe) repetitions (medians)."""
    step = statistics.median(times)
    return {"step_s": step, "samples_per_s": items / step, "tokens_per_s": tokens / step,
            "flops_per_step": flops, "achieved_flops": flops / step,
            "peak_flops": statistics.median(refs),
            "mfu": statistics.median(flops / t / r for t, r in zip(times, refs)), "times_s": times}


@contextlib.contextmanager
def count_linear_flops(model: nn.Module):
    """Count model FLOPs of every ``nn.Linear`` during a forward: yields a dict ``forward``/``backward``.

    The backward figure follows the rules in the module docstring: 2 k n t for the input
    gradient when the layer's input requires grad, 2 k n t for the weight gradient when the
    weight is trainable. Run it in the same mode (grad on, no checkpointing) as training.
    """
    totals = {"forward": 0, "backward": 0}

    def hook(module: nn.Linear, inputs, _output) -> None:
        x = inputs[0]
        k, n = module.in_features, module.out_features
        flops = 2 * (x.numel() // k) * k * n
        totals["forward"] += flops
        totals["backward"] += flops * (int(x.requires_grad) + int(module.weight.requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()


def attention_flops(layers: int, seq: int, width: int, batch: int, backward: bool) -> int:
    """Attention score + weighted-sum FLOPs: ``4 T^2 d`` per layer and sequence, x3 with backward."""
    return 4 * seq * seq * width * layers * batch * (3 if backward else 1)


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS (VmHWM) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict[str, Any] = {}

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")      # resets VmHWM to the current RSS
                self.method = "VmHWM after /proc/self/clear_refs reset"
            except OSError:
                self.method = "ru_maxrss (process lifetime peak)"
            self.before = self._status("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        gib = 1 << 30
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"peak_gib": peak / gib, "before_gib": self.before / gib,
                           "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / gib,
                           "method": "torch.cuda.max_memory_allocated (everything allocated on the GPU)"}
        else:
            import resource
            peak = self._status("VmHWM") if "clear_refs" in self.method else None
            peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.result = {"peak_gib": peak / gib, "before_gib": self.before / gib,
                           "step_gib": (peak - self.before) / gib,
                           "method": f"process peak resident set, {self.method}"}


# ------------------------------------------------------------------------------------------
# Random-weight models and synthetic data through the library's real pieces
# ------------------------------------------------------------------------------------------
def random_phi(shape: BenchShape, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A ``PhiForCausalLM`` of ``shape.lm`` with random weights, built directly on ``device``."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return PhiForCausalLM._from_config(PhiConfig(**shape.lm), dtype=dtype)


def random_clip_vision(vision: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen ``CLIPVisionModel`` of the given config with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .vision import freeze

    torch.manual_seed(1)
    with torch.device(device):
        model = CLIPVisionModel._from_config(CLIPVisionConfig(**vision), dtype=dtype)
    return freeze(model)


def n_patches(vision: dict) -> int:
    """Patch tokens per image (CLS dropped)."""
    return (vision["image_size"] // vision["patch_size"]) ** 2


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[tuple[int, Path]]:
    """``n`` smooth random RGB JPEGs of ``size`` (w, h) px, like photos: ``(image_id, path)`` pairs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = folder / f"{i:012d}.jpg"
        small = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
        small.resize(size, Image.BICUBIC).save(path, quality=90)
        items.append((i, path))
    return items


def synthetic_samples(n: int, n_img: int, text: int, vocab: int, image_token_id: int,
                      answer_frac: float = 0.5) -> list[dict]:
    """Samples shaped like the course's: a short prefix, ``n_img`` placeholders, then text whose last part is supervised."""
    g = torch.Generator().manual_seed(2)
    prefix = min(4, text // 2)
    samples = []
    for i in range(n):
        words = torch.randint(0, image_token_id, (text,), generator=g).tolist()
        ids = words[:prefix] + [image_token_id] * n_img + words[prefix:]
        n_answer = max(1, int((text - prefix) * answer_frac))
        labels = [-100] * (len(ids) - n_answer) + ids[-n_answer:]
        samples.append({"input_ids": ids, "labels": labels, "image_id": i})
    return samples


def _trainer(model, params: list[dict], data, collate, precision: str, device: torch.device, tmp: Path):
    """The course's ``Trainer`` (AdamW, cosine schedule, clipping, autocast/GradScaler) for ``model``."""
    from .trainer import TrainConfig, Trainer

    cfg = TrainConfig(lr=1e-4, max_steps=10_000, micro_batch_size=len(data), precision=precision,
                      device=str(device), log_every=0)
    return Trainer(model, params, data, collate, cfg, tmp / "unused-checkpoints")


def train_step(trainer, batch: dict) -> float:
    """One optimizer step of ``trainer`` on one micro-batch: exactly the body of ``Trainer.fit``'s loop."""
    loss = trainer._micro_step(list(range(len(batch["input_ids"]))), batch, 1)
    trainer._optimizer_step(float(loss))
    return float(loss)


def step_flops(trainer, batch: dict, attn_layers: int, width: int) -> int:
    """Model FLOPs of one training step of ``trainer`` on ``batch`` (linear layers counted by hooks)."""
    model = trainer.model
    with count_linear_flops(model) as totals, torch.enable_grad(), trainer._autocast():
        model(**trainer._to_device(batch))
    b, t = batch["input_ids"].shape
    return totals["forward"] + totals["backward"] + attention_flops(attn_layers, t, width, b, backward=True)


def _cycle(batches: list) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt():
        state["i"] += 1
        return batches[state["i"] % len(batches)]
    return nxt


def _median(times: list[float]) -> float:
    return statistics.median(times)


# ------------------------------------------------------------------------------------------
# The measurements
# ------------------------------------------------------------------------------------------
def bench_stage1(shape: BenchShape, lm, precision: str, device: torch.device, tmp: Path,
                 ref: Callable[[], float], vision: dict | None = None, tag: str = "") -> dict[str, Any]:
    """Projector step on cached features vs the same step with CLIP in the loop."""
    from .batching import collate_padded
    from .feature_cache import build_feature_cache
    from .images import load_image
    from .mm_model import VisionLanguageModel
    from .projector import build_projector
    from .vision import preprocess, tiny_image_processor

    vision = vision or shape.vision
    B, n_img = shape.stage1_batch, n_patches(vision)
    tower_dtype = lm.dtype if device.type == "cuda" else torch.float32
    tower = random_clip_vision(vision, tower_dtype, device)
    processor = tiny_image_processor(vision["image_size"])
    # COCO-sized photos (640x480) unless the shape's images are tiny
    size = (640, 480) if vision["image_size"] >= 128 else (vision["image_size"],) * 2
    items = write_images(tmp / f"images{tag}", 2 * B, size)
    cache_dtype = "float16" if device.type == "cuda" else "float32"
    with _quiet():   # the cache's progress bar
        cache = build_feature_cache(tower, processor, items, tmp / f"features{tag}", layer=-2,
                                    batch_size=B, dtype=cache_dtype)
    for p in lm.parameters():
        p.requires_grad_(False)
    torch.manual_seed(3)
    projector = build_projector("mlp2x_gelu", vision["hidden_size"], lm.config.hidden_size).to(device)
    image_token_id = lm.config.vocab_size - 1
    data = synthetic_samples(2 * B, n_img, shape.stage1_text, image_token_id, image_token_id)
    params = [{"params": list(projector.parameters())}]
    pad = 0
    batches = [data[i:i + B] for i in range(0, len(data), B)]

    cached = VisionLanguageModel(lm, projector, image_token_id)
    trainer = _trainer(cached, params, data, lambda s: collate_padded(s, pad, cache.get_batch),
                       precision, device, tmp)
    cached.train()
    nxt = _cycle(batches)
    t_cached, refs = time_reps(lambda: train_step(trainer, trainer.collate(nxt())), device, shape.warmup,
                               shape.reps, ref)

    paths = dict(items)

    def pixels(ids: list[int]) -> torch.Tensor:       # the uncached pipeline: decode + preprocess
        return preprocess(processor, [load_image(paths[i]) for i in ids])

    pixel_cache = {i: pixels([i])[0] for i in paths}  # decoded once: the encoder-only comparison

    def collate_pixels(samples: list[dict], decode: bool) -> dict:
        lookup = pixels if decode else (lambda ids: torch.stack([pixel_cache[i] for i in ids]))
        batch = collate_padded(samples, pad, lookup)
        batch["pixel_values"] = batch.pop("image_features")
        return batch

    in_loop = VisionLanguageModel(lm, projector, image_token_id, vision_tower=tower)
    loop_trainer = _trainer(in_loop, params, data, lambda s: collate_pixels(s, False), precision, device, tmp)
    in_loop.train()
    tower.eval()
    t_loop, _ = time_reps(lambda: train_step(loop_trainer, collate_pixels(nxt(), False)), device,
                          shape.warmup, shape.reps)
    t_decode, _ = time_reps(lambda: train_step(loop_trainer, collate_pixels(nxt(), True)), device,
                            1, max(2, shape.reps // 2))

    batch = trainer.collate(batches[0])
    flops = step_flops(trainer, batch, lm.config.num_hidden_layers, lm.config.hidden_size)
    seq = batch["input_ids"].shape[1]
    step = _median(t_cached)
    result = {"batch": B, "seq_len": seq, "image_tokens": n_img, "vision": _vision_label(vision),
              **throughput(t_cached, refs, flops, B, B * seq),
              "in_loop_step_s": _median(t_loop), "in_loop_samples_per_s": B / _median(t_loop),
              "cache_speedup": _median(t_loop) / step,
              "in_loop_decode_step_s": _median(t_decode),
              "cache_speedup_with_decode": _median(t_decode) / step,
              "in_loop_times_s": t_loop}
    del trainer, loop_trainer, cached, in_loop, tower
    gc.collect()
    return result


def _vision_label(v: dict) -> str:
    return f"{v['image_size']}px/{v['patch_size']} d={v['hidden_size']} L={v['num_hidden_layers']}"


def profile_step(shape: BenchShape, lm, precision: str, device: torch.device, tmp: Path,
                 top: int = 8) -> dict[str, Any]:
    """Where one stage-1 step's time goes (torch.profiler): the share of matmul kernels and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    from .batching import collate_padded
    from .mm_model import VisionLanguageModel
    from .projector import build_projector

    n_img = n_patches(shape.vision)
    projector = build_projector("mlp2x_gelu", shape.vision["hidden_size"], lm.config.hidden_size).to(device)
    image_token_id = lm.config.vocab_size - 1
    data = synthetic_samples(shape.stage1_batch, n_img, shape.stage1_text, image_token_id, image_token_id)
    feats = torch.randn(len(data), n_img, shape.vision["hidden_size"])
    model = VisionLanguageModel(lm, projector, image_token_id)
    trainer = _trainer(model, [{"params": list(projector.parameters())}], data,
                       lambda s: collate_padded(s, 0, lambda ids: feats[ids]), precision, device, tmp)
    model.train()
    batch = trainer.collate(data)
    train_step(trainer, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(trainer, batch)
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1
    matmul_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
                  "aten::_efficient_attention", "aten::_flash_attention", "aten::matmul", "aten::linear")
    matmul = sum(getattr(e, attr) for e in events if e.key.startswith(matmul_ops))
    ranked = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    return {"matmul_share": matmul / total, "kernel_ms": total / 1e3,
            "top_ops": [(e.key, round(getattr(e, attr) / total, 3)) for e in ranked]}


def bench_stage2(shape: BenchShape, profile, lm_dir: Path, device: torch.device, tmp: Path,
                 ref: Callable[[], float],
                 gradient_checkpointing: bool, flops: int | None = None) -> dict[str, Any]:
    """QLoRA step: 4-bit base (``qlora.load_base_lm``) + LoRA (``qlora.add_lora``) + projector."""
    from .batching import collate_padded
    from .mm_model import VisionLanguageModel
    from .projector import build_projector
    from .qlora import add_lora, load_base_lm, lora_parameters

    from .profiles import Profile

    raw = profile.to_dict()
    raw["stage2"]["gradient_checkpointing"] = gradient_checkpointing
    prof = Profile(name=profile.name, raw=raw)
    B, T, n_img = shape.stage2_batch, shape.stage2_len, n_patches(shape.vision)
    vdim = shape.vision["hidden_size"]
    feats = torch.randn(B, n_img, vdim, generator=torch.Generator().manual_seed(4))
    with PeakMemory(device) as mem:
        with _quiet():
            lm = add_lora(prof, load_base_lm(prof, lm_dir))
        torch.manual_seed(3)
        projector = build_projector("mlp2x_gelu", vdim, lm.config.hidden_size).to(device)
        image_token_id = lm.config.vocab_size - 1
        data = synthetic_samples(B, n_img, T - n_img, image_token_id, image_token_id)
        model = VisionLanguageModel(lm, projector, image_token_id)
        params = [{"params": lora_parameters(lm)}, {"params": list(projector.parameters())}]
        trainer = _trainer(model, params, data, lambda s: collate_padded(s, 0, lambda ids: feats[ids]),
                           profile.runtime.precision, device, tmp)
        model.train()
        batch = trainer.collate(data)
        with _quiet():   # transformers' "use_cache=True is incompatible with checkpointing" and friends
            times, refs = time_reps(lambda: train_step(trainer, batch), device, shape.warmup, shape.reps, ref)
    if flops is None:   # counted with checkpointing off (model FLOPs exclude recomputation)
        flops = step_flops(trainer, batch, lm.config.num_hidden_layers, lm.config.hidden_size)
    trainable = sum(p.numel() for g in params for p in g["params"])
    result = {"gradient_checkpointing": gradient_checkpointing, "batch": B, "seq_len": T,
              "lora_r": prof.stage2.lora_r, "trainable_params": trainable,
              **throughput(times, refs, flops, B, B * T), "memory": mem.result}
    del trainer, model, lm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def bench_generate(shape: BenchShape, lm, device: torch.device) -> dict[str, Any]:
    """Time to first token and tokens/s of ``stream_generate`` with and without the KV cache."""
    from .generate import stream_generate
    from .mm_model import VisionLanguageModel
    from .projector import build_projector

    n_img = n_patches(shape.vision)
    torch.manual_seed(5)
    projector = build_projector("mlp2x_gelu", shape.vision["hidden_size"], lm.config.hidden_size)
    projector = projector.to(device)
    image_token_id = lm.config.vocab_size - 1
    vlm = VisionLanguageModel(lm, projector, image_token_id).eval()
    sample = synthetic_samples(1, n_img, shape.gen_prompt_text, image_token_id, image_token_id)[0]
    ids = torch.tensor([sample["input_ids"]], device=device)
    feats = torch.randn(1, n_img, shape.vision["hidden_size"], device=device)
    with torch.no_grad():
        embeds = vlm.embed(ids, image_features=feats)

    def run(use_cache: bool, n: int) -> tuple[float, int, float]:
        _sync(device)
        t0 = time.perf_counter()
        first, count = None, 0
        for _ in stream_generate(vlm, embeds, eos_token_id=None, max_new_tokens=n, use_cache=use_cache):
            if first is None:
                first = time.perf_counter() - t0
            count += 1
        _sync(device)
        return first, count, time.perf_counter() - t0

    out: dict[str, Any] = {"prompt_tokens": ids.shape[1], "new_tokens": shape.new_tokens}
    for use_cache, key in ((True, "kv_cache"), (False, "no_cache")):
        run(use_cache, 4)                                            # warm-up
        runs = [run(use_cache, shape.new_tokens)
                for _ in range(shape.gen_reps if use_cache else shape.nocache_reps)]
        out[key] = {"ttft_s": _median([r[0] for r in runs]),
                    "tokens_per_s": _median([r[1] / r[2] for r in runs]),
                    "seconds": [r[2] for r in runs]}
    out["ttft_s"] = out["kv_cache"]["ttft_s"]
    out["tokens_per_s"] = out["kv_cache"]["tokens_per_s"]
    out["kv_speedup"] = out["kv_cache"]["tokens_per_s"] / out["no_cache"]["tokens_per_s"]
    return out


def course_seconds(path: Path | None = None) -> dict[str, float] | None:
    """Wall-clock seconds of each stage of the last ``cpu`` course run (``runs/cpu/report.json``)."""
    from .profiles import get_profile
    from .report import report_path

    path = path or report_path(get_profile("cpu"))
    if not Path(path).is_file():
        return None
    report = json.loads(Path(path).read_text())
    return {**report.get("stages", {}), "total": report.get("seconds_total")}


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and peft's load chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------
def bench_profile(shape: BenchShape, device: torch.device):
    """The course profile whose precision and stage-2 settings the benchmark uses on ``device``."""
    from .profiles import detect_auto, get_profile

    if device.type == "cuda":
        name = detect_auto()
        stage2 = dict(lora_targets=PHI_LORA_TARGETS, lora_r=shape.lora_r, lora_alpha=shape.lora_alpha)
    else:
        name = "cpu"
        stage2 = dict(lora_targets=PHI_LORA_TARGETS, lora_r=shape.lora_r, lora_alpha=shape.lora_alpha,
                      lora_dropout=0.0)
    return get_profile(name, stage2=dict(stage2, quantize_4bit=True),
                       runtime=dict(device=str(device)))


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name, threads and load: what the figures came from."""
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / (1 << 30))
    else:
        info["name"] = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["name"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def run_bench(shape: str = "auto", device: str | None = None, out: str | Path | None = None,
              vit_b32: bool | None = None, profile_ops: bool = True, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Run every measurement, write ``bench.json`` (default ``runs/bench/bench.json``) and return it."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = shape if shape != "auto" else ("gpu" if dev.type == "cuda" else "cpu")
    if name not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose auto, {', '.join(SHAPES)}")
    sh = SHAPES[name]
    if vit_b32 is not None:
        sh = replace(sh, vit_b32_check=vit_b32)
    prof = bench_profile(sh, dev)
    precision = prof.runtime.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    t_start = time.perf_counter()
    res: dict[str, Any] = {"shape": sh.name, "shape_detail": sh.describe(), "config": asdict(sh),
                           "machine": device_info(dev), "precision": precision, "profile": prof.name}
    log(f"bench: {sh.name} on {res['machine']['name']} ({dev}, {precision}, "
        f"{res['machine']['threads']} threads, load {res['machine'].get('load_avg')})\n  {sh.describe()}")

    probe = peak_probe(dev, dtype, sh.matmul_n)
    res["peak_flops"] = {precision: statistics.median(probe() for _ in range(5))}
    log(f"  peak matmul {res['peak_flops'][precision] / 1e9:.1f} GFLOP/s ({precision}, n={sh.matmul_n})")
    with tempfile.TemporaryDirectory(prefix="capstone-bench-") as tmp_name:
        tmp = Path(tmp_name)
        lm = random_phi(sh, dtype, dev)
        lm_dir = tmp / "lm"
        with _quiet():
            lm.save_pretrained(lm_dir)          # stage 2 loads it through qlora.load_base_lm, in 4-bit

        res["stage1"] = bench_stage1(sh, lm, precision, dev, tmp, probe)
        log(f"  stage1 done ({time.perf_counter() - t_start:.0f} s)")
        if sh.vit_b32_check:
            vb = bench_stage1(replace(sh, reps=max(2, sh.reps // 2), warmup=1), lm, precision, dev, tmp, probe,
                              vision=VIT_B32, tag="-vitb32")
            res["stage1_vit_b32"] = {k: vb[k] for k in ("vision", "batch", "seq_len", "image_tokens",
                                                        "samples_per_s", "in_loop_samples_per_s",
                                                        "cache_speedup", "cache_speedup_with_decode")}
            log(f"  stage1 with ViT-B/32 done ({time.perf_counter() - t_start:.0f} s)")
        if profile_ops:
            res["stage1"]["profile"] = profile_step(sh, lm, precision, dev, tmp)

        res["generate"] = bench_generate(sh, lm, dev)
        log(f"  generate done ({time.perf_counter() - t_start:.0f} s)")
        del lm
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        res["stage2"] = {}
        off = bench_stage2(sh, prof, lm_dir, dev, tmp, probe, gradient_checkpointing=False)
        on = bench_stage2(sh, prof, lm_dir, dev, tmp, probe, gradient_checkpointing=True,
                          flops=off["flops_per_step"])
        res["stage2"] = {"checkpointing_off": off, "checkpointing_on": on}
        log(f"  stage2 done ({time.perf_counter() - t_start:.0f} s)")
    res["peak_flops"].update(stage1_ref=res["stage1"]["peak_flops"], stage2_ref=off["peak_flops"])
    res["course_seconds"] = course_seconds()
    res["goals"] = check_goals(res, name, dev)
    res["seconds"] = time.perf_counter() - t_start
    res["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    path = Path(out) if out else Path(os.environ.get("CAPSTONE_RUNS", REPO_ROOT / "runs")) / "bench" / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(res, indent=2, default=str))
    os.replace(tmp_path, path)
    res["path"] = str(path)
    return res


def check_goals(res: dict[str, Any], shape: str, device: torch.device) -> list[dict[str, Any]]:
    """Each goal of issue 9 that applies to this shape: value, target, met, and by how much it is missed."""
    goals = []

    def goal(name: str, value: float | None, target: float, higher: bool = True, note: str = "") -> None:
        if value is None:
            return
        met = value >= target if higher else value <= target
        gap = (value / target - 1) if higher else (target / value - 1 if value else 0.0)
        goals.append({"goal": name, "value": value, "target": target, "met": met,
                      "missed_by": None if met else f"{abs(gap) * 100:.0f}%", "note": note})

    if shape == "tiny":
        return goals
    s1 = res["stage1"]
    if device.type == "cpu":
        goal("stage1 mfu (CPU bench shape)", s1["mfu"], GOALS["stage1_mfu_cpu"])
    else:
        goal("stage1 mfu (A100/H100, Phi-2)", s1["mfu"], GOALS["stage1_mfu_gpu"],
             note=res["machine"].get("name", ""))
    vb = res.get("stage1_vit_b32") or (s1 if shape == "gpu" else None)
    if vb:
        goal("cache_speedup (ViT-B/32)", vb["cache_speedup"], GOALS["cache_speedup"])
    goal("kv_speedup (128 new tokens)", res["generate"]["kv_speedup"], GOALS["kv_speedup"])
    on = res["stage2"]["checkpointing_on"]
    if device.type == "cuda" and shape == "gpu":
        goal("stage2 peak GiB, checkpointing, 4x512 (T4 16 GB)", on["memory"]["peak_gib"], T4_BUDGET_GIB,
             higher=False)
    return goals


def format_table(res: dict[str, Any]) -> str:
    """The human-readable table of a ``run_bench`` result."""
    m, s1, gen = res["machine"], res["stage1"], res["generate"]
    g = 1e9
    rows = [f"device: {m['name']} ({m['device']}, {res['precision']}, {m['threads']} threads, "
            f"load {m.get('load_avg')} -> {m.get('load_avg_end')})",
            f"shape:  {res['shape']}: {res['shape_detail']}",
            "",
            f"{'figure':44} {'value':>16}",
            f"{'peak_flops (' + res['precision'] + ' matmul)':44} {res['peak_flops'][res['precision']] / g:>11.1f} GFLOP/s",
            f"stage1  projector step, cached features, batch {s1['batch']} x {s1['seq_len']} tokens",
            f"{'  samples/s':44} {s1['samples_per_s']:>16.1f}",
            f"{'  tokens/s':44} {s1['tokens_per_s']:>16.0f}",
            f"{'  model GFLOP/s (peak ref ' + format(s1['peak_flops'] / g, '.1f') + ')':44} "
            f"{s1['achieved_flops'] / g:>16.1f}",
            f"{'  mfu':44} {s1['mfu']:>16.2f}",
            f"{'  CLIP in the loop: samples/s':44} {s1['in_loop_samples_per_s']:>16.1f}",
            f"{'  cache_speedup (encoder only)':44} {s1['cache_speedup']:>16.2f}",
            f"{'  cache_speedup (decode + preprocess + encode)':44} {s1['cache_speedup_with_decode']:>16.2f}"]
    vb = res.get("stage1_vit_b32")
    if vb:
        rows += [f"stage1 with the full ViT-B/32 tower ({vb['vision']}, {vb['image_tokens']} patches)",
                 f"{'  samples/s cached / CLIP in loop':44} {vb['samples_per_s']:>7.1f} / {vb['in_loop_samples_per_s']:<7.1f}",
                 f"{'  cache_speedup (encoder only)':44} {vb['cache_speedup']:>16.2f}",
                 f"{'  cache_speedup (decode + preprocess + encode)':44} {vb['cache_speedup_with_decode']:>16.2f}"]
    for key in ("checkpointing_off", "checkpointing_on"):
        s2 = res["stage2"][key]
        mem = s2["memory"]
        rows += [f"stage2  QLoRA step, {key.replace('_', ' ')}, batch {s2['batch']} x {s2['seq_len']}, "
                 f"LoRA r={s2['lora_r']}",
                 f"{'  samples/s':44} {s2['samples_per_s']:>16.2f}",
                 f"{'  tokens/s':44} {s2['tokens_per_s']:>16.0f}",
                 f"{'  mfu':44} {s2['mfu']:>16.2f}",
                 f"{'  peak memory GiB':44} {mem['peak_gib']:>16.2f}"
                 + (f"  (step adds {mem['step_gib'] * 1024:.0f} MiB)" if "step_gib" in mem else "")]
    rows += [f"generate  {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens, batch 1",
             f"{'  time to first token (s)':44} {gen['ttft_s']:>16.4f}",
             f"{'  tokens/s with KV cache':44} {gen['kv_cache']['tokens_per_s']:>16.1f}",
             f"{'  tokens/s recomputing the prefix':44} {gen['no_cache']['tokens_per_s']:>16.1f}",
             f"{'  kv_speedup':44} {gen['kv_speedup']:>16.2f}"]
    cs = res.get("course_seconds")
    rows.append("course_seconds (runs/cpu/report.json): " + (
        ", ".join(f"{k} {v}" for k, v in cs.items()) if cs else "no cpu course report yet"))
    if res["goals"]:
        rows += ["", "goals:"]
        for goal in res["goals"]:
            status = "met" if goal["met"] else f"MISSED by {goal['missed_by']}"
            rows.append(f"  {goal['goal']:48} {goal['value']:.2f} (target {goal['target']:g}): {status}")
    rows += ["", closing_note(res)]
    return "\n".join(rows)


def closing_note(res: dict[str, Any]) -> str:
    """What limits the figures, from the profile of one stage-1 step."""
    p = res["stage1"].get("profile")
    if not p:
        return "note: run without --no-profile to see where a stage-1 step's time goes"
    ops = ", ".join(f"{k} {v:.0%}" for k, v in p["top_ops"][:6])
    return (f"note: matmul kernels take {p['matmul_share']:.0%} of a stage-1 step's kernel time; "
            f"the rest (norms, activations, softmax/loss, optimizer, copies) is what keeps mfu below "
            f"the matmul peak. Top ops by self time: {ops}")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m capstone_lib.bench [--shape auto|gpu|cpu|tiny] [--out PATH]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="auto", choices=("auto", *SHAPES))
    ap.add_argument("--smallest", action="store_true", help="same as --shape tiny")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--out", default=None, help="where to write bench.json (default runs/bench/bench.json)")
    ap.add_argument("--no-vit-b32", action="store_true", help="skip cache_speedup with the full ViT-B/32")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    args = ap.parse_args(argv)
    res = run_bench("tiny" if args.smallest else args.shape, args.device, args.out,
                    vit_b32=False if args.no_vit_b32 else None, profile_ops=not args.no_profile)
    print()
    print(format_table(res))
    print(f"\nwritten: {res['path']}  ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
