"""``lm_tuning.tune_language_model``: the speed levers leave the function the LM computes as it was."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from capstone_lib.lm_tuning import LM_TUNING_DEFAULT, LM_TUNING_ENV, lm_tuning_levers, tune_language_model


def tiny_phi(**overrides):
    """A random 2-layer Phi with Phi-2's activation and dropout (``gelu_new``, ``resid_pdrop`` 0.1)."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, partial_rotary_factor=0.5, vocab_size=128, hidden_act="gelu_new",
               resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, max_position_embeddings=64)
    torch.manual_seed(0)
    return PhiForCausalLM(PhiConfig(**{**cfg, **overrides})).float()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fused_gelu_is_the_same_function():
    from transformers.activations import ACT2FN, GELUActivation, NewGELUActivation

    x = torch.linspace(-12, 12, 200_001, dtype=torch.float32)
    diff = (NewGELUActivation()(x) - ACT2FN["gelu_pytorch_tanh"](x)).abs().max().item()
    assert diff < 1e-5
    # the exact GELU ("gelu") is a different function: it must never be swapped
    assert (GELUActivation()(x) - NewGELUActivation()(x)).abs().max().item() > 1e-4


def test_phi_gelu_swap_keeps_the_outputs_and_the_config():
    from transformers.activations import NewGELUActivation

    lm = tiny_phi().eval()
    ref = copy.deepcopy(lm)
    changed = tune_language_model(lm, levers=("gelu",))
    assert changed["gelu"] == 2                                   # one per decoder layer
    assert not any(isinstance(m, NewGELUActivation) for m in lm.modules())
    assert lm.config.hidden_act == "gelu_new"                     # what is saved stays Phi-2's
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(1))
    assert (logits(lm, ids) - logits(ref, ids)).abs().max().item() < 1e-5
    assert tune_language_model(lm, levers=("gelu",))["gelu"] == 0  # idempotent


def test_dropout_goes_off_only_in_a_frozen_lm():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    lm = tiny_phi()
    assert tune_language_model(lm, frozen=False, levers=("gelu", "dropout"))["dropout"] == 0
    lm.train()
    torch.manual_seed(3)
    a = logits(lm, ids)
    assert not torch.equal(a, logits(lm, ids))                    # stage 2: dropout still on

    changed = tune_language_model(lm, frozen=True, levers=("gelu", "dropout"))
    assert changed["dropout"] == 2                                 # resid_dropout of each layer
    lm.train()                                                     # the trainer's mode
    assert torch.equal(logits(lm, ids), logits(lm, ids))
    assert torch.allclose(logits(lm, ids), logits(lm.eval(), ids), atol=1e-6)


def test_the_cpu_course_lm_is_left_as_it_is():
    """The cpu profile's GPT-NeoX uses the exact GELU and no dropout: nothing to change."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, hidden_act="gelu", rotary_pct=0.25, max_position_embeddings=64)
    torch.manual_seed(0)
    lm = GPTNeoXForCausalLM(cfg)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    kinds = [type(m) for m in lm.modules()]
    assert tune_language_model(lm, frozen=True, levers=("gelu", "dropout", "layernorm")) == \
        {"gelu": 0, "dropout": 0, "layernorm": 0}
    assert [type(m) for m in lm.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())


def test_layernorm_lever_only_touches_half_precision_norms():
    lm = tiny_phi()
    assert tune_language_model(lm, levers=("layernorm",))["layernorm"] == 0     # fp32: untouched
    half = tiny_phi().to(torch.bfloat16)
    assert tune_language_model(half, levers=("layernorm",))["layernorm"] == 3   # 2 layers + final
    norm = half.model.final_layernorm
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = nn.functional.layer_norm(x.float(), (64,), norm.weight.float(), norm.bias.float(), norm.eps)
    assert (y.float() - ref).abs().max().item() < 0.05


def test_levers_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(LM_TUNING_ENV, raising=False)
    assert lm_tuning_levers() == LM_TUNING_DEFAULT
    monkeypatch.setenv(LM_TUNING_ENV, "none")
    assert lm_tuning_levers() == ()
    lm = tiny_phi()
    assert tune_language_model(lm, frozen=True) == {"gelu": 0, "dropout": 0, "layernorm": 0}
    monkeypatch.setenv(LM_TUNING_ENV, "gelu, dropout")
    assert lm_tuning_levers() == ("gelu", "dropout")
    monkeypatch.setenv(LM_TUNING_ENV, "gelu,fast")
    with pytest.raises(ValueError, match="fast"):
        lm_tuning_levers()


def test_the_bench_lm_goes_through_the_same_levers(monkeypatch):
    """The bench times the course's path: its random Phi-2 is tuned as the loader tunes the real one."""
    from transformers.activations import NewGELUActivation

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import bench_stages as bench

    monkeypatch.delenv(LM_TUNING_ENV, raising=False)
    lm = bench.random_phi(bench.SHAPES["tiny"], torch.float32, torch.device("cpu"))
    assert not any(isinstance(m, NewGELUActivation) for m in lm.modules())
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in lm.modules())   # off only once frozen
    monkeypatch.setenv(LM_TUNING_ENV, "none")
    lm = bench.random_phi(bench.SHAPES["tiny"], torch.float32, torch.device("cpu"))
    assert any(isinstance(m, NewGELUActivation) for m in lm.modules())
