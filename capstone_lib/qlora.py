"""QLoRA: the language model in 4-bit NF4 with trainable LoRA adapters (peft + bitsandbytes)."""
from __future__ import annotations

from pathlib import Path

import torch

from .profiles import Profile

def load_base_lm(profile: Profile, name_or_path: str | Path, tokenizer=None):
    """The base LM for stage 2: 4-bit NF4 with double quantization when the profile says so.

    With ``tokenizer``, the embedding table grows when ``<image>`` lies past it (SmolLM2).

    ``lm_tuning.tune_language_model`` swaps in a fused tanh GELU (Phi-2's ``gelu_new``; same
    function). Dropout stays on here: the LoRA layers inside the LM are trained.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .distributed import resolve_device
    from .precision import attention_implementation, compute_dtype, storage_dtype

    runtime = profile.runtime
    dtype = compute_dtype(runtime.precision)
    kwargs = {"dtype": storage_dtype(runtime.precision, runtime.device),
              "attn_implementation": attention_implementation(runtime.precision, runtime.device),
              "device_map": {"": resolve_device(runtime.device)}}
    if profile.stage2.quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    from .lm_tuning import tune_language_model

    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    if tokenizer is not None:
        from .language_model import fit_embeddings
        fit_embeddings(model, tokenizer)
    tune_language_model(model)
    return model


def add_lora(profile: Profile, model):
    """Prepare a (4-bit) model for training and wrap it with fresh LoRA adapters from the profile.

    The targets are the LM spec's (``lm.lora_targets``); one that matches no module is an error
    (``lm_spec.check_lora_targets``), where peft would silently adapt fewer modules.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from .lm_spec import check_lora_targets, lm_spec

    s2 = profile.stage2
    targets = lm_spec(profile).lora_targets
    check_lora_targets(model, targets)
    if s2.quantize_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s2.gradient_checkpointing)
    elif s2.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(r=s2.lora_r, lora_alpha=s2.lora_alpha, lora_dropout=s2.lora_dropout,
                        target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_qlora_model(profile: Profile, name_or_path: str | Path, tokenizer=None):
    """Base LM (4-bit per profile) + trainable LoRA adapters: the stage-2 language model."""
    torch.manual_seed(profile.runtime.seed)
    return add_lora(profile, load_base_lm(profile, name_or_path, tokenizer))


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable LoRA weights (everything else in the LM stays frozen)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]

