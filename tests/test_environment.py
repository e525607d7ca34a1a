"""The pins are stated once in requirements.txt/constraints.txt; environment.yml must agree."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _reqs(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[=<>!~\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
            out[name] = line.replace(" ", "")
    return out


def test_environment_yml_matches_pins():
    pip = _reqs((ROOT / "requirements.txt").read_text().splitlines())
    pip.update(_reqs((ROOT / "constraints.txt").read_text().splitlines()))
    env_lines, in_pip = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            in_pip = True
            continue
        if in_pip and line.strip().startswith("- "):
            env_lines.append(line.strip()[2:])
    assert _reqs(env_lines) == pip


def test_torch_is_pinned_and_never_pulled_unpinned():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        assert not line.strip().startswith(("torch", "torchvision", "torchaudio")), line


def test_colab_requirements_are_a_subset_of_the_pins_without_kernel_packages():
    """Colab installs only what the course needs, at the same pins, never the kernel's own packages."""
    pins = _reqs((ROOT / "requirements.txt").read_text().splitlines())
    colab = _reqs((ROOT / "requirements-colab.txt").read_text().splitlines())
    assert colab and set(colab.items()) <= set(pins.items()), set(colab.items()) - set(pins.items())
    assert not {"numpy", "ipykernel", "ipywidgets", "matplotlib", "pillow", "tqdm", "torch"} & set(colab)
    setup = (ROOT / "tools" / "nb.py").read_text()
    assert "-r requirements-colab.txt" in setup and "-r requirements.txt" not in setup
