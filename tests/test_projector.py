"""Projector variants: shapes, gradients, the Llava layout, and the earlier write-up's resblock."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from capstone_lib.projector import PROJECTOR_KINDS, build_projector, projector_kind


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_shapes_and_gradients(kind):
    torch.manual_seed(0)
    proj = build_projector(kind, vision_dim=24, text_dim=32)
    x = torch.randn(3, 16, 24, requires_grad=True)
    y = proj(x)
    assert y.shape == (3, 16, 32)
    assert projector_kind(proj) == kind
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{kind}: no gradient reaches {name}"


def test_patches_are_projected_independently():
    """A projector acts per patch: changing one patch changes only that output row."""
    torch.manual_seed(0)
    for kind in PROJECTOR_KINDS:
        proj = build_projector(kind, 24, 32)
        x = torch.randn(1, 5, 24)
        x2 = x.clone()
        x2[0, 2] += 1.0
        diff = (proj(x2) - proj(x)).abs().sum(-1)[0]
        assert diff[2] > 0 and torch.count_nonzero(diff) == 1, kind


def test_mlp2x_gelu_loads_into_llava_projector():
    from transformers import CLIPVisionConfig, GPTNeoXConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    ours = build_projector("mlp2x_gelu", 24, 32)
    assert [n for n, _ in ours.named_children()] == ["linear_1", "act", "linear_2"]
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=24).to_dict(),
                         text_config=GPTNeoXConfig(hidden_size=32, num_attention_heads=2).to_dict(),
                         projector_hidden_act="gelu", multimodal_projector_bias=True)
    theirs = LlavaMultiModalProjector(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 16, 24)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)


def test_resblock_is_linear_then_normalised_residual_mlp():
    """The seed write-up's SimpleResBlock: y = LayerNorm(Linear(x)); out = y + MLP(y)."""
    torch.manual_seed(0)
    proj = build_projector("resblock", 24, 32)
    x = torch.randn(2, 4, 24)
    y = nn.functional.layer_norm(proj.proj(x), (32,), proj.block.pre_norm.weight, proj.block.pre_norm.bias)
    mlp = proj.block.proj
    expected = y + mlp[2](nn.functional.gelu(mlp[0](y)))
    torch.testing.assert_close(proj(x), expected)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="mlp3x") as err:
        build_projector("mlp3x", 24, 32)
    for kind in PROJECTOR_KINDS:
        assert kind in str(err.value)
    with pytest.raises(ValueError, match="positive"):
        build_projector("linear", 0, 32)
