"""ShapesWorld: a tiny, deterministic world of coloured shapes, written in real data formats.

Each scene is a small image (64 px by default) on a dark background with 1..max_objects
objects; every object is a distinct colour+shape in a distinct cell of a 3x3 grid. The
generator writes the scenes exactly as the real data sets are laid out on disk (COCO 2017
captions, LLaVA-Instruct-150K conversations, RedPajama jsonl text), so the course's loaders
and training code run unchanged on ShapesWorld (cpu) and on the real data (GPU).

Same settings -> byte-identical files (seeded ``numpy.random.Generator`` for geometry and
a ``random.Random`` seeded from it for wording).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .shapesworld_scenes import (COLORS, POSITIONS, QUESTION_TYPES, SHAPES, ShapeObject, _render_random,
                                 sample_scene, scene_key)
from .shapesworld_text import (DEFAULT_CHAT_TURNS, DEFAULT_DESCRIBE, corpus_weights, make_captions, make_conversation,
                               make_corpus_doc, make_question)

GENERATOR_VERSION = 2   # bump whenever the output bytes change (new folder hash)


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class ShapesWorldPaths:
    """Where a generated ShapesWorld lives (see ARCHITECTURE.md "ShapesWorld on disk")."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def coco_root(self) -> Path:
        """COCO-2017-style root (``annotations/``, ``train2017/``, ``val2017/``)."""
        return self.root / "coco"

    @property
    def train_images(self) -> Path:
        """Folder of training images (``coco/train2017``)."""
        return self.coco_root / "train2017"

    @property
    def val_images(self) -> Path:
        """Folder of validation images (``coco/val2017``)."""
        return self.coco_root / "val2017"

    @property
    def captions_train(self) -> Path:
        """COCO captions JSON of the train split."""
        return self.coco_root / "annotations" / "captions_train2017.json"

    @property
    def captions_val(self) -> Path:
        """COCO captions JSON of the val split."""
        return self.coco_root / "annotations" / "captions_val2017.json"

    @property
    def llava_train(self) -> Path:
        """LLaVA-Instruct JSON over train images (image paths relative to ``train_images``)."""
        return self.root / "llava" / "llava_instruct_train.json"

    @property
    def llava_val(self) -> Path:
        """LLaVA-Instruct JSON over val images (image paths relative to ``val_images``)."""
        return self.root / "llava" / "llava_instruct_val.json"

    @property
    def corpus_train(self) -> Path:
        """RedPajama-style jsonl, train split."""
        return self.root / "redpajama" / "train.jsonl"

    @property
    def corpus_val(self) -> Path:
        """RedPajama-style jsonl, val split."""
        return self.root / "redpajama" / "val.jsonl"

    @property
    def scenes_val(self) -> Path:
        """Ground-truth objects of every val image."""
        return self.root / "scenes_val.json"

    @property
    def eval_questions(self) -> Path:
        """Held-out questions over val images: ``[{image_id, image, question, answer, type}]``."""
        return self.root / "eval_questions.json"

    @property
    def manifest(self) -> Path:
        """Settings and counts, written last (its presence marks a complete data set)."""
        return self.root / "manifest.json"


# ----------------------------------------------------------------------------- generate
def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _coco_json(split: str, images: list[dict], annotations: list[dict]) -> dict[str, Any]:
    return {
        "info": {"description": f"ShapesWorld {split} (COCO 2017 captions format)", "version": "1.0",
                 "year": 2024, "contributor": "capstone_lib.shapesworld", "date_created": "2024/01/01",
                 "url": ""},
        "licenses": [{"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1,
                      "name": "CC0 1.0"}],
        "images": images, "annotations": annotations,
    }


def generate(out_dir: str | Path, *, seed: int = 0, image_size: int = 64, n_train: int = 48,
             n_val: int = 16, max_objects: int = 3, captions_per_image: int = 3,
             questions_per_image: int = 3, corpus_docs: int = 400,
             corpus_mix: dict[str, float] | None = None, corpus_chat_turns: int = DEFAULT_CHAT_TURNS,
             describe_fraction: float = DEFAULT_DESCRIBE, explain_exists: bool = False,
             progress: bool = True) -> ShapesWorldPaths:
    """Write a complete ShapesWorld data set under ``out_dir`` (``manifest.json`` last)."""
    from tqdm.auto import tqdm

    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    if image_size < 16 or n_train < 1 or n_val < 1 or captions_per_image < 1 or questions_per_image < 1:
        raise ValueError("image_size >= 16 and n_train, n_val, captions_per_image, "
                         "questions_per_image >= 1 are required")
    settings = recorded_settings(dict(
        seed=seed, image_size=image_size, n_train=n_train, n_val=n_val, max_objects=max_objects,
        captions_per_image=captions_per_image, questions_per_image=questions_per_image,
        corpus_docs=corpus_docs, corpus_mix=corpus_mix, corpus_chat_turns=corpus_chat_turns,
        describe_fraction=describe_fraction, explain_exists=explain_exists))
    if corpus_chat_turns < 1:
        raise ValueError(f"corpus_chat_turns must be >= 1, got {corpus_chat_turns}")
    if not 0.0 <= describe_fraction <= 1.0:
        raise ValueError(f"describe_fraction must be in [0, 1], got {describe_fraction!r}")
    corpus_weights(corpus_mix)          # a bad mix fails before any image is drawn
    paths = ShapesWorldPaths(Path(out_dir))
    if paths.manifest.exists():
        paths.manifest.unlink()
    for stale in ("coco", "llava", "redpajama"):       # an earlier, different generation
        shutil.rmtree(paths.root / stale, ignore_errors=True)
    rng = np.random.default_rng(seed)
    r = random.Random(int(rng.integers(2**63)))

    # Val scenes first; train rejects any scene whose (colour, shape, position) set is in val.
    val_keys: set[frozenset] = set()
    splits: dict[str, list[tuple[int, list[ShapeObject]]]] = {"val": [], "train": []}
    for i in range(n_val):
        objs = sample_scene(rng, image_size, max_objects)
        val_keys.add(scene_key(objs))
        splits["val"].append((n_train + 1 + i, objs))
    for i in range(n_train):
        for _ in range(10_000):
            objs = sample_scene(rng, image_size, max_objects)
            if scene_key(objs) not in val_keys:
                break
        else:
            raise RuntimeError("could not draw a train scene outside the val scenes; raise n_train "
                               "or max_objects, or lower n_val")
        splits["train"].append((1 + i, objs))

    counts: dict[str, int] = {}
    bar = tqdm(total=n_train + n_val, desc="ShapesWorld images", disable=not progress)
    scenes_val, eval_questions = [], []
    for split in ("train", "val"):
        img_dir = paths.coco_root / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns, convs = [], [], []
        for image_id, objs in splits[split]:
            name = f"{image_id:012d}.png"
            _render_random(rng, objs, image_size).save(img_dir / name, compress_level=1)
            images.append({"license": 1, "file_name": name, "coco_url": "", "height": image_size,
                           "width": image_size, "date_captured": "2024-01-01 00:00:00",
                           "flickr_url": "", "id": image_id})
            caps = make_captions(objs, captions_per_image, r)
            for c in caps:
                anns.append({"image_id": image_id, "id": len(anns) + 1 + (0 if split == "train" else 10**7),
                             "caption": c})
            n_ex = r.randint(max(1, questions_per_image - 1), questions_per_image)
            convs.append({"id": f"{image_id:012d}", "image": name,
                          "conversations": make_conversation(objs, n_ex, caps, r, describe_fraction,
                                                                 explain_exists)})
            if split == "val":
                rel = f"coco/val2017/{name}"
                scenes_val.append({"image_id": image_id, "image": rel,
                                   "objects": [o.to_dict() for o in objs], "captions": caps})
                for j in range(questions_per_image):
                    qtype = QUESTION_TYPES[(len(eval_questions)) % len(QUESTION_TYPES)]
                    q, a = make_question(objs, qtype, r)
                    eval_questions.append({"image_id": image_id, "image": rel, "question": q,
                                           "answer": a, "type": qtype})
            bar.update(1)
        _dump(paths.coco_root / "annotations" / f"captions_{split}2017.json",
              _coco_json(split, images, anns))
        _dump(paths.llava_train if split == "train" else paths.llava_val, convs)
        counts[f"{split}_images"] = len(images)
        counts[f"{split}_captions"] = len(anns)
        counts[f"{split}_conversations"] = len(convs)
    bar.close()
    _dump(paths.scenes_val, scenes_val)
    _dump(paths.eval_questions, eval_questions)
    counts["eval_questions"] = len(eval_questions)

    docs = [make_corpus_doc(rng, r, image_size, max_objects, corpus_mix, corpus_chat_turns,
                            explain_exists) for _ in range(corpus_docs)]
    n_val_docs = max(1, corpus_docs // 20) if corpus_docs > 1 else 0
    paths.corpus_train.parent.mkdir(parents=True, exist_ok=True)
    for path, part in ((paths.corpus_val, docs[:n_val_docs]), (paths.corpus_train, docs[n_val_docs:])):
        with open(path, "w", encoding="utf-8") as f:
            for d in part:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    counts["corpus_train_docs"] = corpus_docs - n_val_docs
    counts["corpus_val_docs"] = n_val_docs

    _dump(paths.manifest, {"generator_version": GENERATOR_VERSION, "settings": settings,
                           "counts": counts, "colors": list(COLORS), "shapes": list(SHAPES),
                           "positions": list(POSITIONS), "question_types": list(QUESTION_TYPES)})
    return paths


def recorded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the options left at their defaults (older data sets keep their hash)."""
    out = dict(settings)
    if out.get("corpus_mix") is None:
        out.pop("corpus_mix", None)
    else:
        out["corpus_mix"] = dict(out["corpus_mix"])
    if out.get("corpus_chat_turns", DEFAULT_CHAT_TURNS) == DEFAULT_CHAT_TURNS:
        out.pop("corpus_chat_turns", None)
    if out.get("describe_fraction", DEFAULT_DESCRIBE) == DEFAULT_DESCRIBE:
        out.pop("describe_fraction", None)
    if not out.get("explain_exists", False):
        out.pop("explain_exists", None)
    return out


def settings_hash(settings: dict[str, Any]) -> str:
    """Short hash of the generator settings (and version): the data set's folder name."""
    blob = json.dumps({"v": GENERATOR_VERSION, **settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete data set under ``root``, else None."""
    path = Path(root) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_shapesworld(profile: Any, base_dir: str | Path | None = None) -> ShapesWorldPaths:
    """Generate ShapesWorld for ``profile.data.shapesworld`` once; reuse it when the manifest matches.

    Lives in ``data/generated/shapesworld-<hash>/`` (or ``$CAPSTONE_DATA_DIR``); a partial
    folder (no manifest, e.g. an interrupted run) is removed and generated again.
    """
    from .profiles import REPO_ROOT

    settings = recorded_settings(profile.data.shapesworld if hasattr(profile, "data") else profile)
    base = Path(base_dir or os.environ.get("CAPSTONE_DATA_DIR") or REPO_ROOT / "data" / "generated")
    root = base / f"shapesworld-{settings_hash(settings)}"
    manifest = read_manifest(root)
    if manifest and manifest.get("settings") == settings and \
            manifest.get("generator_version") == GENERATOR_VERSION:
        return ShapesWorldPaths(root)
    tmp = base / f"{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, **settings)
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:   # another process finished the same data set first
        if (read_manifest(root) or {}).get("settings") != settings:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return ShapesWorldPaths(root)


def load_scenes(paths: ShapesWorldPaths) -> dict[int, list[dict[str, Any]]]:
    """Ground-truth objects of the val images, keyed by image id."""
    return {s["image_id"]: s["objects"] for s in json.loads(paths.scenes_val.read_text("utf-8"))}


def show_samples(paths: ShapesWorldPaths, n: int = 8, split: str = "train", cols: int = 4):
    """A matplotlib figure of ``n`` images with one caption each."""
    import textwrap

    import matplotlib.pyplot as plt

    ann = json.loads((paths.coco_root / "annotations" / f"captions_{split}2017.json").read_text("utf-8"))
    caps: dict[int, str] = {}
    for a in ann["annotations"]:
        caps.setdefault(a["image_id"], a["caption"])
    images = ann["images"][:n]
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, images):
        ax.imshow(Image.open(paths.coco_root / f"{split}2017" / im["file_name"]).convert("RGB"))
        ax.set_title("\n".join(textwrap.wrap(caps.get(im["id"], ""), 34)), fontsize=7)
    fig.tight_layout()
    return fig
