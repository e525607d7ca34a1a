"""ShapesWorld's language: captions, questions and conversations about a scene, their parsing, the corpus.

The generator's wording (``make_captions``, ``make_question``, ``make_conversation``,
``make_corpus_doc``) and the reverse direction the evaluation uses (``parse_caption``,
``score_caption``, ``spoken_truth``). All wording is drawn from a seeded ``random.Random``.
"""
from __future__ import annotations

import random
import re
from typing import Any, Sequence

import numpy as np

from .chat import CAPTION_PROMPT, IMAGE_TOKEN, INSTRUCT, segments


from .shapesworld_scenes import (COLORS, NUMBER_WORDS, POSITIONS, QUESTION_TYPES, SHAPES, ShapeObject,
                                 sample_scene, scene_key)


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
