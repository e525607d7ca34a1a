"""Small file helpers every stage uses: JSON written atomically, JSON read leniently."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written).

    ``dumps`` go to ``json.dumps`` (e.g. ``indent=2``); text is UTF-8.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, **dumps), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json_or_none(path: str | Path) -> Any:
    """The JSON in ``path``, or None when it is missing or not valid JSON (the caller rebuilds it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
