"""The stage benchmarks (dev tooling, not part of the library): ``make bench`` / ``python tools/bench_stages.py``.

It times the course's three hot loops on whatever device is present, prints a table and
writes ``runs/bench/bench.json``. Each figure is measured in the same run as its reference,
interleaved with it: every timed training step is followed by a peak-matmul probe and
``mfu`` is the median of the per-repetition ratios; the cached and in-the-loop stage-1 steps
alternate, and so do generations with and without the KV cache. Ratios therefore hold on a
noisy shared machine. Warm-up steps are excluded; each figure is a median of repetitions.

* ``peak_flops``  FLOP/s of a square matmul (1024 on CPU, 8192 on GPU) in the dtype the
  stages compute in: fp32 on CPU, bf16 on an A100/H100, fp16 on a T4.
* ``stage1``  the projector step (``Trainer``'s micro-step + optimizer step) on features
  read from a real on-disk ``FeatureCache``. ``cache_speedup`` = its throughput / that of
  the same step with the CLIP tower run in the loop on decoded pixels (the encoder's cost
  alone); ``cache_speedup_with_decode`` also decodes and preprocesses the JPEGs each step.
* ``stage2``  the QLoRA step: 4-bit NF4 base (``qlora.load_base_lm``) + LoRA
  (``qlora.add_lora``) + trainable projector, gradient checkpointing on and off. Peak memory:
  on GPU ``torch.cuda.max_memory_allocated`` from before the model is loaded; on CPU the same
  allocator-level figure, built as weights + optimizer state (tensor sizes, 4-bit weights
  packed with their quantization constants) + the peak that one step allocates on top
  (``torch.profiler`` memory events; activations, gradients, temporaries).
* ``generate``  ``generate.stream_generate``, batch 1, 128 new tokens (EOS ignored): time to
  first token, tokens/s, ``kv_speedup`` = tokens/s with the KV cache / tokens/s recomputing
  the whole prefix at every step (both include the same prefill).
* ``course_seconds``  each stage of the last ``runs/cpu/report.json``, if there is one.

Shapes: on a GPU the real Phi-2 and CLIP ViT-B/32 configurations with random weights
(throughput and memory do not depend on the weights: nothing is downloaded); on a CPU a
scaled-down ``PhiForCausalLM`` and CLIP vision shape (printed), plus ``cache_speedup`` with
the full ViT-B/32 tower; ``--shape tiny`` (``--smallest``) for the test.

Model FLOPs (``mfu``'s numerator; recomputation by gradient checkpointing is NOT counted, so
one count serves both settings). Every ``nn.Linear`` (bitsandbytes' ``Linear4bit`` and the
LoRA A/B matrices included) is counted by a forward hook on the real batch, so the projector
is counted on image positions only. A ``k x n`` weight applied to ``t`` token rows costs::

    forward                                       2 k n t
    backward: input gradient, if the input needs one   2 k n t  (frozen LM layers need it: the
                                                                  gradient flows down to the
                                                                  projector beneath them)
    backward: weight gradient, if trainable       2 k n t  (frozen LM, CLIP, 4-bit base: none)

so a frozen LM layer costs 4 k n t, a trainable layer 6 k n t, and the projector's first
layer (its input, the cached features, needs no gradient) 4 k n t. Attention adds
``4 T^2 d`` per layer and sequence forward (the full square, as PaLM's MFU; causal masking
not subtracted) and twice that backward. Embedding lookups, norms, activations, softmax,
the loss and the optimizer are not counted: they are the overhead that MFU exposes.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from capstone_lib.profiles import REPO_ROOT  # noqa: E402

PHI2 = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, partial_rotary_factor=0.4, vocab_size=51200, hidden_act="gelu_new",
            resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, max_position_embeddings=2048,
            layer_norm_eps=1e-5, tie_word_embeddings=False)           # microsoft/phi-2 config.json
VIT_B32 = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
               num_hidden_layers=12, num_attention_heads=12)           # openai/clip-vit-base-patch32
T4_BUDGET_GIB = 14.0   # a "16 GB" T4 gives PyTorch ~14.7 GiB; leave room for the context and fragmentation
GOALS = {"stage1_mfu_cpu": 0.40, "stage1_mfu_gpu": 0.45, "cache_speedup": 3.0, "kv_speedup": 5.0}
GIB = 1 << 30


@dataclass(frozen=True)
class BenchShape:
    """Model shapes, batch sizes and repetitions of one benchmark scale."""

    name: str
    lm: dict                 # PhiConfig keyword arguments
    vision: dict             # CLIPVisionConfig keyword arguments
    stage1_batch: int
    stage1_text: int         # text tokens per stage-1 sample (prompt + caption) beside the patches
    stage2_batch: int
    stage2_len: int          # tokens per stage-2 sample, patches included
    lora_r: int
    lora_alpha: int
    gen_prompt_text: int     # text tokens of the generation prompt beside the patches
    new_tokens: int
    warmup: int
    reps: int
    gen_reps: int            # (KV cache, no cache) generation pairs
    matmul_n: int            # side of the peak-FLOP/s matmul
    vit_b32_check: bool      # also time stage 1 with the full ViT-B/32 tower (the CPU shape)

    def describe(self) -> str:
        """One line naming the LM and vision shapes."""
        lm, v = self.lm, self.vision
        return (f"Phi d={lm['hidden_size']} L={lm['num_hidden_layers']} H={lm['num_attention_heads']} "
                f"ffn={lm['intermediate_size']} vocab={lm['vocab_size']} | CLIP {v['image_size']}px/"
                f"{v['patch_size']} ({n_patches(v)} patches) d={v['hidden_size']} L={v['num_hidden_layers']}")


SHAPES: dict[str, BenchShape] = {
    "gpu": BenchShape("gpu (Phi-2 + CLIP ViT-B/32)", PHI2, VIT_B32, stage1_batch=32, stage1_text=79,
                      stage2_batch=4, stage2_len=512, lora_r=128, lora_alpha=256, gen_prompt_text=15,
                      new_tokens=128, warmup=3, reps=10, gen_reps=3, matmul_n=8192, vit_b32_check=False),
    # head_dim 64 needs partial_rotary_factor 0.5 (Phi-2's 0.4 x 80 = 32 rotary dims; 0.4 x 64 is odd)
    "cpu": BenchShape("cpu (scaled-down Phi + CLIP)",
                      dict(PHI2, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, partial_rotary_factor=0.5,
                           vocab_size=4096),
                      dict(VIT_B32, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=4),
                      stage1_batch=8, stage1_text=31, stage2_batch=4, stage2_len=128, lora_r=16,
                      lora_alpha=32, gen_prompt_text=15, new_tokens=128, warmup=2, reps=5, gen_reps=3,
                      matmul_n=1024, vit_b32_check=True),
    "tiny": BenchShape("tiny (test)",
                       dict(PHI2, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                            vocab_size=256),
                       dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2),
                       stage1_batch=2, stage1_text=8, stage2_batch=2, stage2_len=24, lora_r=4,
                       lora_alpha=8, gen_prompt_text=4, new_tokens=8, warmup=1, reps=2, gen_reps=2,
                       matmul_n=256, vit_b32_check=False),
}


def n_patches(vision: dict) -> int:
    """Patch tokens per image (CLS dropped)."""
    return (vision["image_size"] // vision["patch_size"]) ** 2


# ------------------------------------------------------------------------------------------
# Timing against an interleaved reference
# ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, reps: int,
                     probe: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name]``, called in turn ``reps`` times after ``warmup`` rounds.

    With ``probe`` (a peak-FLOP/s probe) each round ends with one probe, under ``"probe"``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    out.update({"probe": []} if probe else {})
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(_timed(fn, device))
        if probe:
            out["probe"].append(probe())
    return out


def peak_probe(device: torch.device, dtype: torch.dtype, n: int) -> Callable[[], float]:
    """A probe returning the FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (best of two)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    torch.mm(a, b)
    return lambda: 2 * n ** 3 / min(_timed(lambda: torch.mm(a, b), device) for _ in range(2))


def throughput(times: list[float], probes: list[float], flops: int, samples: int, tokens: int) -> dict:
    """samples/s, tokens/s, achieved FLOP/s and mfu (median of per-repetition ratios to the probe)."""
    step = statistics.median(times)
    return {"step_s": step, "samples_per_s": samples / step, "tokens_per_s": tokens / step,
            "flops_per_step": flops, "achieved_flops": flops / step, "peak_flops": statistics.median(probes),
            "mfu": statistics.median(flops / t / p for t, p in zip(times, probes)), "times_s": times}


def _ratio(slow: list[float], fast: list[float]) -> float:
    """Median of per-round ratios ``slow[i] / fast[i]``."""
    return statistics.median(s / f for s, f in zip(slow, fast))


# ------------------------------------------------------------------------------------------
# FLOPs and memory
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_linear_flops(model: nn.Module):
    """Yield ``{"forward", "backward"}`` model FLOPs of every ``nn.Linear`` run inside the block.

    Backward counts 2 k n t for the input gradient when the layer's input requires grad and
    2 k n t for the weight gradient when the weight is trainable (module docstring).
    """
    totals = {"forward": 0, "backward": 0}

    def hook(module: nn.Linear, inputs, _output) -> None:
        x = inputs[0]
        flops = 2 * (x.numel() // module.in_features) * module.in_features * module.out_features
        totals["forward"] += flops
        totals["backward"] += flops * (int(x.requires_grad) + int(module.weight.requires_grad))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()


def attention_flops(layers: int, seq: int, width: int, batch: int, backward: bool) -> int:
    """Attention scores + weighted sums: ``4 T^2 d`` per layer and sequence, x3 with the backward."""
    return 4 * seq * seq * width * layers * batch * (3 if backward else 1)


def step_flops(trainer, batch: dict, attn_layers: int, width: int) -> int:
    """Model FLOPs of one training step of ``trainer`` on ``batch`` (run without checkpointing)."""
    with count_linear_flops(trainer.model) as totals, torch.enable_grad(), trainer._autocast():
        trainer.model(**trainer._to_device(batch))
    b, t = batch["input_ids"].shape
    return totals["forward"] + totals["backward"] + attention_flops(attn_layers, t, width, b, backward=True)


@contextlib.contextmanager
def _quiet_fd2():
    """Silence C-level stderr (the profiler's USDT lines) for the block."""
    import sys

    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def step_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes that ``fn`` allocates on top of what already exists (torch.profiler memory events, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        events = json.loads((Path(tmp) / "trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights, buffers (4-bit ones packed, with their quantization constants) and optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        quant = getattr(t, "quant_state", None)
        if quant is not None:
            total += sum(v.numel() * v.element_size() for v in quant.as_dict(packed=True).values()
                         if torch.is_tensor(v))
    return total


# ------------------------------------------------------------------------------------------
# Random-weight models and synthetic data, through the library's real pieces
# ------------------------------------------------------------------------------------------
def random_phi(shape: BenchShape, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A ``PhiForCausalLM`` of ``shape.lm`` with random weights, built directly on ``device``.

    Tuned as the course's loader tunes the real Phi-2 (``lm_tuning.tune_language_model``).
    """
    from transformers import PhiConfig, PhiForCausalLM

    from capstone_lib.lm_tuning import tune_language_model

    torch.manual_seed(0)
    with torch.device(device):
        lm = PhiForCausalLM._from_config(PhiConfig(**shape.lm), dtype=dtype)
    tune_language_model(lm)
    return lm


def random_clip_vision(vision: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen ``CLIPVisionModel`` of the given config with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from capstone_lib.vision import freeze

    torch.manual_seed(1)
    with torch.device(device):
        return freeze(CLIPVisionModel._from_config(CLIPVisionConfig(**vision), dtype=dtype))


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[tuple[int, Path]]:
    """``n`` smooth random RGB JPEGs of ``size`` (w, h), like photos: ``(image_id, path)`` pairs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
        small.resize(size, Image.BICUBIC).save(folder / f"{i:012d}.jpg", quality=90)
    return [(i, folder / f"{i:012d}.jpg") for i in range(n)]


def synthetic_samples(n: int, n_img: int, text: int, vocab: int, image_token_id: int) -> list[dict]:
    """Course-shaped samples: a short prefix, ``n_img`` placeholders, text whose second half is supervised."""
    g = torch.Generator().manual_seed(2)
    prefix = min(4, text // 2)
    samples = []
    for i in range(n):
        words = torch.randint(0, min(vocab, image_token_id), (text,), generator=g).tolist()
        ids = words[:prefix] + [image_token_id] * n_img + words[prefix:]
        n_answer = max(1, (text - prefix) // 2)
        samples.append({"input_ids": ids, "labels": [-100] * (len(ids) - n_answer) + ids[-n_answer:],
                        "image_id": i})
    return samples


def _trainer(model, params: list[dict], data, collate, precision: str, device: torch.device, tmp: Path):
    """The course's ``Trainer`` (AdamW, cosine schedule, clipping, autocast/GradScaler) for ``model``."""
    from capstone_lib.trainer import TrainConfig, Trainer

    cfg = TrainConfig(lr=1e-4, warmup_ratio=0.0, max_steps=10_000, micro_batch_size=len(data),
                      precision=precision, device=str(device), log_every=0)
    return Trainer(model, params, data, collate, cfg, tmp / "unused-checkpoints")


def train_step(trainer, batch: dict) -> float:
    """One optimizer step of ``trainer`` on one micro-batch: the body of ``Trainer.fit``'s loop."""
    loss = trainer._micro_step(list(range(len(batch["input_ids"]))), batch, 1)
    trainer._optimizer_step(float(loss))
    return float(loss)


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and peft's load chatter, progress bars and warnings."""
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


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# The measurements
# ------------------------------------------------------------------------------------------
def encoder_flops(tower: nn.Module, images: int) -> int:
    """Forward FLOPs of a CLIP vision tower on ``images`` images: linears on every token, patch conv, attention."""
    c = tower.config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    linear = sum(m.in_features * m.out_features for m in tower.modules() if isinstance(m, nn.Linear))
    conv = 3 * c.patch_size ** 2 * c.hidden_size * (tokens - 1)
    attention = attention_flops(c.num_hidden_layers, tokens, c.hidden_size, images, backward=False)
    return 2 * images * (linear * tokens + conv) + attention


def bench_stage1(shape: BenchShape, lm, precision: str, device: torch.device, tmp: Path,
                 probe: Callable[[], float], vision: dict | None = None, tag: str = "",
                 profile_ops: bool = False) -> dict[str, Any]:
    """The projector step on cached features, interleaved with the same step running CLIP in the loop."""
    from capstone_lib.batching import collate_padded
    from capstone_lib.feature_cache import build_feature_cache
    from capstone_lib.images import load_image
    from capstone_lib.lm_tuning import tune_language_model
    from capstone_lib.mm_model import VisionLanguageModel
    from capstone_lib.projector import build_projector
    from capstone_lib.vision import preprocess
    from capstone_lib.tiny_clip import tiny_image_processor

    vision = vision or shape.vision
    B, n_img = shape.stage1_batch, n_patches(vision)
    tower = random_clip_vision(vision, lm.dtype if device.type == "cuda" else torch.float32, device)
    processor = tiny_image_processor(vision["image_size"])
    size = (640, 480) if vision["image_size"] >= 128 else (vision["image_size"],) * 2   # COCO-sized
    items = write_images(tmp / f"images{tag}", 2 * B, size)
    with _quiet():
        cache = build_feature_cache(tower, processor, items, tmp / f"features{tag}", layer=-2, batch_size=B,
                                    dtype="float16" if device.type == "cuda" else "float32")
    for p in lm.parameters():
        p.requires_grad_(False)
    tune_language_model(lm, frozen=True)         # as stage1.build_model does to its frozen LM
    torch.manual_seed(3)
    projector = build_projector("mlp2x_gelu", vision["hidden_size"], lm.config.hidden_size).to(device)
    image_token_id = lm.config.vocab_size - 1
    data = synthetic_samples(2 * B, n_img, shape.stage1_text, image_token_id, image_token_id)
    batches = [data[i:i + B] for i in range(0, len(data), B)]
    params = [{"params": list(projector.parameters())}]
    paths = dict(items)
    decoded = {i: preprocess(processor, [load_image(p)])[0] for i, p in paths.items()}

    def pixels(ids: list[int], decode: bool) -> torch.Tensor:     # the uncached pipeline
        if decode:
            return preprocess(processor, [load_image(paths[i]) for i in ids])
        return torch.stack([decoded[i] for i in ids])

    def collate_pixels(samples: list[dict], decode: bool) -> dict:
        batch = collate_padded(samples, 0, lambda ids: pixels(ids, decode))
        batch["pixel_values"] = batch.pop("image_features")
        return batch

    cached = VisionLanguageModel(lm, projector, image_token_id).train()
    trainer = _trainer(cached, params, data, lambda s: collate_padded(s, 0, cache.get_batch),
                       precision, device, tmp)
    in_loop = VisionLanguageModel(lm, projector, image_token_id, vision_tower=tower).train()
    tower.eval()
    loop_trainer = _trainer(in_loop, params, data, lambda s: collate_pixels(s, False), precision, device, tmp)
    nxt = itertools.cycle(batches).__next__
    t = time_interleaved({"cached": lambda: train_step(trainer, trainer.collate(nxt())),
                          "in_loop": lambda: train_step(loop_trainer, collate_pixels(nxt(), False)),
                          "decode": lambda: train_step(loop_trainer, collate_pixels(nxt(), True))},
                         device, shape.warmup, shape.reps, probe)
    batch = trainer.collate(batches[0])
    flops = step_flops(trainer, batch, lm.config.num_hidden_layers, lm.config.hidden_size)
    seq = batch["input_ids"].shape[1]
    in_loop_s, enc = statistics.median(t["in_loop"]), encoder_flops(tower, B)
    label = f"{vision['image_size']}px/{vision['patch_size']} d={vision['hidden_size']} " \
            f"L={vision['num_hidden_layers']}"
    result = {"batch": B, "seq_len": seq, "image_tokens": n_img, "vision": label,
              **throughput(t["cached"], t["probe"], flops, B, B * seq), "encoder_flops_per_step": enc,
              "cache_speedup_bound": 1 + enc / flops,   # if the encoder ran as efficiently as the step
              "in_loop_step_s": in_loop_s, "in_loop_samples_per_s": B / in_loop_s,
              "cache_speedup": _ratio(t["in_loop"], t["cached"]),
              "in_loop_decode_step_s": statistics.median(t["decode"]),
              "cache_speedup_with_decode": _ratio(t["decode"], t["cached"]),
              "in_loop_times_s": t["in_loop"], "in_loop_decode_times_s": t["decode"]}
    if profile_ops:
        result["profile"] = op_profile(lambda: train_step(trainer, batch), device)
    trainer = loop_trainer = cached = in_loop = tower = None     # free them before the next shape
    _free(device)
    return result


def op_profile(fn: Callable[[], Any], device: torch.device, top: int = 8) -> dict[str, Any]:
    """Where one call of ``fn`` spends its time (torch.profiler): the matmul kernels' share and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_fd2(), profile(activities=activities) as prof:
        fn()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":
        # Each kernel's time shows up twice: under the operator that launched it (its self device
        # time) and as a kernel event of its own. Keep the operators, so that every kernel counts
        # once and the matmul share is read off operator names, as on the CPU.
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CPU]
    total = sum(getattr(e, attr) for e in events) or 1
    matmuls = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
               "aten::_efficient_attention", "aten::_flash_attention", "aten::matmul", "aten::linear")
    ranked = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    return {"matmul_share": sum(getattr(e, attr) for e in events if e.key.startswith(matmuls)) / total,
            "kernel_ms": total / 1e3, "top_ops": [(e.key, round(getattr(e, attr) / total, 3)) for e in ranked]}


def bench_stage2(shape: BenchShape, profile, lm_dir: Path, device: torch.device, tmp: Path,
                 probe: Callable[[], float], gradient_checkpointing: bool,
                 flops: int | None = None) -> dict[str, Any]:
    """The QLoRA step: 4-bit base (``qlora.load_base_lm``) + LoRA (``qlora.add_lora``) + projector."""
    from capstone_lib.batching import collate_padded
    from capstone_lib.mm_model import VisionLanguageModel
    from capstone_lib.profiles import Profile
    from capstone_lib.projector import build_projector
    from capstone_lib.qlora import add_lora, load_base_lm, lora_parameters

    raw = profile.to_dict()
    raw["stage2"]["gradient_checkpointing"] = gradient_checkpointing
    prof = Profile(name=profile.name, raw=raw)
    B, T, n_img, vdim = shape.stage2_batch, shape.stage2_len, n_patches(shape.vision), shape.vision["hidden_size"]
    feats = torch.randn(B, n_img, vdim, generator=torch.Generator().manual_seed(4))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with _quiet():
        lm = add_lora(prof, load_base_lm(prof, lm_dir))
    torch.manual_seed(3)
    projector = build_projector("mlp2x_gelu", vdim, lm.config.hidden_size).to(device)
    image_token_id = lm.config.vocab_size - 1
    data = synthetic_samples(B, n_img, T - n_img, image_token_id, image_token_id)
    model = VisionLanguageModel(lm, projector, image_token_id).train()
    params = [{"params": lora_parameters(lm)}, {"params": list(projector.parameters())}]
    trainer = _trainer(model, params, data, lambda s: collate_padded(s, 0, lambda ids: feats[ids]),
                       profile.runtime.precision, device, tmp)
    batch = trainer.collate(data)
    with _quiet():   # "use_cache=True is incompatible with gradient checkpointing" and friends
        t = time_interleaved({"step": lambda: train_step(trainer, batch)}, device, shape.warmup, shape.reps, probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            memory = {"peak_gib": (torch.cuda.max_memory_allocated(device) - before) / GIB,
                      "method": "torch.cuda.max_memory_allocated from before the model load"}
        else:
            step = step_peak_bytes(lambda: train_step(trainer, batch))
            resident = resident_bytes(model, trainer.optimizer)
            memory = {"peak_gib": (resident + step) / GIB, "resident_gib": resident / GIB,
                      "step_gib": step / GIB,
                      "method": "weights + optimizer state + the step's peak allocation (torch.profiler)"}
    if flops is None:      # counted with checkpointing off: model FLOPs exclude recomputation
        flops = step_flops(trainer, batch, lm.config.num_hidden_layers, lm.config.hidden_size)
    result = {"gradient_checkpointing": gradient_checkpointing, "batch": B, "seq_len": T,
              "lora_r": prof.stage2.lora_r, "trainable_params": sum(p.numel() for p in trainer.params),
              **throughput(t["step"], t["probe"], flops, B, B * T), "memory": memory}
    trainer = model = lm = None     # free them before the next shape
    _free(device)
    return result


def bench_generate(shape: BenchShape, lm, device: torch.device) -> dict[str, Any]:
    """Time to first token and tokens/s of ``stream_generate``, KV cache and no cache in turn."""
    from capstone_lib.generate import stream_generate
    from capstone_lib.mm_model import VisionLanguageModel
    from capstone_lib.projector import build_projector

    n_img, vdim = n_patches(shape.vision), shape.vision["hidden_size"]
    torch.manual_seed(5)
    projector = build_projector("mlp2x_gelu", vdim, lm.config.hidden_size).to(device)
    image_token_id = lm.config.vocab_size - 1
    vlm = VisionLanguageModel(lm, projector, image_token_id).eval()
    sample = synthetic_samples(1, n_img, shape.gen_prompt_text, image_token_id, image_token_id)[0]
    ids = torch.tensor([sample["input_ids"]], device=device)
    with torch.no_grad():
        embeds = vlm.embed(ids, image_features=torch.randn(1, n_img, vdim, device=device))

    def run(use_cache: bool, n: int) -> tuple[float, int, float]:
        """(time to first token, tokens, seconds) of one generation."""
        _sync(device)
        t0, first, count = time.perf_counter(), None, 0
        for _ in stream_generate(vlm, embeds, eos_token_id=None, max_new_tokens=n, use_cache=use_cache):
            first = first if first is not None else time.perf_counter() - t0
            count += 1
        _sync(device)
        return first, count, time.perf_counter() - t0

    # warm-up; on a GPU at full length, since every new sequence length is a first-time shape
    # for the kernels (on an H100 the first full-length round ran ~3x slower than later ones)
    warm = shape.new_tokens if device.type == "cuda" else 4
    run(True, warm), run(False, warm)
    pairs = [(run(True, shape.new_tokens), run(False, shape.new_tokens)) for _ in range(shape.gen_reps)]
    out: dict[str, Any] = {"prompt_tokens": ids.shape[1], "new_tokens": shape.new_tokens}
    for i, key in enumerate(("kv_cache", "no_cache")):
        runs = [p[i] for p in pairs]
        if any(r[1] != shape.new_tokens for r in runs):
            raise RuntimeError(f"a generation stopped before {shape.new_tokens} tokens (eos_token_id=None)")
        out[key] = {"ttft_s": statistics.median(r[0] for r in runs),
                    "tokens_per_s": statistics.median(r[1] / r[2] for r in runs), "seconds": [r[2] for r in runs]}
    out.update(ttft_s=out["kv_cache"]["ttft_s"], tokens_per_s=out["kv_cache"]["tokens_per_s"],
               kv_speedup=statistics.median(n[2] / c[2] for c, n in pairs))
    return out


def course_seconds(path: Path | None = None) -> dict[str, float] | None:
    """Wall-clock seconds of each stage of the last ``cpu`` course run (``runs/cpu/report.json``)."""
    from capstone_lib.profiles import get_profile
    from capstone_lib.report import report_path

    path = Path(path or report_path(get_profile("cpu")))
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return {**report.get("stages", {}), "total": report.get("seconds_total")}


def _or_oom(fn: Callable[[], dict]) -> dict:
    """``fn()``, or ``{"error": ...}`` when the GPU runs out of memory (e.g. no checkpointing on a T4)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        gc.collect()
        torch.cuda.empty_cache()
        return {"error": f"CUDA out of memory: {str(err).splitlines()[0]}"}


# ------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------
def bench_profile(shape: BenchShape, device: torch.device):
    """The course profile whose precision and stage-2 settings the benchmark uses on ``device``."""
    from capstone_lib.profiles import detect_auto, get_profile

    from capstone_lib.lm_spec import lm_preset

    stage2 = dict(lora_r=shape.lora_r, lora_alpha=shape.lora_alpha, quantize_4bit=True)
    # On a CPU these figures stay fp32, comparable with their history; precision on a CPU is
    # tools/bench_levers.py's subject.
    runtime = dict(device=str(device)) if device.type == "cuda" else dict(device="cpu", precision="fp32")
    return get_profile(detect_auto() if device.type == "cuda" else "cpu", stage2=stage2,
                       runtime=runtime, lm=lm_preset("phi-2"))


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name, threads and load: what the figures came from."""
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / GIB)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
                 if line.startswith("model name")]
        info["name"] = names[0] if names else (platform.processor() or platform.machine())
    return info


def run_bench(shape: str = "auto", device: str | None = None, out: str | Path | None = None,
              vit_b32: bool | None = None, profile_ops: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement, write ``bench.json`` (default ``runs/bench/bench.json``) and return it."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = shape if shape != "auto" else ("gpu" if dev.type == "cuda" else "cpu")
    if name not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose auto, {', '.join(SHAPES)}")
    from capstone_lib.precision import compute_dtype

    sh = SHAPES[name] if vit_b32 is None else replace(SHAPES[name], vit_b32_check=vit_b32)
    prof = bench_profile(sh, dev)
    if name == "gpu":     # the profile's stage-1 micro-batch: 32 on an A100/H100, 16 on a T4
        sh = replace(sh, stage1_batch=prof.stage1.micro_batch_size)
    precision, dtype = prof.runtime.precision, compute_dtype(prof.runtime.precision)
    t_start = time.perf_counter()
    from capstone_lib.lm_tuning import lm_tuning_levers

    res: dict[str, Any] = {"shape": sh.name, "shape_detail": sh.describe(), "config": asdict(sh),
                           "machine": device_info(dev), "precision": precision, "profile": prof.name,
                           "lm_tuning": list(lm_tuning_levers())}
    m = res["machine"]
    log(f"bench: {sh.name} on {m['name']} ({dev}, {precision}, {m['threads']} threads, "
        f"load {m['load_avg']})\n  {sh.describe()}\n  LM tuning: {', '.join(res['lm_tuning']) or 'none'}")

    def done(what: str) -> None:
        log(f"  {what} done ({time.perf_counter() - t_start:.0f} s)")

    probe = peak_probe(dev, dtype, sh.matmul_n)
    res["peak_flops"] = {precision: statistics.median(probe() for _ in range(5))}
    log(f"  peak matmul {res['peak_flops'][precision] / 1e9:.1f} GFLOP/s ({precision}, n={sh.matmul_n})")
    with tempfile.TemporaryDirectory(prefix="capstone-bench-") as tmp_name:
        tmp = Path(tmp_name)
        lm = random_phi(sh, dtype, dev)
        with _quiet():
            lm.save_pretrained(tmp / "lm")     # stage 2 loads it through qlora.load_base_lm, in 4-bit
        res["stage1"] = bench_stage1(sh, lm, precision, dev, tmp, probe, profile_ops=profile_ops)
        done("stage1")
        if sh.vit_b32_check:
            vb = bench_stage1(replace(sh, reps=3, warmup=1), lm, precision, dev, tmp, probe,
                              vision=VIT_B32, tag="-vitb32")
            res["stage1_vit_b32"] = {k: vb[k] for k in (
                "vision", "batch", "seq_len", "image_tokens", "samples_per_s", "in_loop_samples_per_s",
                "cache_speedup", "cache_speedup_with_decode", "cache_speedup_bound", "mfu")}
            done("stage1 with the ViT-B/32 tower")
        res["generate"] = bench_generate(sh, lm, dev)
        done("generate")
        del lm
        _free(dev)
        off = _or_oom(lambda: bench_stage2(sh, prof, tmp / "lm", dev, tmp, probe, gradient_checkpointing=False))
        on = _or_oom(lambda: bench_stage2(sh, prof, tmp / "lm", dev, tmp, probe, gradient_checkpointing=True,
                                          flops=off.get("flops_per_step")))
        res["stage2"] = {"checkpointing_off": off, "checkpointing_on": on}
        done("stage2")
    res["peak_flops"].update(stage1_probes=res["stage1"]["peak_flops"], stage2_probes=on.get("peak_flops"))
    res["course_seconds"] = course_seconds()
    res["goals"] = check_goals(res, name, dev)
    res["seconds"] = time.perf_counter() - t_start
    m["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(out) if out else Path(os.environ.get("CAPSTONE_RUNS", REPO_ROOT / "runs")) / "bench" / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(res, indent=2, default=str))
    os.replace(path.with_suffix(".tmp"), path)
    res["path"] = str(path)
    return res


def check_goals(res: dict[str, Any], shape: str, device: torch.device) -> list[dict[str, Any]]:
    """Each goal of the issue that applies to this shape: value, target, met, and by how much it is missed."""
    goals: list[dict[str, Any]] = []

    def goal(name: str, value: float, target: float, higher: bool = True, note: str = "") -> None:
        met = value >= target if higher else value <= target
        goals.append({"goal": name, "value": value, "target": target, "met": met,
                      "missed_by": None if met else f"{abs(value / target - 1) * 100:.0f}%", "note": note})

    if shape == "tiny":
        return goals
    if device.type == "cpu":
        goal("stage1 mfu (CPU bench shape)", res["stage1"]["mfu"], GOALS["stage1_mfu_cpu"])
    elif res["precision"] == "bf16":      # the goal is for an A100/H100 (a T4 has no bf16)
        goal(f"stage1 mfu ({res['machine'].get('name', 'GPU')}, Phi-2)", res["stage1"]["mfu"],
             GOALS["stage1_mfu_gpu"])
    vb = res.get("stage1_vit_b32") or (res["stage1"] if shape == "gpu" else None)
    if vb:
        goal("cache_speedup (ViT-B/32)", vb["cache_speedup"], GOALS["cache_speedup"],
             note=f"FLOP bound 1 + encoder/step = {vb['cache_speedup_bound']:.2f}" if "cache_speedup_bound" in vb
             else "")
    goal("kv_speedup (128 new tokens)", res["generate"]["kv_speedup"], GOALS["kv_speedup"])
    if device.type == "cuda" and shape == "gpu":
        on = res["stage2"]["checkpointing_on"]
        goal("stage2 GiB, checkpointing, 4 x 512 (T4 16 GB)",
             on["memory"]["peak_gib"] if "memory" in on else float("inf"), T4_BUDGET_GIB, higher=False)
    return goals


def format_table(res: dict[str, Any]) -> str:
    """The human-readable table of a ``run_bench`` result."""
    m, s1, gen = res["machine"], res["stage1"], res["generate"]

    def row(label: str, value: str) -> str:
        return f"  {label:46} {value:>14}"

    rows = [f"device: {m['name']} ({m['device']}, {res['precision']}, {m['threads']} threads, "
            f"load {m['load_avg']} -> {m.get('load_avg_end')})",
            f"shape:  {res['shape']}: {res['shape_detail']}",
            f"LM tuning (lm_tuning.tune_language_model): {', '.join(res.get('lm_tuning') or []) or 'none'}", "",
            f"peak_flops ({res['precision']} matmul, GFLOP/s): {res['peak_flops'][res['precision']] / 1e9:.1f}",
            f"stage1  projector step, cached features, batch {s1['batch']} x {s1['seq_len']} tokens",
            row("samples/s", f"{s1['samples_per_s']:.2f}"), row("tokens/s", f"{s1['tokens_per_s']:.0f}"),
            row(f"model GFLOP/s (probe {s1['peak_flops'] / 1e9:.1f})", f"{s1['achieved_flops'] / 1e9:.1f}"),
            row("mfu", f"{s1['mfu']:.2f}"),
            row("samples/s with CLIP in the loop", f"{s1['in_loop_samples_per_s']:.2f}"),
            row("cache_speedup (encoder)", f"{s1['cache_speedup']:.2f}"),
            row("cache_speedup (decode + preprocess + encoder)", f"{s1['cache_speedup_with_decode']:.2f}"),
            row("cache_speedup bound: 1 + encoder/step FLOPs", f"{s1['cache_speedup_bound']:.2f}")]
    vb = res.get("stage1_vit_b32")
    if vb:
        rows += [f"stage1 with the full ViT-B/32 tower ({vb['vision']}), same LM",
                 row("samples/s cached / CLIP in the loop",
                     f"{vb['samples_per_s']:.2f} / {vb['in_loop_samples_per_s']:.2f}"),
                 row("cache_speedup (encoder)", f"{vb['cache_speedup']:.2f}"),
                 row("cache_speedup (decode + preprocess + encoder)", f"{vb['cache_speedup_with_decode']:.2f}"),
                 row("cache_speedup bound: 1 + encoder/step FLOPs", f"{vb['cache_speedup_bound']:.2f}")]
    for key, s2 in res["stage2"].items():
        if "error" in s2:
            rows.append(f"stage2  QLoRA step, {key.replace('_', ' ')}: {s2['error']}")
            continue
        mem = s2["memory"]
        rows += [f"stage2  QLoRA step, {key.replace('_', ' ')}, batch {s2['batch']} x {s2['seq_len']}, "
                 f"LoRA r={s2['lora_r']}",
                 row("samples/s", f"{s2['samples_per_s']:.2f}"), row("tokens/s", f"{s2['tokens_per_s']:.0f}"),
                 row("mfu (recomputation not counted)", f"{s2['mfu']:.2f}"),
                 row("peak memory GiB" + (f" (step {mem['step_gib'] * 1024:.0f} MiB)" if "step_gib" in mem
                                          else ""), f"{mem['peak_gib']:.3f}")]
    rows += [f"generate  {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens, batch 1",
             row("time to first token (s)", f"{gen['ttft_s']:.4f}"),
             row("tokens/s with the KV cache", f"{gen['kv_cache']['tokens_per_s']:.1f}"),
             row("tokens/s recomputing the prefix", f"{gen['no_cache']['tokens_per_s']:.1f}"),
             row("kv_speedup", f"{gen['kv_speedup']:.2f}")]
    cs = res.get("course_seconds")
    rows.append("course_seconds (runs/cpu/report.json): "
                + (", ".join(f"{k} {v}" for k, v in cs.items()) if cs else "no cpu course report yet"))
    if res["goals"]:
        rows += ["", "goals:"]
        rows += [f"  {g['goal']:48} {g['value']:.2f} (target {g['target']:g}): "
                 + ("met" if g["met"] else f"MISSED by {g['missed_by']}")
                 + (f"; {g['note']}" if g.get("note") else "") for g in res["goals"]]
    return "\n".join(rows + ["", closing_note(res)])


def closing_note(res: dict[str, Any]) -> str:
    """What limits the figures: the profile of one stage-1 step, and why each missed goal is missed."""
    p = res["stage1"].get("profile")
    lines = ["note: " + (f"matmul kernels take {p['matmul_share']:.0%} of a stage-1 step's kernel time; the rest "
                         f"(norms, activations, dropout, loss, optimizer, copies) keeps mfu below the matmul peak. "
                         f"Top ops by self time: " + ", ".join(f"{k} {v:.0%}" for k, v in p["top_ops"][:6])
                         if p else "run without --no-profile to see where a stage-1 step's time goes")]
    for g in res["goals"]:
        if g["met"]:
            continue
        if g["goal"].startswith("cache_speedup"):
            lines.append("cache_speedup cannot exceed 1 + encoder FLOPs / step FLOPs: the cache removes the "
                         "encoder's forward, not the LM's forward and backward, so the bigger the LM the "
                         "smaller the gain (about 1.01 at Phi-2 scale; what the cache saves there is the "
                         "decode, the preprocessing and the tower's GPU memory).")
        elif g["goal"].startswith("kv_speedup"):
            lines.append("kv_speedup is small when a one-token decode step is bound by per-layer overhead "
                         "(Python, kernel launches, weight reads) rather than by FLOPs.")
        elif g["goal"].startswith("stage1 mfu"):
            lines.append("stage-1 mfu: see the top ops above; small matmuls and Python overhead dominate at "
                         "small shapes (raise the micro-batch).")
        else:
            lines.append("stage-2 memory: lower the micro-batch or max_len, or keep checkpointing on.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python tools/bench_stages.py [--shape auto|gpu|cpu|tiny] [--out PATH]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="auto", choices=("auto", *SHAPES))
    ap.add_argument("--smallest", action="store_true", help="same as --shape tiny")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--out", default=None, help="where to write bench.json (default runs/bench/bench.json)")
    ap.add_argument("--no-vit-b32", action="store_true", help="skip stage 1 with the full ViT-B/32 tower")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    args = ap.parse_args(argv)
    res = run_bench("tiny" if args.smallest else args.shape, args.device, args.out,
                    vit_b32=False if args.no_vit_b32 else None, profile_ops=not args.no_profile)
    print("\n" + format_table(res) + f"\n\nwritten: {res['path']}  ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
