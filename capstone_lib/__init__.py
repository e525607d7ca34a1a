"""capstone_lib: the library behind the course "build a multimodal GPT from scratch"."""
from __future__ import annotations

import os

# The cpu/smoke profiles never need a model or dataset hub, so the hub is switched off for
# them (unless CAPSTONE_ONLINE=1); GPU profiles and `auto` (Colab) download what they need.
_ONLINE = os.environ.get("CAPSTONE_ONLINE") == "1" or os.environ.get("CAPSTONE_PROFILE", "auto") not in (
    "smoke", "cpu")
for _k, _v in {} if _ONLINE else {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from .profiles import Profile, get_profile  # noqa: E402

__all__ = ["Profile", "get_profile"]
