"""RedPajama-style jsonl text (``{"text": ..., "meta": {...}}`` per line), read with file:line errors."""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from .validation import DataError, check_text


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with _open(path) as f:
        yield from enumerate(f, start=1)


def iter_jsonl_texts(path: str | Path) -> Iterator[str]:
    """Yield the ``"text"`` of every line; a bad line raises ``DataError`` naming ``file:line``.

    Blank lines are ignored; a file with no record at all is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    n, lineno = 0, 0
    try:
        for lineno, raw in _lines(path):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"not UTF-8 at byte {err.start} of the line", path=where) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not JSON (column {err.colno}: {err.msg})", path=where) from None
            except RecursionError:
                raise DataError("JSON nested too deeply to read", path=where) from None
            except ValueError as err:    # e.g. an integer of more digits than Python converts
                raise DataError(f"unreadable JSON value: {err}", path=where) from None
            if not isinstance(obj, dict):
                raise DataError(f"line must be a JSON object, got {type(obj).__name__}", path=where)
            text = obj.get("text")
            if not isinstance(text, str):
                raise DataError("no string 'text' field" if text is None else
                                f"'text' must be a string, got {type(text).__name__}", path=where)
            n += 1
            yield check_text(text, "'text'", path=where)
    except (EOFError, OSError, zlib.error) as err:     # a truncated or corrupt .gz
        raise DataError(f"cannot read past line {lineno}: {err or type(err).__name__} "
                        "(a truncated or corrupt file; download it again)", path=path) from None
    if n == 0:
        raise DataError("empty corpus: no jsonl records", path=path)


def jsonl_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand a file, a folder (its ``*.jsonl``/``*.jsonl.gz``, sorted) or a list of them."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            found = sorted([*p.glob("*.jsonl"), *p.glob("*.jsonl.gz")])
            if not found:
                raise DataError("folder holds no .jsonl files", path=p)
            out += found
        else:
            out.append(p)
    if not out:
        raise DataError("no corpus files given")
    return out


def read_jsonl_texts(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """All texts of one or more jsonl files (or folders of them), in order."""
    return [t for p in jsonl_files(paths) for t in iter_jsonl_texts(p)]
