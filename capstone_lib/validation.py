"""Data errors that name the file and record, counted skips, and small record validators.

Every loader in the course either raises ``DataError`` (the message names the file, the
record and what is wrong) or, when the caller passes a ``SkipCounter``, skips the record
and counts it under a reason, so nothing is dropped silently::

    skips = SkipCounter(limit=100)
    records = load_llava_instruct(json_path, image_dir, skips=skips)
    print(skips.report())        # "2 records skipped: 2 x text-only record (e.g. ...)"
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"   # same string as capstone_lib.chat.IMAGE_TOKEN
SPEAKERS = ("human", "gpt")


class DataError(ValueError):
    """Bad input data; ``str(err)`` names the file and the record (id or index)."""

    def __init__(self, message: str, path: str | Path | None = None, record: Any = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.record = record
        where = []
        if self.path is not None:
            where.append(self.path)
        if record is not None:
            where.append(f"record {record}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class SkipCounter:
    """Counts skipped records by reason (keeps a few examples); raises past ``limit``."""

    def __init__(self, limit: int | None = None, examples_per_reason: int = 3):
        self.limit = limit
        self.examples_per_reason = examples_per_reason
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def count(self) -> int:
        """Total number of skipped records."""
        return sum(self.by_reason.values())

    def skip(self, reason: str, path: str | Path | None = None, record: Any = None,
             detail: str = "") -> None:
        """Count one skipped record; raise ``DataError`` when more than ``limit`` were skipped."""
        self.by_reason[reason] += 1
        where = ", ".join(x for x in (None if path is None else str(path),
                                      None if record is None else f"record {record}",
                                      detail or None) if x)
        examples = self.examples.setdefault(reason, [])
        if where and len(examples) < self.examples_per_reason:
            examples.append(where)
        if self.limit is not None and self.count > self.limit:
            raise DataError(f"more than {self.limit} records skipped ({self.report()})",
                            path=path, record=record)

    def report(self) -> str:
        """One line per reason: how many records were skipped and a few examples."""
        if not self.count:
            return "0 records skipped"
        lines = [f"{self.count} records skipped:"]
        for reason, n in self.by_reason.most_common():
            eg = self.examples.get(reason)
            lines.append(f"  {n} x {reason}" + (f" (e.g. {'; '.join(eg)})" if eg else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter(count={self.count}, by_reason={dict(self.by_reason)})"


def raise_or_skip(skips: SkipCounter | None, reason: str, path: str | Path | None = None,
                  record: Any = None, detail: str = "") -> None:
    """Raise ``DataError`` (no counter given) or count a skip under ``reason``."""
    if skips is None:
        raise DataError(f"{reason}{': ' + detail if detail else ''}", path=path, record=record)
    skips.skip(reason, path=path, record=record, detail=detail)


def load_json(path: str | Path) -> Any:
    """Read a UTF-8 JSON file; non-UTF-8 bytes or bad JSON raise ``DataError`` with the position."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"not UTF-8: byte {err.start} (line {line}): {err.reason}", path=path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON at line {err.lineno} column {err.colno} "
                        f"(char {err.pos}): {err.msg}", path=path) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read (a data file is a few levels deep)", path=path) from None
    except ValueError as err:            # e.g. an integer of more digits than Python converts
        raise DataError(f"unreadable JSON value: {err}", path=path) from None


def check_text(text: str, what: str, path: str | Path | None = None, record: Any = None) -> str:
    """``text`` if it is valid Unicode (no unpaired surrogate, which JSON's \\ud800 escapes allow), else ``DataError``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{what} contains an unpaired surrogate (\\u{ord(text[err.start]):04x}) at "
                        f"character {err.start}: not valid text", path, record) from None
    return text


def validate_caption(caption: Any, path: str | Path | None = None, record: Any = None) -> str:
    """A caption must be a non-empty string; returns it stripped, else raises ``DataError``."""
    if not isinstance(caption, str):
        raise DataError(f"caption must be a string, got {type(caption).__name__}", path, record)
    text = check_text(caption.strip(), "caption", path, record)
    if not text:
        raise DataError("empty caption", path, record)
    return text


def validate_caption_annotation(ann: Any, path: str | Path | None = None,
                                record: Any = None) -> tuple[int, str]:
    """A COCO caption annotation ``{"image_id": int, "caption": str}`` -> ``(image_id, caption)``."""
    if not isinstance(ann, dict):
        raise DataError(f"annotation must be an object, got {type(ann).__name__}", path, record)
    if "image_id" not in ann:
        raise DataError("annotation has no 'image_id'", path, record)
    image_id = ann["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise DataError(f"'image_id' must be an integer, got {image_id!r}", path, record)
    if "caption" not in ann:
        raise DataError("annotation has no 'caption'", path, record)
    return image_id, validate_caption(ann["caption"], path, record)


def validate_conversation(conversations: Any, path: str | Path | None = None, record: Any = None,
                          require_image: bool = True) -> list[dict[str, str]]:
    """Check LLaVA turns: human/gpt alternating from human, even length, non-empty text,
    exactly one ``<image>`` in the first human turn (if ``require_image``) and none elsewhere.

    Returns a clean copy ``[{"from", "value"}, ...]`` or raises ``DataError``.
    """
    if not isinstance(conversations, list):
        raise DataError(f"'conversations' must be a list, got {type(conversations).__name__}",
                        path, record)
    if not conversations:
        raise DataError("'conversations' is empty", path, record)
    if len(conversations) % 2:
        raise DataError(f"odd number of turns ({len(conversations)}): the last human turn "
                        "has no answer", path, record)
    out: list[dict[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} must be an object, got {type(turn).__name__}", path, record)
        for key in ("from", "value"):
            if key not in turn:
                raise DataError(f"turn {i} has no {key!r}", path, record)
        speaker, value = turn["from"], turn["value"]
        expected = SPEAKERS[i % 2]
        if speaker != expected:
            raise DataError(f"turn {i}: expected from={expected!r}, got {speaker!r} "
                            "(turns must alternate human/gpt, starting with human)", path, record)
        if not isinstance(value, str):
            raise DataError(f"turn {i}: 'value' must be a string, got {type(value).__name__}",
                            path, record)
        check_text(value, f"turn {i}", path, record)
        n_image = value.count(IMAGE_TOKEN)
        if i == 0 and require_image and n_image != 1:
            raise DataError(f"turn 0 must contain {IMAGE_TOKEN} exactly once, found {n_image}",
                            path, record)
        if (i > 0 or not require_image) and n_image:
            raise DataError(f"turn {i}: {IMAGE_TOKEN} may only appear in the first human turn",
                            path, record)
        if not value.replace(IMAGE_TOKEN, "").strip():
            raise DataError(f"turn {i}: empty text", path, record)
        out.append({"from": speaker, "value": value})
    return out


def validate_llava_record(rec: Any, path: str | Path | None = None,
                          index: int | None = None) -> tuple[str, str, list[dict[str, str]]]:
    """A LLaVA-Instruct record -> ``(id, image, conversations)``; ``DataError`` names the record.

    A record without an ``"image"`` key (text-only, as in the real mixture) raises a
    ``DataError`` whose message starts with ``"text-only record"``.
    """
    if not isinstance(rec, dict):
        raise DataError(f"record must be an object, got {type(rec).__name__}", path, index)
    rid = rec.get("id")
    if rid is None:
        raise DataError("record has no 'id'", path, index)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise DataError(f"'id' must be a string or integer, got {type(rid).__name__}", path, index)
    name = f"{index} (id {rid!r})" if index is not None else repr(rid)
    if "image" not in rec:
        raise DataError("text-only record (no 'image')", path, name)
    image = rec["image"]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"'image' must be a non-empty string, got {image!r}", path, name)
    if "conversations" not in rec:
        raise DataError("record has no 'conversations'", path, name)
    turns = validate_conversation(rec["conversations"], path, name, require_image=True)
    return str(rid), image, turns


def sample_subset(records: list, n: int | None, seed: int) -> list:
    """``n`` records drawn at random (seeded, in their original order), or all when ``n`` is None or larger."""
    import random

    if not n or n >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def file_in(folder: str | Path, name: Any) -> tuple[Path | None, str]:
    """``folder / name`` when ``name`` is a plain relative file name that stays in ``folder``.

    Returns ``(path, "")``, or ``(None, reason)`` for an absolute name, a ``..`` part, a NUL byte,
    a part longer than the file system allows (255 bytes), or a symbolic link that leads out of
    ``folder`` (resolved; ``folder`` itself may be a link): a record may only name files inside
    its data set's folder.
    """
    if not isinstance(name, str) or not name.strip():
        return None, f"file name must be a non-empty string, got {name!r}"
    if "\x00" in name:
        return None, f"file name {name!r} contains a NUL byte"
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None, f"file name {name!r} is absolute; it must be relative to {folder}"
    if ".." in rel.parts:
        return None, f"file name {name!r} leaves {folder} ('..')"
    try:
        too_long = [part for part in rel.parts if len(part.encode("utf-8")) > 255]
    except UnicodeEncodeError:
        return None, f"file name {name!r} is not valid text (unpaired surrogates)"
    if too_long:
        return None, f"file name part {too_long[0][:40]!r}... is longer than 255 bytes"
    path = Path(folder) / rel
    try:
        real, base = path.resolve(), Path(folder).resolve()
    except (OSError, RuntimeError):          # a symlink loop
        return None, f"file name {name!r} cannot be resolved (a symbolic link loop?)"
    if real != base and base not in real.parents:
        return None, f"{name!r} is a symbolic link to {real}, outside {folder}"
    return path, ""
