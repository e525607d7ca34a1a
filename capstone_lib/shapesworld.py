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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .chat import CAPTION_PROMPT, IMAGE_TOKEN, INSTRUCT, segments

GENERATOR_VERSION = 2   # bump whenever the output bytes change (new folder hash)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 100, 240),
    "yellow": (240, 220, 40), "purple": (160, 60, 210), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``box`` is (x0, y0, x1, y1) in pixels."""

    color: str
    shape: str
    position: str
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: colour, shape, position and the rounded box."""
        return {"color": self.color, "shape": self.shape, "position": self.position,
                "box": [round(v, 2) for v in self.box]}


def scene_key(objects: Iterable[ShapeObject | dict]) -> frozenset[tuple[str, str, str]]:
    """The identity of a scene: the set of (colour, shape, position), ignoring jitter."""
    out = set()
    for o in objects:
        d = o if isinstance(o, dict) else o.to_dict()
        out.add((d["color"], d["shape"], d["position"]))
    return frozenset(out)


# ----------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, image_size: int, max_objects: int) -> list[ShapeObject]:
    """Draw a random scene, objects in reading order (top-to-bottom, left-to-right)."""
    n = int(rng.integers(1, max_objects + 1))
    cells = np.sort(np.argsort(rng.random(len(POSITIONS)))[:n])          # distinct cells
    combos = np.argsort(rng.random(len(COLORS) * len(SHAPES)))[:n]        # distinct colour+shape
    sizes = rng.uniform(0.55, 0.75, size=n)
    offsets = rng.uniform(-1.0, 1.0, size=(n, 2))
    colors = list(COLORS)
    cell = image_size / 3
    objects = []
    for c, k, rel, (ox, oy) in zip(cells.tolist(), combos.tolist(), sizes.tolist(), offsets.tolist()):
        row, col = divmod(c, 3)
        size = cell * rel
        slack = (cell - size) / 2 * 0.8          # the object stays inside its cell
        cx = (col + 0.5) * cell + ox * slack
        cy = (row + 0.5) * cell + oy * slack
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        objects.append(ShapeObject(colors[k // len(SHAPES)], SHAPES[k % len(SHAPES)], POSITIONS[c], box))
    return objects


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: float, fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = (v * scale for v in obj.box)
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        m = (x1 - x0) * 0.06          # a square looks bigger than a circle of the same box
        draw.rectangle((x0 + m, y0 + m, x1 - m, y1 - m), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(objects: Sequence[ShapeObject | dict], image_size: int = 64,
                 background: tuple[int, int, int] = (30, 30, 36),
                 color_jitter: Sequence[Sequence[int]] | None = None, supersample: int = 4) -> Image.Image:
    """Draw a scene as an RGB image (antialiased by drawing ``supersample`` times larger)."""
    objs = [o if isinstance(o, ShapeObject) else ShapeObject(
        o["color"], o["shape"], o["position"], tuple(o["box"])) for o in objects]
    big = image_size * supersample
    img = Image.new("RGB", (big, big), tuple(background))
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(objs):
        rgb = np.array(COLORS[obj.color])
        if color_jitter is not None:
            rgb = np.clip(rgb + np.asarray(color_jitter[i]), 0, 255)
        _draw(draw, obj, supersample, tuple(int(v) for v in rgb))
    return img.reduce(supersample) if supersample > 1 else img   # box filter = area antialiasing


def _render_random(rng: np.random.Generator, objects: list[ShapeObject], image_size: int) -> Image.Image:
    base = int(rng.integers(14, 52))
    background = tuple(int(np.clip(base + t, 0, 255)) for t in rng.integers(-6, 7, size=3))
    jitter = rng.integers(-14, 15, size=(len(objects), 3))
    return render_scene(objects, image_size, background, jitter)


# ----------------------------------------------------------------------------- wording
def _pos_phrase(pos: str, r: random.Random) -> str:
    if pos in ("left", "right"):
        return f"{r.choice(('on the', 'at the'))} {pos}"
    if pos in ("top", "bottom"):
        return f"at the {pos}"
    return f"{r.choice(('at the', 'in the'))} {pos}"


def _obj_phrase(o: ShapeObject, r: random.Random) -> str:
    return f"a {o.color} {o.shape} {_pos_phrase(o.position, r)}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


_CAPTION_TEMPLATES = (
    "{list}.", "{List}.", "{Count}: {list}.", "There {are}: {list}.", "An image with {list}.",
    "A dark picture showing {list}.", "This scene contains {list}.", "{List} on a dark background.",
    "We see {list}.",
)


def make_captions(objects: list[ShapeObject], k: int, r: random.Random) -> list[str]:
    """``k`` captions in different wordings, each naming every object's colour, shape and place."""
    n = len(objects)
    templates = r.sample(_CAPTION_TEMPLATES, min(k, len(_CAPTION_TEMPLATES)))
    while len(templates) < k:
        templates.append(r.choice(_CAPTION_TEMPLATES))
    out = []
    for t in templates:
        phrases = [_obj_phrase(o, r) for o in objects]
        listing = _join(phrases)
        if n == 1:
            count = "One shape"
            are = "is a single " + phrases[0][2:] if r.random() < 0.5 else "is one shape"
        else:
            count = f"{_cap(NUMBER_WORDS[n])} shapes"
            are = f"are {NUMBER_WORDS[n]} shapes"
        if t == "There {are}: {list}." and n == 1 and are.startswith("is a single"):
            out.append(f"There {are}.")
            continue
        out.append(t.format(list=listing, List=_cap(listing), Count=count, are=are))
    return out


def _unique(objects: list[ShapeObject], attr: str) -> list[ShapeObject]:
    values = [getattr(o, attr) for o in objects]
    return [o for o in objects if values.count(getattr(o, attr)) == 1]


def exists_evidence(objects: Sequence[ShapeObject], shape: str) -> str:
    """What the scene says about ``shape``: "The square is blue", "The squares are blue and red"..."""
    colors = [o.color for o in objects if o.shape == shape]
    if not colors:
        return f"There is no {shape}"
    if len(colors) == 1:
        return f"The {shape} is {colors[0]}"
    return f"The {shape}s are {_join(colors)}"


def make_question(objects: list[ShapeObject], qtype: str, r: random.Random,
                  explain: bool = False) -> tuple[str, str]:
    """One ``(question, answer)`` of type ``qtype`` about the scene; answers are canonical.

    With ``explain`` a yes/no ("exists") answer states its evidence first and its verdict last
    ("The square is blue, so no."); the random draws are the same either way.
    """
    if qtype == "color":
        by_shape = _unique(objects, "shape")
        if by_shape and r.random() < 0.6:
            o = r.choice(by_shape)
            q = r.choice(("What color is the {s}?", "What colour is the {s}?",
                          "What is the color of the {s}?", "Which color does the {s} have?"))
            return q.format(s=o.shape), o.color
        o = r.choice(objects)
        q = r.choice(("What color is the shape {p}?", "What colour is the object {p}?",
                      "What is the color of the shape {p}?"))
        return q.format(p=_pos_phrase(o.position, r)), o.color
    if qtype == "shape":
        by_color = _unique(objects, "color")
        if by_color and r.random() < 0.6:
            o = r.choice(by_color)
            q = r.choice(("What shape is the {c} object?", "What is the {c} shape?",
                          "Which shape is {c}?", "What kind of shape is the {c} one?"))
            return q.format(c=o.color), o.shape
        o = r.choice(objects)
        q = r.choice(("What shape is {p}?", "What kind of shape is {p}?", "Which shape is {p}?"))
        return q.format(p=_pos_phrase(o.position, r)), o.shape
    if qtype == "count":
        q = r.choice(("How many shapes are there?", "How many objects can you see?",
                      "How many shapes are in the image?", "Count the shapes.",
                      "How many objects are in this picture?"))
        return q, NUMBER_WORDS[len(objects)]
    if qtype == "position":
        o = r.choice(objects)
        q = r.choice(("Where is the {c} {s}?", "Where is the {c} {s} located?",
                      "In which part of the image is the {c} {s}?"))
        return q.format(c=o.color, s=o.shape), o.position
    if qtype == "exists":
        present = {(o.color, o.shape) for o in objects}
        if r.random() < 0.5:
            color, shape = r.choice(sorted(present))
            answer = "yes"
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
            color, shape = r.choice(near if near and r.random() < 0.6 else absent)
            answer = "no"
        q = r.choice(("Is there a {c} {s}?", "Is there a {c} {s} in the image?",
                      "Can you see a {c} {s}?", "Does the image contain a {c} {s}?"))
        if explain:
            answer = f"{exists_evidence(objects, shape)}, so {answer}."
        return q.format(c=color, s=shape), answer
    raise ValueError(f"unknown question type {qtype!r}; choose one of {QUESTION_TYPES}")


DEFAULT_DESCRIBE = 0.3   # the share of image conversations with a description turn
_DESCRIBE_PROMPTS = (CAPTION_PROMPT, CAPTION_PROMPT, CAPTION_PROMPT, "What do you see in the image?",
                     "Describe this picture.")


def make_conversation(objects: list[ShapeObject], n_exchanges: int, captions: list[str],
                      r: random.Random, describe: float = DEFAULT_DESCRIBE,
                      explain_exists: bool = False) -> list[dict[str, str]]:
    """A LLaVA-style conversation: ``n_exchanges`` Q/A pairs, ``<image>`` in the first turn.

    With probability ``describe`` one of the questions is a request for a description, answered
    with one of ``captions`` (LLaVA-Instruct's "detail" conversations). ``explain_exists``: yes/no
    answers give their evidence first (``make_question``).
    """
    if not 0.0 <= describe <= 1.0:
        raise ValueError(f"describe must be a probability in [0, 1], got {describe!r}")
    types = r.sample(QUESTION_TYPES, min(n_exchanges, len(QUESTION_TYPES)))
    while len(types) < n_exchanges:
        types.append(r.choice(QUESTION_TYPES))
    pairs = [make_question(objects, t, r, explain_exists) for t in types]
    if r.random() < describe:   # some conversations ask for a description, answered with a caption
        pairs[r.randrange(len(pairs))] = (r.choice(_DESCRIBE_PROMPTS), r.choice(captions))
    turns = []
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            q = f"{q}\n{IMAGE_TOKEN}" if r.random() < 0.2 else f"{IMAGE_TOKEN}\n{q}"
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


# ----------------------------------------------------------------------------- parsing
_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_POS_RE = "|".join(sorted(POSITIONS, key=len, reverse=True))
_MENTION = re.compile(rf"\b({_COLOR_RE})\s+({_SHAPE_RE})s?\b(?:\s+(?:at|in|on)\s+the\s+({_POS_RE})\b)?",
                      re.IGNORECASE)
_SYNONYMS = {"colour": "color", "middle": "center", "centre": "center", "upper": "top",
             "lower": "bottom", "rectangle": "square", "ball": "circle"}


def parse_caption(text: str) -> set[tuple[str, str, str | None]]:
    """The (colour, shape, position-or-None) mentions in a caption, e.g. for scoring generations."""
    t = text.lower().replace("-", " ")
    for word, canon in _SYNONYMS.items():
        t = re.sub(rf"\b{word}\b", canon, t)
    return {(m.group(1), m.group(2), m.group(3)) for m in _MENTION.finditer(t)}


def spoken_truth(question: str, objects: Sequence[ShapeObject | dict]) -> str | None:
    """The right answer to one of the shipped spoken questions (data/audio), or None if ambiguous."""
    objs = [o if isinstance(o, dict) else o.to_dict() for o in objects]
    if question == "What color is the circle?":
        circles = [o for o in objs if o["shape"] == "circle"]
        return circles[0]["color"] if len(circles) == 1 else None
    if question == "What shape is the red object?":
        red = [o for o in objs if o["color"] == "red"]
        return red[0]["shape"] if len(red) == 1 else None
    if question == "How many shapes are there?":
        return NUMBER_WORDS[len(objs)]
    raise KeyError(f"not a shipped spoken question: {question!r}")


def score_caption(text: str, objects: Sequence[ShapeObject | dict]) -> dict[str, float]:
    """Precision/recall of colour+shape mentions against the scene, position accuracy, exact match."""
    truth = {(k[0], k[1]): k[2] for k in scene_key(objects)}
    mentions = parse_caption(text)
    pairs = {(c, s) for c, s, _ in mentions}
    hit = pairs & set(truth)
    with_pos = [(c, s, p) for c, s, p in mentions if p is not None and (c, s) in truth]
    return {
        "precision": len(hit) / len(pairs) if pairs else 0.0,
        "recall": len(hit) / len(truth) if truth else 0.0,
        "position_accuracy": (sum(truth[(c, s)] == p for c, s, p in with_pos) / len(with_pos)
                              if with_pos else 0.0),
        "exact": float(pairs == set(truth) and all(truth[(c, s)] == p for c, s, p in with_pos)
                       and len(with_pos) == len(truth)),
    }


# ----------------------------------------------------------------------------- corpus
_FACTS = (
    "A square has four equal sides.", "A triangle has three sides and three corners.",
    "A circle is round and has no corners.", "Red, green, blue, yellow, purple and white are colors.",
    "The sky is blue and the grass is green.", "A banana is yellow.", "Snow is white.",
    "One, two, three, four, five.", "Two plus one is three.", "The top left corner is above the left side.",
    "The center is in the middle of the picture.", "The bottom right corner is below the right side.",
    "Shapes can be drawn in many colors.", "A picture can show one, two or three shapes.",
    "Left is the opposite of right.", "The top is the opposite of the bottom.",
    "Grapes can be purple or green.", "Tomatoes are red.", "A ball looks like a circle.",
    "A box looks like a square.", "A slice of pizza looks like a triangle.",
)


def _fact(r: random.Random) -> str:
    kind = r.randrange(5)
    c, s, p = r.choice(list(COLORS)), r.choice(SHAPES), r.choice(POSITIONS)
    if kind == 0:
        return r.choice(_FACTS)
    if kind == 1:
        return f"The {c} {s} is {_pos_phrase(p, r)} of the picture."
    if kind == 2:
        n = r.randrange(1, 4)
        return f"{_cap(NUMBER_WORDS[n])} {s}{'s' if n > 1 else ''} {'are' if n > 1 else 'is'} {c}."
    if kind == 3:
        return f"I drew a {c} {s} {_pos_phrase(p, r)}."
    return f"If there is a {c} {s}, the answer to \"Is there a {c} {s}?\" is yes."


# Document kinds of the pretraining corpus and their default weights. A "chat" document states a
# scene in words and then asks and answers questions about it: the only kind whose next words
# depend on earlier words of the same document, so the only one that teaches reading the context.
CORPUS_KINDS = ("captions", "chat", "text")
DEFAULT_CORPUS_MIX = {"captions": 4, "chat": 4, "text": 2}
DEFAULT_CHAT_TURNS = 3   # a chat document asks 1..3 questions unless corpus_chat_turns says more


def corpus_weights(mix: dict[str, float] | None) -> list[float]:
    """Weights of ``CORPUS_KINDS`` from a ``corpus_mix`` setting (None: the default mix)."""
    mix = DEFAULT_CORPUS_MIX if mix is None else mix
    if set(mix) - set(CORPUS_KINDS) or any(w < 0 for w in mix.values()) or \
            not any(mix.get(k, 0) > 0 for k in CORPUS_KINDS):
        raise ValueError(f"corpus_mix needs non-negative weights of {CORPUS_KINDS}, some positive; "
                         f"got {mix!r}")
    return [mix.get(k, 0) for k in CORPUS_KINDS]


def make_corpus_doc(rng: np.random.Generator, r: random.Random, image_size: int,
                    max_objects: int, mix: dict[str, float] | None = None,
                    chat_turns: int = DEFAULT_CHAT_TURNS, explain_exists: bool = False) -> dict[str, Any]:
    """One RedPajama-style document: captions, a text-only chat (1..chat_turns Q/A), or sentences."""
    kind = r.choices(CORPUS_KINDS, weights=corpus_weights(mix))[0]
    if kind == "captions":
        sents = []
        for _ in range(r.randint(2, 5)):
            sents += make_captions(sample_scene(rng, image_size, max_objects), 1, r)
        text = " ".join(sents)
    elif kind == "chat":
        objs = sample_scene(rng, image_size, max_objects)
        caption = make_captions(objs, 1, r)[0]
        turns = make_conversation(objs, r.randint(max(1, chat_turns - 3), chat_turns), [caption], r,
                                  explain_exists=explain_exists)
        intro = r.choice(("The picture shows", "Scene:", "Look at this:", "Here is a scene with"))
        listing = _join([_obj_phrase(o, r) for o in objs])
        turns[0] = {"from": "human", "value": f"{intro} {listing}.\n" +
                    turns[0]["value"].replace(IMAGE_TOKEN, "").strip()}
        text = "".join(t for t, _ in segments(turns, INSTRUCT))
    else:
        text = " ".join(_fact(r) for _ in range(r.randint(3, 8)))
    return {"text": text, "meta": {"source": f"shapesworld-{kind}"}}


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
