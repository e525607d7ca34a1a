"""The language model stages 1-2 use: notebook 01's, converted to transformers, or the LM spec's hub model.

``ensure_language_model`` returns where it is (pretraining and converting notebook 01's model
first when it is missing); ``load_language_model`` loads it with its tokenizer, ``<image>``
added and the embedding table grown to hold it (``fit_embeddings``), checked against the LM spec.
``convert_to_hf`` turns a LitGPT checkpoint into a ``GPTNeoXForCausalLM`` folder with LitGPT's
own converter.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .pretrain import PretrainResult, load_summary, pretrain_paths, run_pretraining
from .profiles import Profile
from .tokenizer import load_tokenizer

HF_MANIFEST = "capstone_hf.json"


# ----------------------------------------------------------------------------- conversion
def hf_config_from_lit(config, eos_token_id: int | None = None):
    """The ``GPTNeoXConfig`` of a Pythia-style LitGPT config (other architectures are refused)."""
    from transformers import GPTNeoXConfig

    unsupported = {"mlp_class_name": (config.mlp_class_name, "GptNeoxMLP"),
                   "norm_class_name": (config.norm_class_name, "LayerNorm"),
                   "n_query_groups": (config.n_query_groups, config.n_head),
                   "lm_head_bias": (config.lm_head_bias, False), "bias": (config.bias, True),
                   "rope_interleave": (config.rope_interleave, False)}
    bad = {k: v for k, (v, want) in unsupported.items() if v != want}
    if bad:
        raise ValueError(f"{config.name}: not a GPT-NeoX/Pythia architecture ({bad})")
    rope = {"rope_type": "default", "rope_theta": float(config.rope_base),
            "partial_rotary_factor": config.rotary_percentage}
    return GPTNeoXConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        intermediate_size=config.intermediate_size,
        hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
        max_position_embeddings=config.block_size, layer_norm_eps=config.norm_eps,
        use_parallel_residual=config.parallel_residual, rope_parameters=rope,
        rotary_pct=config.rotary_percentage, attention_bias=True, tie_word_embeddings=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        architectures=["GPTNeoXForCausalLM"],
    )


def convert_to_hf(checkpoint_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
                  info: dict[str, Any] | None = None) -> Path:
    """Convert a LitGPT checkpoint into a transformers directory (safetensors + tokenizer).

    LitGPT's ``convert_lit_checkpoint`` renames the weights; we add the ``GPTNeoXConfig``,
    load them strictly, and save. Written to a temporary folder and renamed, with
    ``capstone_hf.json`` written last, so a partial directory is never taken for a model.
    """
    import torch
    from litgpt import Config
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from transformers import GPTNeoXForCausalLM

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()):      # it pprints its arguments
        convert_lit_checkpoint(checkpoint_dir, tmp)
    state = torch.load(tmp / "model.pth", map_location="cpu", weights_only=True)
    (tmp / "model.pth").unlink()
    tokenizer = load_tokenizer(tokenizer_dir)
    config = hf_config_from_lit(Config.from_file(checkpoint_dir / "model_config.yaml"),
                                tokenizer.eos_token_id)
    model = GPTNeoXForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    manifest = {"source_checkpoint": str(checkpoint_dir), "converter": "litgpt.convert_lit_checkpoint",
                **(info or {})}
    (tmp / HF_MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def hf_complete(path: str | Path) -> bool:
    """True when ``path`` holds a finished conversion (its manifest is written last)."""
    path = Path(path)
    return all((path / f).is_file() for f in (HF_MANIFEST, "config.json", "model.safetensors",
                                              "tokenizer.json"))


# ----------------------------------------------------------------------------- hand-off
def export_language_model(profile: Profile, result: PretrainResult | None = None) -> Path:
    """Convert the profile's final LitGPT checkpoint into ``runs/<profile>/pretrain/hf/``."""
    paths = pretrain_paths(profile)
    final = paths.lit / "final"
    if not (final / "lit_model.pth").is_file():
        raise FileNotFoundError(f"no final checkpoint in {paths.lit}: run run_pretraining first")
    summary = load_summary(paths)
    info = {"profile": profile.name, "initial_val_loss": summary.get("initial_val_loss"),
            "final_val_loss": summary.get("final_val_loss")}
    return convert_to_hf(final, paths.tokenizer, paths.hf, info)


def ensure_language_model(profile: Profile) -> str | Path:
    """The language model for notebooks 03-05: a hub id on GPU profiles, else the local HF dir.

    On cpu/smoke, pretrains (resuming if interrupted) and converts when the directory is
    missing or incomplete.
    """
    from .lm_spec import lm_spec

    spec = lm_spec(profile)
    if spec.hub_id:
        return spec.hub_id
    paths = pretrain_paths(profile)
    if hf_complete(paths.hf):
        return paths.hf
    if not (paths.lit / "final" / "lit_model.pth").is_file():
        print(f"no language model from notebook 01 in {paths.root}: pretraining it now "
              f"({profile.pretrain.max_tokens:,} tokens; it resumes if interrupted)")
        run_pretraining(profile)
    return export_language_model(profile)


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embedding table when the tokenizer's ``<image>`` got an id past it; True if grown.

    SmolLM2's 49,152 rows are all in use, so ``<image>`` becomes row 49,152; Phi-2 and Qwen2.5
    have spare rows. The new row is never read as an input (image patches are written over
    it); it is zero, so every loader (training, export, the assistant) gets the same model.
    """
    rows = max(tokenizer.get_vocab().values()) + 1
    if rows <= model.get_input_embeddings().num_embeddings:
        return False
    grow_embeddings(model, rows)
    return True


def grow_embeddings(model, rows: int) -> None:
    """Resize the input (and an untied output) embedding to ``rows``; the added rows are zero."""
    import torch

    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].zero_()
        head = model.get_output_embeddings()
        if head is not None:
            head.weight[old:].zero_()
            if getattr(head, "bias", None) is not None:
                head.bias[old:].zero_()


def load_language_model(profile: Profile, dtype=None, attn_implementation: str | None = None):
    """``(AutoModelForCausalLM, tokenizer)`` of the profile's LM spec, ``<image>`` added, checked.

    ``attn_implementation`` (e.g. ``"eager"``) overrides transformers' default attention.

    The embeddings are resized only if ``<image>`` got an id outside the model's vocabulary.
    ``tune_language_model`` swaps in a fused tanh GELU (Phi-2's ``gelu_new``; same function) and
    keeps half-precision LayerNorms out of autocast's fp32 round trip.
    """
    from transformers import AutoModelForCausalLM

    import torch

    from .lm_spec import lm_spec

    source = ensure_language_model(profile)
    local = Path(str(source)).is_dir()
    tokenizer = load_tokenizer(source, lm_spec(profile))
    kwargs = {"local_files_only": True} if local else {}
    # An explicit dtype: transformers 5 would otherwise load the checkpoint's own (fp16/bf16),
    # which runs slowly, or not at all, on a CPU.
    kwargs["dtype"] = dtype if dtype is not None else torch.float32
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    fit_embeddings(model, tokenizer)
    from .lm_tuning import tune_language_model

    tune_language_model(model)
    return model, tokenizer
