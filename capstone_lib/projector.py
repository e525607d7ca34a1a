"""The projector: maps frozen vision-tower patch features into the language model's embedding space.

Three variants, all taking ``(B, N, D_vision)`` and returning ``(B, N, D_text)``:

* ``linear``      one ``nn.Linear`` (LLaVA-1.0).
* ``resblock``    the earlier capstone write-up: ``Linear`` then a ``SimpleResBlock``
                  (LayerNorm, then ``x + MLP(x)``).
* ``mlp2x_gelu``  ``Linear -> GELU -> Linear`` (LLaVA-1.5, the default). Its submodules are
                  named ``linear_1``, ``act``, ``linear_2`` exactly as transformers'
                  ``LlavaMultiModalProjector``, so its state dict loads into a Llava checkpoint.

The same module is used in training and in inference: the earlier attempt trained one
projector and generated with another (a residual block commented out in one place only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .fileio import write_json_atomic

PROJECTOR_KINDS = ("linear", "resblock", "mlp2x_gelu")


class LinearProjector(nn.Module):
    """One linear map from vision width to text width."""

    kind = "linear"

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, text_dim)

    def forward(self, features: Tensor) -> Tensor:
        """Project ``(B, N, D_v)`` features to ``(B, N, D_t)``."""
        return self.proj(features)


class SimpleResBlock(nn.Module):
    """LayerNorm, then a residual two-layer MLP: ``y = norm(x); return y + mlp(y)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the normalised residual MLP (shape preserved)."""
        x = self.pre_norm(x)
        return x + self.proj(x)


class ResBlockProjector(nn.Module):
    """The earlier write-up's projector: ``Linear(v, t)`` followed by ``SimpleResBlock(t)``."""

    kind = "resblock"

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, text_dim)
        self.block = SimpleResBlock(text_dim)

    def forward(self, features: Tensor) -> Tensor:
        """Project then refine ``(B, N, D_v)`` -> ``(B, N, D_t)``."""
        return self.block(self.proj(features))


class MLP2xGELUProjector(nn.Module):
    """LLaVA-1.5's projector, laid out exactly like ``transformers``' ``LlavaMultiModalProjector``."""

    kind = "mlp2x_gelu"

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()          # exact (erf) GELU == transformers' ACT2FN["gelu"]
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, features: Tensor) -> Tensor:
        """``linear_2(gelu(linear_1(x)))`` on ``(B, N, D_v)`` -> ``(B, N, D_t)``."""
        return self.linear_2(self.act(self.linear_1(features)))


_BUILDERS = {"linear": LinearProjector, "resblock": ResBlockProjector, "mlp2x_gelu": MLP2xGELUProjector}


def build_projector(kind: str, vision_dim: int, text_dim: int) -> nn.Module:
    """Build the projector ``kind`` (one of ``PROJECTOR_KINDS``) from vision width to text width."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown projector kind {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}")
    if vision_dim <= 0 or text_dim <= 0:
        raise ValueError(f"projector widths must be positive, got vision_dim={vision_dim}, text_dim={text_dim}")
    return _BUILDERS[kind](vision_dim, text_dim)


def projector_kind(module: nn.Module) -> str:
    """The kind a projector was built as (``mlp2x_gelu`` for a bare Llava-layout module)."""
    kind = getattr(module, "kind", None)
    if kind in PROJECTOR_KINDS:
        return kind
    names = {name for name, _ in module.named_children()}
    return "mlp2x_gelu" if {"linear_1", "act", "linear_2"} <= names else type(module).__name__


def save_projector(projector: nn.Module, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``projector.safetensors`` and ``projector.json`` (kind, dims, encoder) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    save_file(state, out / "projector.safetensors.tmp")
    (out / "projector.safetensors.tmp").replace(out / "projector.safetensors")
    write_json_atomic(out / "projector.json", meta, indent=2)
    return out


def load_projector(out_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the projector saved by ``save_projector`` and load its weights (strict)."""
    out = Path(out_dir)
    meta = json.loads((out / "projector.json").read_text())
    projector = build_projector(meta["kind"], meta["vision_dim"], meta["text_dim"])
    projector.load_state_dict(load_file(out / "projector.safetensors"), strict=True)
    return projector, meta
