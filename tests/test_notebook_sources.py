"""The notebooks have one source each (notebooks/src/*.py), rebuilt byte for byte, and it is linted."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb  # noqa: E402


def test_every_notebook_is_its_source_rebuilt():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "nb.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {p.stem for p in nb.sources()} == {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb")}


def test_an_edited_source_makes_a_different_notebook(tmp_path):
    source = tmp_path / "03_projector_coco.py"
    shutil.copy(ROOT / "notebooks" / "src" / source.name, source)
    committed = (ROOT / "notebooks" / "03_projector_coco.ipynb").read_text()
    assert nbformat.writes(nb.build_notebook(source)) + "\n" == committed
    source.write_text(source.read_text().replace("# %%\n", "# %%\nprint('edited')\n", 1))
    assert nbformat.writes(nb.build_notebook(source)) + "\n" != committed


def test_a_source_without_a_title_is_refused(tmp_path):
    source = tmp_path / "09_bad.py"
    source.write_text("# %%\nprint(1)\n")
    try:
        nb.build_notebook(source)
    except ValueError as err:
        assert "first cell must be the markdown title" in str(err)
    else:
        raise AssertionError("a source without a title built")


def test_library_tools_tests_and_notebook_sources_pass_ruff():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
