"""Safe loading: scan the library for unsafe deserialisation and remote code (issue 8)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "capstone_lib").glob("*.py")) + [ROOT / "app.py"]


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def _kw(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key:
            return kw.value
    return None


def unsafe_calls(path: Path) -> list[str]:
    """Every unsafe loading call in one file, as 'file:line: what'."""
    found = []
    for call in _calls(path):
        name = _name(call.func)
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        if name.endswith("torch.load") or name == "load" and "torch" in ast.unparse(call.func):
            value = _kw(call, "weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
            found.append(f"{where}: {name}")
        value = _kw(call, "trust_remote_code")
        if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
            found.append(f"{where}: trust_remote_code")
        if name.endswith("save_pretrained"):
            value = _kw(call, "safe_serialization")
            if isinstance(value, ast.Constant) and value.value is False:
                found.append(f"{where}: save_pretrained(safe_serialization=False)")
    return found


def test_library_has_no_unsafe_loading():
    problems = [p for path in SOURCES for p in unsafe_calls(path)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("snippet, expected", [
    ("import torch\ntorch.load('x.pt')", "weights_only"),
    ("import torch\ntorch.load('x.pt', weights_only=False)", "weights_only"),
    ("import pickle\npickle.load(open('x', 'rb'))", "pickle.load"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)", "trust_remote_code"),
    ("m.save_pretrained('d', safe_serialization=False)", "safe_serialization"),
])
def test_scanner_catches_each_unsafe_pattern(tmp_path, snippet, expected):
    bad = ROOT / "tests" / f"_scan_probe_{abs(hash(snippet))}.py"
    bad.write_text(snippet)
    try:
        assert any(expected in p for p in unsafe_calls(bad))
    finally:
        bad.unlink()


def test_safe_patterns_pass(tmp_path):
    ok = ROOT / "tests" / "_scan_probe_ok.py"
    ok.write_text("import torch\ntorch.load('x.pt', weights_only=True)\n"
                  "from transformers import AutoModel\nAutoModel.from_pretrained('x')\n")
    try:
        assert unsafe_calls(ok) == []
    finally:
        ok.unlink()


def test_demo_binds_to_loopback_by_default():
    import inspect

    from capstone_lib import get_profile
    from capstone_lib.app import launch

    params = inspect.signature(launch).parameters
    assert params["host"].default == "127.0.0.1" and params["share"].default is False
    for name in ("smoke", "cpu", "t4", "a100"):
        assert get_profile(name).demo.host == "127.0.0.1"
        assert 0 < get_profile(name).demo.max_upload_mb <= 50
