"""Precision as a profile setting: ``auto`` resolves from the machine, and every stage follows it."""
from __future__ import annotations

import pytest
import torch

from capstone_lib import precision
from capstone_lib.profiles import get_profile


def test_auto_on_a_cpu_follows_its_bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AVX512-BF16")
    assert precision.resolve("auto", "cpu") == ("bf16", "auto; this CPU multiplies bf16 natively: AVX512-BF16")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    chosen, reason = precision.resolve("auto", "cpu")
    assert chosen == "fp32" and "no native bf16" in reason       # a laptop without bf16 units stays fp32


def test_auto_on_a_gpu_without_bf16_is_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve("auto", "cuda")[0] == "fp16"


def test_explicit_settings_are_kept_and_bad_ones_named():
    assert precision.resolve("fp32", "cpu") == ("fp32", "set in the profile")
    with pytest.raises(ValueError, match="runtime.precision must be one of"):
        precision.resolve("bfloat16", "cpu")


def test_profile_resolves_auto_once_and_litgpt_follows(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    p = get_profile("cpu")
    assert (p.runtime.precision, p.runtime.precision_setting, p.pretrain.precision) == ("bf16", "auto", "bf16-mixed")
    assert "AMX" in precision.describe(p.runtime)
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    p = get_profile("cpu")
    assert (p.runtime.precision, p.pretrain.precision) == ("fp32", "32-true")
    assert get_profile("cpu", runtime={"precision": "fp32"}).runtime.precision == "fp32"


def test_cpu_bf16_keeps_fp32_weights_and_eager_attention():
    assert precision.storage_dtype("bf16", "cpu") == torch.float32
    assert precision.storage_dtype("bf16", "cuda") == torch.bfloat16
    assert precision.attention_implementation("bf16", "cpu") == "eager"
    assert precision.attention_implementation("fp32", "cpu") == "sdpa"
    assert precision.attention_implementation("bf16", "cuda") == "sdpa"


def test_autocast_runs_linear_layers_in_bf16():
    layer = torch.nn.Linear(8, 4)
    with precision.autocast("bf16", "cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_tiny_clip_learns_in_bf16():
    """The contrastive loss stays fp32 under bf16 towers: a tiny CLIP's loss falls as in fp32."""
    from transformers import CLIPConfig, CLIPModel

    from capstone_lib.tiny_clip import fit_tiny_clip, train_caption_tokenizer

    colours = ["red", "green", "blue", "yellow"]
    captions = [[f"a {c} square"] for c in colours]
    tok = train_caption_tokenizer([c[0] for c in captions], max_length=8)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id),
                        vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    model = CLIPModel(config)
    pixels = torch.zeros(4, 3, 8, 8)
    for i in range(4):
        pixels[i, i % 3] = 1.0 + i // 3          # one distinct image per colour
    losses = fit_tiny_clip(model, tok, pixels, captions, steps=60, batch_size=4, lr=1e-2, precision="bf16")
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert model.config._attn_implementation == "sdpa"      # restored for saving and inference
