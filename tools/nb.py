"""Build a course notebook from a list of cells, with the standard badge and setup cell.

Usage from a builder script (e.g. ``tools/build_03.py``)::

    from nb import md, code, write_notebook
    write_notebook("03_projector_coco", "Stage 1: teach a frozen LM to see", [md("..."), code("...")])

Notebooks are committed without outputs; ``make course`` writes executed copies to runs/.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

REPO_URL = "https://github.com/capstone-course/multimodal-gpt"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

SETUP = '''# Setup (one cell). On Colab: clone the course and install what it needs on top of Colab's own
# packages (requirements-colab.txt: never numpy or the kernel's packages; Colab's CUDA torch is held
# by a constraint), then keep runs/ (checkpoints, caches) and the downloaded data on Google Drive,
# so a new runtime resumes where the last one stopped. CAPSTONE_DRIVE=0 keeps them on the runtime.
# Locally `make course` did all this already.
import os, subprocess, sys
if "google.colab" in sys.modules:
    if not os.path.isdir("/content/multimodal-gpt"):
        subprocess.run(
            "git clone -q {repo} /content/multimodal-gpt && cd /content/multimodal-gpt && "
            "python -c 'import torch; print(\\"torch==\\" + torch.__version__)' > /tmp/torch-pin.txt && "
            "pip install -c /tmp/torch-pin.txt -r requirements-colab.txt && pip install -q --no-deps -e .",
            shell=True, check=True)
    sys.path.insert(0, "/content/multimodal-gpt")
    os.chdir("/content/multimodal-gpt/notebooks")
    if os.environ.get("CAPSTONE_DRIVE", "1") != "0":
        from google.colab import drive
        drive.mount("/content/drive")
        os.environ.setdefault("CAPSTONE_RUNS", "/content/drive/MyDrive/capstone/runs")
        os.environ.setdefault("CAPSTONE_DATA_DIR", "/content/drive/MyDrive/capstone/data")

from capstone_lib import get_profile
profile = get_profile()          # CAPSTONE_PROFILE: smoke | cpu | t4 | a100 | auto (default)
print(f"profile: {{profile.name}}  ->  artifacts in {{profile.run_dir}}")'''


def md(text: str) -> nbformat.NotebookNode:
    """A markdown cell."""
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(src: str, tags: list[str] | None = None) -> nbformat.NotebookNode:
    """A code cell (optionally tagged, e.g. ``skip-execution`` for interactive-only cells)."""
    cell = nbformat.v4.new_code_cell(src.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    return cell


def write_notebook(stem: str, title: str, cells: list, timeout: int = 1800) -> Path:
    """Write ``notebooks/<stem>.ipynb`` with badge, title and setup cell before ``cells``."""
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/capstone-course/multimodal-gpt/blob/main/notebooks/{stem}.ipynb)")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["execution"] = {"timeout": timeout}
    nb.cells = [md(f"{badge}\n\n# {title}"), code(SETUP.format(repo=REPO_URL))] + list(cells)
    for i, cell in enumerate(nb.cells):   # stable ids: a rebuild changes only the cells it edits
        cell["id"] = f"cell-{i:02d}"
    path = NOTEBOOKS / f"{stem}.ipynb"
    NOTEBOOKS.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path
