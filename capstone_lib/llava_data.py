"""LLaVA-Instruct-150K conversations: ``[{"id", "image", "conversations": [...]}, ...]``.

Every record is validated (turn order, ``<image>`` placement, empty text, the image file)
before training sees it; a bad record raises ``DataError`` naming the file and the record,
or is counted in a ``SkipCounter``. Text-only records of the real mixture (no ``"image"``)
are always a counted skip when ``skips`` is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .validation import DataError, SkipCounter, file_in, load_json, raise_or_skip, validate_llava_record


@dataclass
class ConversationRecord:
    """One image and its human/gpt turns (``<image>`` in the first human turn)."""

    id: str
    image: Path
    conversations: list[dict[str, str]] = field(default_factory=list)


def load_llava_instruct(json_path: str | Path, image_dir: str | Path, skips: SkipCounter | None = None,
                        check_files: bool = True) -> list[ConversationRecord]:
    """Read and validate a LLaVA-Instruct JSON file; image paths are resolved under ``image_dir``."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    data = load_json(json_path)
    if not isinstance(data, list):
        raise DataError(f"top level must be a list of records, got {type(data).__name__}", path=json_path)
    out: list[ConversationRecord] = []
    for i, rec in enumerate(data):
        try:
            rid, image, turns = validate_llava_record(rec, json_path, i)
        except DataError as err:
            reason = "text-only record" if err.message.startswith("text-only") else "invalid record"
            raise_or_skip(skips, reason, json_path, err.record, err.message)
            continue
        path, problem = file_in(image_dir, image)
        if path is None:
            raise_or_skip(skips, "image file name outside the data set", json_path, f"{i} (id {rid!r})", problem)
            continue
        if check_files and not path.is_file():
            raise_or_skip(skips, "missing image file", json_path, f"{i} (id {rid!r})", str(path))
            continue
        out.append(ConversationRecord(rid, path, turns))
    if not out:
        raise DataError("no usable conversation records", path=json_path)
    return out
