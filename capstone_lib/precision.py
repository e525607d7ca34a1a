"""The number format training computes in: ``fp32``, ``bf16`` or ``fp16``, or ``auto`` (from the machine).

``auto`` picks bf16 autocast where the hardware multiplies bf16 natively (a CUDA card of
compute capability 8+, or a CPU with AVX512-BF16 / AMX), fp16 with a gradient scaler on an
older card (T4), and fp32 on any other CPU, where bf16 would be emulated and slower.
``get_profile`` resolves it once, so every stage reads a concrete value; ``describe`` says why.

On a CPU, weights stay stored in fp32 and autocast runs the matrix products in bf16 (about 2x
faster per product here, measured in ``make bench``). Attention then uses the plain
("eager") implementation: PyTorch's fused CPU attention is ~4x slower backwards in bf16 than in
fp32 at the course's sizes, which cancels the gain (``attention_implementation``).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
SETTINGS = PRECISIONS + ("auto",)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# LitGPT's --precision for each: bf16 autocast with fp32 weights, or plain fp32.
LITGPT_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix instructions as torch reports them ("AMX", "AVX512-BF16"), else None."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
    except (AttributeError, RuntimeError):     # an older torch without these probes
        return None
    return None


def resolve(setting: str, device: str) -> tuple[str, str]:
    """``(precision, reason)`` for a profile's ``runtime.precision`` setting on ``device``."""
    if setting not in SETTINGS:
        raise ValueError(f"runtime.precision must be one of {SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting, "set in the profile"
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", f"auto; the {torch.cuda.get_device_name(0)} has bf16"
        return "fp16", "auto; no bf16 on this GPU (or none visible): fp16 with a gradient scaler"
    if device == "cpu":
        units = cpu_bf16_units()
        if units:
            return "bf16", f"auto; this CPU multiplies bf16 natively: {units}"
        return "fp32", "auto; this CPU has no native bf16 units, where bf16 would be slower"
    return "fp32", f"auto; fp32 on {device}"


def storage_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype frozen weights are stored in: the compute dtype on a GPU, fp32 on a CPU (autocast casts)."""
    return torch.float32 if device == "cpu" else _DTYPES[precision]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matrix products run in."""
    return _DTYPES[precision]


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def attention_implementation(precision: str, device: str) -> str:
    """``eager`` for bf16 on a CPU (see the module docstring), ``sdpa`` otherwise."""
    return "eager" if device == "cpu" and precision != "fp32" else "sdpa"


def describe(runtime: Any) -> str:
    """One line for a stage's plan: the precision and why it was chosen."""
    reason = getattr(runtime, "precision_reason", "set in the profile")
    kind = "fp32" if runtime.precision == "fp32" else f"{runtime.precision} autocast"
    return f"precision: {kind} ({reason})"
