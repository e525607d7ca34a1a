"""Which data a profile trains on: ShapesWorld (generated) or the real COCO / LLaVA-Instruct view."""
from __future__ import annotations

from typing import Any


def dataset_paths(profile: Any) -> Any:
    """ShapesWorld paths when ``profile.data.source == "shapesworld"``, else the real data view.

    Either way the result has the same attributes (``coco_root``, ``llava_train``, ``train_images``
    ...), so every stage reads both through the same loaders.
    """
    if profile.data.source == "shapesworld":
        from .shapesworld import ensure_shapesworld

        return ensure_shapesworld(profile)
    if profile.data.source != "real":
        raise ValueError(f"data.source must be 'shapesworld' or 'real', got {profile.data.source!r}")
    from .real_data import ensure_real_data

    return ensure_real_data(profile)
