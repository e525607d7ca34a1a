"""capstone_lib: the library behind the course "build a multimodal GPT from scratch"."""
from __future__ import annotations

import os

# No model or dataset hub is needed by the cpu/smoke profiles; GPU profiles unset these.
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from .profiles import Profile, get_profile  # noqa: E402

__all__ = ["Profile", "get_profile"]
