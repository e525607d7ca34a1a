"""ShapesWorld's scenes: the vocabulary (colours, shapes, 3x3 positions), sampling and drawing.

Every object is a distinct colour+shape in a distinct cell of a 3x3 grid; ``render_scene``
draws a scene on a dark background. ``shapesworld`` writes whole data sets from these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw




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


def vocabulary_prompt() -> str:
    """Text for Whisper to read before a spoken question: the words ShapesWorld questions use.

    Decoding after it favours these words ("circle", not "cool"); it is the ``cpu`` profile's
    ``audio.initial_prompt``.
    """
    return (f"Questions about an image of colored shapes ({', '.join(SHAPES)}; {', '.join(COLORS)}). "
            "What color is the circle? What shape is the red object? How many shapes are there? "
            "Where is the blue square located? Is there a green triangle in the image?")
