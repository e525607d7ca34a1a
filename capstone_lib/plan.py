"""A plan before every long stage: what it will do, and roughly how long and how much memory.

Before pretraining, feature caching, stage 1 and stage 2 the library prints one plan: samples,
steps, tokens, and on a known GPU an estimate of the time (from the FLOPs and the model-FLOPs
utilisation the bench measured, docs/PERFORMANCE.md) and of the peak memory. A profile that
cannot run on the card found stops here with a message saying what to do instead, rather than
hours later: the ``a100`` profile on a card without bf16 or with too little memory, a CUDA
profile without a GPU.

The estimates are rough (within a factor of ~2): they are there to tell 20 minutes from 8 hours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .precision import describe

GIB = 1 << 30
# Dense bf16/fp16 tensor-core peak, TFLOP/s, by the name torch reports; and fp32 (no tensor cores).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "A10": 125.0, "L4": 121.0,
               "V100": 125.0, "T4": 65.0}
PEAK_TFLOPS_FP32 = {"H200": 67.0, "H100": 67.0, "A100": 19.5, "L40": 90.0, "A10": 31.0, "L4": 30.0,
                    "V100": 15.7, "T4": 8.1}
# Model-FLOPs utilisation measured by the bench (H100, Phi-2 shape; docs/PERFORMANCE.md): stage 1
# (frozen LM, projector only) 0.45-0.50; stage 2 (4-bit + LoRA) 0.09-0.10, 0.06-0.07 with gradient
# checkpointing. Pretraining and feature caching were not measured on a GPU: 0.3 is assumed.
MFU = {"pretrain": 0.3, "features": 0.3, "stage1": 0.45, "stage2": 0.09, "stage2_checkpointing": 0.065}


class PlanError(RuntimeError):
    """The profile cannot run on the device found (no GPU, no bf16, not enough memory)."""


@dataclass
class Device:
    """The device a profile will run on, as far as the plan needs it."""

    kind: str                       # "cuda" or "cpu"
    name: str
    memory_gib: float | None = None
    bf16: bool = True

    @property
    def peak_tflops(self) -> float | None:
        """Dense half-precision peak of a known GPU (None for a CPU or an unknown card)."""
        return self.peak(half=True)

    def peak(self, half: bool = True) -> float | None:
        """Dense peak TFLOP/s of a known GPU in half precision or in fp32 (None for a CPU or an unknown card)."""
        table = PEAK_TFLOPS if half else PEAK_TFLOPS_FP32
        return next((v for k, v in table.items() if k in self.name), None) if self.kind == "cuda" else None


def find_device(profile: Any) -> Device:
    """The device ``profile.runtime.device`` names, checked: ``PlanError`` if the profile cannot use it."""
    import torch

    runtime = profile.runtime
    if runtime.device == "cpu":
        return Device("cpu", "CPU")
    if not torch.cuda.is_available():
        raise PlanError(f"profile {profile.name!r} runs on CUDA but no GPU is visible: on Colab choose "
                        "Runtime > Change runtime type > GPU, or use CAPSTONE_PROFILE=cpu")
    props = torch.cuda.get_device_properties(0)
    device = Device("cuda", props.name, props.total_memory / GIB, torch.cuda.is_bf16_supported())
    if runtime.precision == "bf16" and not device.bf16:
        raise PlanError(f"profile {profile.name!r} trains in bf16, which the {device.name} does not have: "
                        "use CAPSTONE_PROFILE=t4 (fp16 with a gradient scaler) on this card")
    return device


@dataclass
class StagePlan:
    """What one stage will do and its estimated cost on the device found."""

    stage: str
    device: Device
    samples: int
    steps: int
    tokens: int
    flops: float
    mfu: float = 0.3                 # the utilisation the time estimate assumes
    half: bool = True                # half-precision compute (else fp32: no tensor cores)
    peak_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """Estimated wall time on a known GPU (FLOPs / (peak x measured utilisation))."""
        peak = self.device.peak(self.half)
        if peak is None or not self.flops:
            return None
        return self.flops / (peak * 1e12 * self.mfu)

    def __str__(self) -> str:
        parts = [f"plan for {self.stage} on {self.device.name}: {self.samples:,} samples, {self.steps:,} "
                 f"optimizer steps, {self.tokens:,} tokens"]
        if self.seconds is not None:
            parts.append(f"~{_duration(self.seconds)} (estimate, within ~2x)")
        if self.peak_gib is not None:
            of = f" of {self.device.memory_gib:.0f} GiB" if self.device.memory_gib else ""
            parts.append(f"peak memory ~{self.peak_gib:.1f} GiB{of}")
        return "; ".join(parts) + "".join(f"\n  note: {n}" for n in self.notes)

    def check(self) -> "StagePlan":
        """Raise ``PlanError`` when the estimated peak memory does not fit the card; return self."""
        mem = self.device.memory_gib
        if mem is not None and self.peak_gib is not None and self.peak_gib > 0.92 * mem:
            raise PlanError(f"{self.stage} needs ~{self.peak_gib:.1f} GiB but the {self.device.name} has "
                            f"{mem:.1f} GiB: lower micro_batch_size or max_len, turn on gradient_checkpointing, "
                            "or use the t4 profile on this card")
        return self


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{max(1, round(seconds / 60))} min"


def lm_geometry(config: Any) -> dict[str, int]:
    """Parameter count, width, depth and vocabulary of a transformers LM config (no weights loaded)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    inter = getattr(text, "intermediate_size", None) or 4 * h
    heads = getattr(text, "num_attention_heads", 1)
    kv = getattr(text, "num_key_value_heads", None) or heads        # grouped-query attention: fewer k/v

    gated = getattr(text, "hidden_act", "") in ("silu", "swiglu") or getattr(text, "model_type", "") in ("llama",
                                                                                                       "qwen2", "mistral")
    per_layer = int(h * h * (2 + 2 * kv / heads)) + (3 if gated else 2) * h * inter
    tied = getattr(text, "tie_word_embeddings", False)
    return {"params": layers * per_layer + vocab * h * (1 if tied else 2), "hidden": h, "layers": layers,
            "vocab": vocab, "non_embedding": layers * per_layer}


def plan_training(profile: Any, stage: str, n_samples: int, mean_tokens: float, lm_config: Any,
                  micro_batch_size: int, samples_per_step: int, max_len: int, steps: int,
                  trainable_params: int = 0, quantize_4bit: bool = False,
                  checkpointing: bool = False) -> StagePlan:
    """The plan of stage 1 or 2: FLOPs of forward + backward through the LM and a memory estimate.

    Memory: the frozen weights (bf16/fp16, or ~0.55 bytes a parameter in 4-bit NF4), trainable
    weights with AdamW (16 bytes each), activations of a micro-batch (~34 bytes x width per token
    and layer, one layer's worth with checkpointing) and the fp32 logits (x2 for the loss).
    """
    device = find_device(profile)
    geo = lm_geometry(lm_config)
    tokens = int(steps * samples_per_step * mean_tokens)
    # Frozen LM: forward + input gradients (~4 N per token, the output head included); LoRA adds little.
    flops = 4.0 * (geo["non_embedding"] + geo["vocab"] * geo["hidden"]) * tokens
    weights = geo["params"] * (0.55 if quantize_4bit else 2.0)
    per_token_layer = 34 * geo["hidden"]
    live_layers = 2 if checkpointing else geo["layers"]
    acts = micro_batch_size * max_len * (per_token_layer * live_layers + 2 * geo["hidden"] * geo["layers"])
    logits = micro_batch_size * max_len * geo["vocab"] * 4 * 2
    peak = (weights + 16 * trainable_params + acts + logits) / GIB + 0.6    # + CUDA context and workspace
    mfu = MFU["stage2_checkpointing" if stage == "stage2" and checkpointing else stage]
    plan = StagePlan(stage, device, n_samples, steps, tokens, flops, mfu,
                     peak_gib=peak if device.kind == "cuda" else None)
    plan.notes.append(describe(profile.runtime))
    if checkpointing:
        plan.notes.append("gradient checkpointing on: less memory, ~30% more time")
    if profile.runtime.rehearsal:
        plan.notes.append("rehearsal: random-weight stand-ins at the real names, sizes shrunk")
    return plan


def plan_pretraining(profile: Any, n_params: int, tokens: int) -> StagePlan:
    """The plan of notebook 01's LitGPT run: 6 N FLOPs per token."""
    p = profile.pretrain
    steps = max(1, tokens // max(1, p.global_batch_size * _block_size(profile)))
    half = not str(p.precision).startswith("32")          # LitGPT's "32-true" runs without tensor cores
    plan = StagePlan("pretrain", find_device(profile), tokens // max(1, _block_size(profile)), steps, tokens,
                     6.0 * n_params * tokens, MFU["pretrain"], half=half)
    plan.notes.append(f"LitGPT --precision {p.precision}; {describe(profile.runtime)}")
    return plan


def plan_features(profile: Any, n_images: int, vision_config: Any) -> StagePlan:
    """The plan of the feature cache: one CLIP forward pass per image (2 N FLOPs per patch token)."""
    v = vision_config
    n_tokens = (v.image_size // v.patch_size) ** 2 + 1
    params = v.num_hidden_layers * 12 * v.hidden_size ** 2
    return StagePlan("features", find_device(profile), n_images, 0, n_images * n_tokens,
                     2.0 * params * n_images * n_tokens, MFU["features"])


def _block_size(profile: Any) -> int:
    from .pretrain import lit_config
    return lit_config(profile).block_size

