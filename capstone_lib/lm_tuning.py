"""Speed levers for the course's transformers LM (Phi-2 on GPU): same function, fewer kernels.

``tune_language_model`` is applied by every loader of the LM (``language_model.load_language_model``,
``qlora.load_base_lm``), by stage 1 to its frozen LM and by the bench, so the bench times the
real path. ``CAPSTONE_LM_TUNING`` picks the levers (``none``: the untouched model).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

LM_TUNING_ENV = "CAPSTONE_LM_TUNING"
LM_TUNING_LEVERS = ("gelu", "dropout", "layernorm")
LM_TUNING_DEFAULT = LM_TUNING_LEVERS      # all of them unless $CAPSTONE_LM_TUNING says otherwise


def lm_tuning_levers() -> tuple[str, ...]:
    """The levers ``tune_language_model`` applies: ``$CAPSTONE_LM_TUNING`` or the default.

    The variable takes a comma-separated list of ``LM_TUNING_LEVERS``, or ``none`` (the
    untouched model: how the bench measures the "before" figures).
    """
    raw = os.environ.get(LM_TUNING_ENV)
    if raw is None:
        return LM_TUNING_DEFAULT
    names = tuple(n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in LM_TUNING_LEVERS]
    if unknown:
        raise ValueError(f"{LM_TUNING_ENV}={raw!r}: unknown lever(s) {unknown}; "
                         f"choose from {', '.join(LM_TUNING_LEVERS)} or none")
    return names


@functools.lru_cache(maxsize=None)
def _autocast_free_layer_norm():
    import torch
    from torch import nn

    class AutocastFreeLayerNorm(nn.LayerNorm):
        """A LayerNorm that runs in its half-precision weights' dtype even under autocast.

        Autocast runs ``layer_norm`` in fp32 and returns fp32, which every following matmul
        then casts back to bf16/fp16 on its own. The half-precision kernel accumulates in
        fp32 as well and rounds its output once.
        """

        def forward(self, x):
            if x.dtype == self.weight.dtype and torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    return super().forward(x)
            return super().forward(x)

    return AutocastFreeLayerNorm


def tune_language_model(model, frozen: bool = False, levers: Sequence[str] | None = None) -> dict[str, int]:
    """Make a transformers causal LM cheaper to run, in place; returns what changed (counts).

    Used by every loader of the course's LM (``load_language_model``, ``qlora.load_base_lm``),
    by stage 1 on its frozen LM (``frozen=True``) and by the bench, so the bench times the
    real path. ``levers`` defaults to ``lm_tuning_levers()``.

    * ``gelu``: each ``NewGELUActivation`` (``hidden_act="gelu_new"``: Phi-2, GPT-2) becomes
      transformers' ``gelu_pytorch_tanh``: the same tanh approximation as one fused kernel
      instead of eight elementwise operators, which autocast also ran in fp32 (``pow``) with
      casts back. The config is left as it is (saved and exported models are unchanged).
      An exact GELU (``"gelu"``, the course's cpu GPT-NeoX) is not touched.
    * ``dropout`` (only with ``frozen=True``): dropout off (``p=0``) in a frozen LM, as in
      LLaVA's stage 1 (its Vicuna has no dropout). Phi-2 ships ``resid_pdrop=0.1``; a model
      whose dropout is already 0 is unchanged.
    * ``layernorm``: a LayerNorm whose weights are bf16/fp16 (the GPU profiles load the LM in
      the compute dtype) runs in that dtype under autocast instead of in fp32 with an fp32
      output that each following matmul casts back on its own (q, k, v and fc1: four casts a
      layer). Its kernel accumulates in fp32 too; only matmuls read its output in Phi-2. fp32
      LayerNorms (the cpu course, stage 2's ``prepare_model_for_kbit_training``) are untouched.

    On an H100 at the bench's Phi-2 shape the three took a stage-1 step from 238 to 139 ms
    (docs/PERFORMANCE.md); in bf16 under autocast the logits of a 4-layer Phi-2 were bit-identical.
    """
    import torch
    from torch import nn
    from transformers.activations import ACT2FN, NewGELUActivation

    levers = lm_tuning_levers() if levers is None else tuple(levers)
    changed = {"gelu": 0, "dropout": 0, "layernorm": 0}
    if "gelu" in levers:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is NewGELUActivation:
                    setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
                    changed["gelu"] += 1
    if "dropout" in levers and frozen:
        for module in model.modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                module.p = 0.0
                changed["dropout"] += 1
            if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
                module.attention_dropout = 0.0     # attention modules that pass it to SDPA
                changed["dropout"] += 1
    if "layernorm" in levers:
        cls = _autocast_free_layer_norm()
        for module in model.modules():
            if type(module) is nn.LayerNorm and module.weight is not None and \
                    module.weight.dtype in (torch.bfloat16, torch.float16):
                module.__class__ = cls
                changed["layernorm"] += 1
    return changed
