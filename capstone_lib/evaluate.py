"""Held-out evaluation: ShapesWorld question answering and caption accuracy.

Answers are normalised (case, punctuation, articles, number words) before exact matching.
Captions count as right when the objects they state (colour, shape and, where stated,
position) are exactly the scene's objects.
"""
from __future__ import annotations

import json
import string
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .chat import CAPTION_PROMPT, IMAGE_TOKEN, encode_prompt

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, write numbers as words, squeeze spaces."""
    words = []
    for w in text.lower().translate(_PUNCT).split():
        if w.isdigit() and int(w) < len(NUMBER_WORDS):
            w = NUMBER_WORDS[int(w)]
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(words)


def yes_no_verdict(text: str) -> str:
    """A yes/no answer's verdict: the whole normalised answer, or "yes"/"no" after a closing "so".

    "The square is blue, so no." -> "no" (the answer states its evidence first); anything else is
    returned normalised and unchanged, so only a verdict at the very end counts.
    """
    words = normalize_answer(text).split()
    if len(words) >= 2 and words[-2] == "so" and words[-1] in ("yes", "no"):
        return words[-1]
    return " ".join(words)


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match after ``normalize_answer``; a yes/no reference is matched by ``yes_no_verdict``."""
    ref = normalize_answer(reference)
    if ref in ("yes", "no"):
        return yes_no_verdict(prediction) == ref
    return normalize_answer(prediction) == ref


@torch.no_grad()
def generate_answer(model, tokenizer, image_features: torch.Tensor, question: str,
                    history: Sequence[dict] | None = None, max_new_tokens: int = 32) -> str:
    """Greedy answer of a ``VisionLanguageModel`` to one question about cached image features."""
    from .generate import stream_generate

    ids = encode_prompt(tokenizer, history or [], question, image_features.shape[0])
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    embeds = model.embed(input_ids, image_features=image_features[None].to(device))
    tokens = list(stream_generate(model, embeds, attention_mask=torch.ones_like(input_ids),
                                  eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens))
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def vqa_accuracy(answer_fn: Callable[[dict], str], questions: Sequence[dict]) -> dict[str, Any]:
    """Accuracy overall and per ``type`` of ``answer_fn(question_record)`` against ``answer``."""
    right, total = defaultdict(int), defaultdict(int)
    examples = []
    for q in questions:
        pred = answer_fn(q)
        ok = answers_match(pred, q["answer"])
        right[q["type"]] += ok
        total[q["type"]] += 1
        if len(examples) < 12:
            examples.append({"question": q["question"], "answer": q["answer"], "prediction": pred, "ok": ok})
    n = sum(total.values())
    return {"vqa_accuracy": sum(right.values()) / max(n, 1), "n_questions": n,
            "vqa_by_type": {t: right[t] / total[t] for t in sorted(total)}, "vqa_examples": examples}


def caption_matches(caption: str, objects: Sequence[dict]) -> bool:
    """True when the caption's stated objects are exactly the scene's (positions checked if stated)."""
    from .shapesworld_text import parse_caption

    stated = parse_caption(caption)
    truth_cs = {(o["color"], o["shape"]) for o in objects}
    if {(s[0], s[1]) for s in stated} != truth_cs or len(stated) != len(objects):
        return False
    truth_pos = {(o["color"], o["shape"]): o["position"] for o in objects}
    return all(len(s) < 3 or s[2] is None or truth_pos[(s[0], s[1])] == s[2] for s in stated)


def caption_accuracy(caption_fn: Callable[[int], str], scenes: Sequence[dict],
                     progress: bool = False) -> dict[str, Any]:
    """Fraction of generated captions (``caption_fn(image_id)``) that match their scene.

    Also how grounded they are when not exact: mean precision/recall of the stated colour+shape
    pairs against the scene, and the same precision against the *next* scene in the list (a
    caption that ignores its image scores about as well on someone else's).
    """
    from tqdm.auto import tqdm

    from .shapesworld_text import score_caption

    scenes = list(scenes)
    hits, examples, own, other = 0, [], [], []
    for i, scene in enumerate(tqdm(scenes, desc="eval captions", leave=False, disable=not progress)):
        cap = caption_fn(scene["image_id"])
        ok = caption_matches(cap, scene["objects"])
        hits += ok
        own.append(score_caption(cap, scene["objects"]))
        other.append(score_caption(cap, scenes[(i + 1) % len(scenes)]["objects"]))
        if len(examples) < 8:
            examples.append({"image_id": scene["image_id"], "caption": cap, "ok": ok})
    n = max(len(scenes), 1)
    return {"caption_accuracy": hits / n, "n_captions": len(scenes),
            "caption_precision": sum(s["precision"] for s in own) / n,
            "caption_recall": sum(s["recall"] for s in own) / n,
            "caption_precision_other_scene": sum(s["precision"] for s in other) / n,
            "caption_examples": examples}


def evaluate_shapesworld(model, tokenizer, val_cache, paths, n_questions: int, n_captions: int,
                         max_new_tokens: int = 32) -> dict[str, Any]:
    """Question accuracy and caption accuracy on held-out ShapesWorld images."""
    from tqdm.auto import tqdm

    questions = json.loads(Path(paths.eval_questions).read_text())[:n_questions]
    scenes = json.loads(Path(paths.scenes_val).read_text())
    if isinstance(scenes, dict):
        scenes = [{"image_id": int(k), **v} for k, v in scenes.items()]
    scenes = scenes[:n_captions]
    was_training = model.training
    model.eval()

    def answer(q: dict) -> str:
        feats = val_cache.get_batch([q["image_id"]])[0]
        return generate_answer(model, tokenizer, feats, f"{IMAGE_TOKEN}\n{q['question']}",
                               max_new_tokens=max_new_tokens)

    def caption(image_id: int) -> str:
        feats = val_cache.get_batch([image_id])[0]
        return generate_answer(model, tokenizer, feats, f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}",
                               max_new_tokens=max_new_tokens * 2)

    out = vqa_accuracy(answer, tqdm(questions, desc="eval questions", leave=False))
    out.update(caption_accuracy(caption, scenes, progress=True))
    model.train(was_training)
    return out


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """A small text table: one row per phase (before training, after stage 1, ...)."""
    types = sorted({t for r in results.values() for t in r.get("vqa_by_type", {})})
    head = f"{'phase':<18}{'VQA':>7}{'caption':>9}" + "".join(f"{t:>10}" for t in types)
    rows = [head]
    for phase, r in results.items():
        rows.append(f"{phase:<18}{r['vqa_accuracy']:>7.3f}{r['caption_accuracy']:>9.3f}"
                    + "".join(f"{r['vqa_by_type'].get(t, float('nan')):>10.3f}" for t in types))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- either data source
def on_shapesworld(profile) -> bool:
    """True when the profile trains on ShapesWorld (scene ground truth exists), False on real data."""
    return profile.data.source == "shapesworld"


def evaluate_course(profile, model, tokenizer, val_cache, paths, n_questions: int | None = None,
                    n_captions: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The course's held-out evaluation of an in-library model on the profile's data.

    ShapesWorld: question and caption accuracy (``evaluate_shapesworld``). Real data (COCO):
    BLEU/CIDEr of captions on COCO val and POPE accuracy (random negatives), as ``real_eval``
    computes them, with the features read from ``val_cache``.
    """
    ev = profile.eval
    n_questions = ev.n_questions if n_questions is None else n_questions
    n_captions = ev.n_captions if n_captions is None else n_captions
    if on_shapesworld(profile):
        return evaluate_shapesworld(model, tokenizer, val_cache, paths, n_questions, n_captions,
                                    max_new_tokens=ev.max_new_tokens)
    from .real_eval import build_pope_items, coco_val_records, evaluate_captions, evaluate_pope
    from .stage2 import image_id_of

    def answer(image: str, question: str) -> str:
        feats = val_cache.get_batch([image_id_of(image)])[0]
        long = question == CAPTION_PROMPT
        return generate_answer(model, tokenizer, feats, f"{IMAGE_TOKEN}\n{question}",
                               max_new_tokens=ev.max_new_tokens * (2 if long else 1))

    was_training = model.training
    model.eval()
    caps = evaluate_captions(answer, coco_val_records(paths), max(2, n_captions), progress=progress)
    items = build_pope_items(paths.instances_val, max(2, n_questions - n_questions % 2),
                             seed=profile.runtime.seed)
    pope = evaluate_pope(answer, items, progress=progress)
    model.train(was_training)
    return {"cider": caps["cider"], "bleu4": caps["bleu4"], "n_captions": caps["n_captions"],
            "pope_accuracy": pope["accuracy"], "pope_f1": pope["f1"], "pope_yes_ratio": pope["yes_ratio"],
            "n_questions": pope["n"], "caption_examples": caps["caption_examples"],
            "pope_examples": pope["pope_examples"]}


def headline(result: dict[str, Any]) -> tuple[str, float]:
    """The one number to compare runs by: ShapesWorld VQA accuracy, or POPE accuracy on real data."""
    if "vqa_accuracy" in result:
        return "VQA accuracy", float(result["vqa_accuracy"])
    return "POPE accuracy", float(result["pope_accuracy"])


def format_course_results(results: dict[str, dict[str, Any]]) -> str:
    """``format_results`` for ShapesWorld results; for real-data results a CIDEr / BLEU-4 / POPE table."""
    if all("vqa_accuracy" in r for r in results.values()):
        return format_results(results)
    rows = [f"{'phase':<18}{'CIDEr':>8}{'BLEU-4':>8}{'POPE acc':>10}{'POPE F1':>9}{'yes-ratio':>11}"]
    for phase, r in results.items():
        rows.append(f"{phase:<18}{100 * r['cider']:>8.1f}{100 * r['bleu4']:>8.1f}{r['pope_accuracy']:>10.3f}"
                    f"{r['pope_f1']:>9.3f}{r['pope_yes_ratio']:>11.2f}")
    return "\n".join(rows)
