"""COCO 2017 captions (``annotations/captions_<split>2017.json``): one record per image, all captions.

The same loader reads the real COCO 2017 captions and ShapesWorld's copy of the format.
Every caption of an image is kept (COCO has five per image; an earlier attempt kept only
the last one), and every problem names the file and the record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .validation import DataError, SkipCounter, file_in, load_json, raise_or_skip, validate_caption_annotation


@dataclass
class CaptionRecord:
    """One image and all its captions."""

    image_id: int
    path: Path
    captions: list[str] = field(default_factory=list)


def captions_file(root: str | Path, split: str) -> Path:
    """``<root>/annotations/captions_<split>2017.json``."""
    return Path(root) / "annotations" / f"captions_{split}2017.json"


def load_coco_captions(root: str | Path, split: str, skips: SkipCounter | None = None,
                       check_files: bool = True) -> list[CaptionRecord]:
    """Read COCO-format captions of ``split`` (``train``/``val``) under ``root``.

    Raises ``DataError`` naming the file and record for malformed JSON, non-UTF-8 bytes, a
    missing/empty caption, an unknown ``image_id``, a duplicate image id, an image without
    captions or (``check_files``) a missing image file; with ``skips`` the bad record is
    counted and skipped instead (structural errors of the whole file always raise).
    """
    path = captions_file(root, split)
    image_dir = Path(root) / f"{split}2017"
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"top level must be an object, got {type(data).__name__}", path=path)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"missing or non-list {key!r}", path=path)

    records: dict[int, CaptionRecord] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            raise_or_skip(skips, "image entry is not an object", path, where)
            continue
        image_id, name = img.get("id"), img.get("file_name")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise_or_skip(skips, "image entry without integer 'id'", path, where, f"id={image_id!r}")
            continue
        where = f"images[{i}] (id {image_id})"
        if not isinstance(name, str) or not name.strip():
            raise_or_skip(skips, "image entry without 'file_name'", path, where)
            continue
        if image_id in records:
            raise_or_skip(skips, "duplicate image id", path, where)
            continue
        image_path, problem = file_in(image_dir, name)
        if image_path is None:
            raise_or_skip(skips, "image file name outside the data set", path, where, problem)
            continue
        records[image_id] = CaptionRecord(image_id, image_path)

    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]" + (f" (id {ann.get('id')})" if isinstance(ann, dict) and "id" in ann else "")
        try:
            image_id, caption = validate_caption_annotation(ann, path, where)
        except DataError as err:
            raise_or_skip(skips, "bad caption annotation", path, where, err.message)
            continue
        rec = records.get(image_id)
        if rec is None:
            raise_or_skip(skips, "caption for an unknown image_id", path, where, f"image_id={image_id}")
            continue
        rec.captions.append(caption)

    out = []
    for rec in records.values():
        where = f"image id {rec.image_id}"
        if not rec.captions:
            raise_or_skip(skips, "image without captions", path, where)
            continue
        if check_files and not rec.path.is_file():
            raise_or_skip(skips, "missing image file", path, where, str(rec.path))
            continue
        out.append(rec)
    if not out:
        raise DataError("no usable captioned images", path=path)
    return out
