"""Build the course notebooks from their sources, ``notebooks/src/*.py`` (jupytext percent format).

Each source is the notebook's one editable, lintable form: ``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell, and its first cell is the title (``# # 03 · ...``).
Building adds the Colab badge and the setup cell, gives cells stable ids, and writes
``notebooks/<name>.ipynb`` (committed without outputs; ``make course`` writes executed copies
to runs/)::

    python tools/nb.py            # rebuild every notebook from its source
    python tools/nb.py --check    # exit 1 naming each notebook that differs from its rebuild

Open a source in Jupyter with jupytext's "open as notebook", or edit it as a Python file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

REPO_URL = "https://github.com/capstone-course/multimodal-gpt"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = NOTEBOOKS / "src"
TIMEOUT = 1800                  # seconds per cell under nbmake

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


def build_notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook of one source file: badge + title, setup cell, then the source's cells."""
    text = jupytext.read(source, fmt="py:percent")
    if not text.cells or text.cells[0].cell_type != "markdown" or not text.cells[0].source.startswith("# "):
        raise ValueError(f"{source}: the first cell must be the markdown title ('# %% [markdown]' then '# # Title')")
    stem = source.stem
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/capstone-course/multimodal-gpt/blob/main/notebooks/{stem}.ipynb)")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["execution"] = {"timeout": TIMEOUT}
    setup = nbformat.v4.new_code_cell(SETUP.format(repo=REPO_URL))
    cells = [nbformat.v4.new_markdown_cell(f"{badge}\n\n{text.cells[0].source}"), setup]
    for cell in text.cells[1:]:
        new = (nbformat.v4.new_markdown_cell(cell.source) if cell.cell_type == "markdown"
               else nbformat.v4.new_code_cell(cell.source))
        if cell.metadata.get("tags"):
            new.metadata["tags"] = list(cell.metadata["tags"])
        cells.append(new)
    nb.cells = cells
    for i, cell in enumerate(nb.cells):   # stable ids: a rebuild changes only the cells it edits
        cell["id"] = f"cell-{i:02d}"
    return nb


def sources() -> list[Path]:
    """Every notebook source, in course order."""
    return sorted(SOURCES.glob("[0-9][0-9]*_*.py"))


def main(argv: list[str] | None = None) -> int:
    """Rebuild (or ``--check``) every notebook."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args(argv)
    stale = []
    for source in sources():
        text = nbformat.writes(build_notebook(source)) + "\n"
        target = NOTEBOOKS / f"{source.stem}.ipynb"
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print(f"differ from their sources in {SOURCES} (run python tools/nb.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
