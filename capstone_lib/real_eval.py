"""A small, fast real-data evaluation for GPU profiles: COCO val captions and POPE yes/no questions.

It runs over a few hundred items in minutes: a *slice*, not the full benchmarks, so its numbers
are indicative only and are printed next to the published ones with that caveat.

* Captions: BLEU-1..4 and CIDEr-D with ``pycocoevalcap``'s scorers (the code of the COCO
  caption evaluation). Its PTB tokenizer needs Java, so captions are tokenized here by a
  simple rule instead (lower-case, punctuation dropped, ``'s`` split off): scores can differ
  slightly from papers'. CIDEr's idf comes from the references of the slice itself.
* POPE (object hallucination): "Is there a {object} in the image?" over COCO instance
  labels, balanced yes/no, negatives sampled at random, among the most frequent objects
  (popular) or among objects that often co-occur with the present ones (adversarial);
  answers read with POPE's rule (an answer containing "no"/"not" is no, any other is yes).

Every ``answer_fn`` is ``(image_path, question) -> str``: e.g. ``Assistant.ask`` of the
exported checkpoint, or any wrapper around the in-library model.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

from .validation import DataError, SkipCounter, load_json, raise_or_skip
from .fileio import write_json_atomic

AnswerFn = Callable[[str, str], str]
POPE_QUESTION = "Is there a {} in the image?"
POPE_STRATEGIES = ("random", "popular", "adversarial")

# Published results of Phi-2-sized LLaVA models (full benchmarks; /work/shared/notes/prior-art.md).
PUBLISHED: dict[str, dict[str, float]] = {
    "LLaVA-Phi": {"VQAv2": 71.4, "ScienceQA-IMG": 68.4, "TextVQA": 48.6, "POPE": 85.0, "MME": 1335},
    "TinyLLaVA": {"VQAv2": 76.8, "GQA": 59.4},
}
_TOKEN = re.compile(r"'s\b|[a-z0-9]+")


# ----------------------------------------------------------------------------- captions
def tokenize_caption(text: str) -> str:
    """Lower-case words and numbers separated by spaces (punctuation dropped, ``'s`` split off)."""
    return " ".join(_TOKEN.findall(text.lower()))


def caption_scores(references: dict[Any, Sequence[str]], predictions: dict[Any, str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D (pycocoevalcap) of one prediction per key against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(predictions):
        raise ValueError("references and predictions must have the same keys")
    if not references:
        raise ValueError("no captions to score")
    gts = {k: [tokenize_caption(r) for r in refs] for k, refs in references.items()}
    if any(not refs for refs in gts.values()):
        raise ValueError("every key needs at least one reference caption")
    res = {k: [tokenize_caption(p)] for k, p in predictions.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}, "cider": float(cider)}


def evaluate_captions(answer_fn: AnswerFn, records: Sequence[Any], n: int | None = None,
                      prompt: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Caption the first ``n`` records (``CaptionRecord``: path + captions) and score BLEU/CIDEr."""
    from tqdm.auto import tqdm

    from .chat import CAPTION_PROMPT

    prompt = prompt or CAPTION_PROMPT
    records = list(records)[:n] if n else list(records)
    if len(records) < 2:
        raise ValueError("evaluate_captions needs at least 2 images (CIDEr's idf is taken over the slice)")
    refs, preds, examples = {}, {}, []
    for rec in tqdm(records, desc="COCO captions", disable=not progress, leave=False):
        pred = answer_fn(str(rec.path), prompt)
        refs[rec.image_id], preds[rec.image_id] = list(rec.captions), pred
        if len(examples) < 8:
            examples.append({"image_id": rec.image_id, "prediction": pred, "reference": rec.captions[0]})
    return {**caption_scores(refs, preds), "n_captions": len(records), "caption_examples": examples}


# ----------------------------------------------------------------------------- POPE
def _image_dir(instances_json: Path) -> Path:
    """COCO layout: ``<root>/annotations/instances_val2017.json`` -> ``<root>/val2017``."""
    m = re.match(r"instances_(.+)\.json$", instances_json.name)
    if not m:
        raise ValueError(f"{instances_json}: expected a file named instances_<split>.json, or pass image_dir")
    return instances_json.parent.parent / m.group(1)


def build_pope_items(instances_json: str | Path, n: int, seed: int = 0, strategy: str = "random",
                     per_image: int = 3, image_dir: str | Path | None = None,
                     skips: SkipCounter | None = None) -> list[dict[str, Any]]:
    """``n`` balanced POPE items (half "yes") from a COCO instances file; ``per_image`` of each per image.

    Items: ``{image_id, image, question, answer, object, strategy}``; images are taken in a
    seeded order and must exist under ``image_dir`` (default: the COCO layout's image folder).
    """
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; choose one of {POPE_STRATEGIES}")
    if n < 2 or n % 2:
        raise ValueError(f"n must be a positive even number (half yes, half no), got {n}")
    instances_json = Path(instances_json)
    folder = Path(image_dir) if image_dir else _image_dir(instances_json)
    data = load_json(instances_json)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError("not a COCO instances file (needs 'images', 'annotations', 'categories')",
                        path=instances_json)
    names = {c["id"]: c["name"] for c in data["categories"]}
    present: dict[int, set[str]] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or a.get("category_id") not in names:
            raise DataError("annotation without a known 'category_id'", path=instances_json,
                            record=f"annotations[{i}]")
        present.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    popularity = Counter(name for objs in present.values() for name in objs)
    cooccur: Counter[tuple[str, str]] = Counter()
    if strategy == "adversarial":
        for objs in present.values():
            for a, b in combinations(sorted(objs), 2):
                cooccur[a, b] += 1
                cooccur[b, a] += 1
    all_names = sorted(set(names.values()))
    images = sorted((img for img in data["images"] if img.get("id") in present), key=lambda img: img["id"])
    rng = random.Random(seed)
    rng.shuffle(images)

    items: list[dict[str, Any]] = []
    for img in images:
        if len(items) >= n:
            break
        path = folder / img["file_name"]
        if not path.is_file():
            raise_or_skip(skips, "missing image file", instances_json, f"image id {img['id']}", str(path))
            continue
        objs = present[img["id"]]
        absent = [c for c in all_names if c not in objs]
        k = min(per_image, len(objs), len(absent), (n - len(items)) // 2)
        if k == 0:
            continue
        yes = rng.sample(sorted(objs), k)
        if strategy == "random":
            no = rng.sample(absent, k)
        elif strategy == "popular":
            no = sorted(absent, key=lambda c: (-popularity[c], c))[:k]
        else:
            no = sorted(absent, key=lambda c: (-sum(cooccur[o, c] for o in objs), -popularity[c], c))[:k]
        for obj_yes, obj_no in zip(yes, no):
            for obj, answer in ((obj_yes, "yes"), (obj_no, "no")):
                items.append({"image_id": img["id"], "image": str(path), "question": POPE_QUESTION.format(obj),
                              "answer": answer, "object": obj, "strategy": strategy})
    if len(items) < n:
        print(f"POPE ({strategy}): only {len(items)} of the {n} items requested could be built "
              f"from {instances_json}")
    return items


def pope_label(answer: str) -> str:
    """POPE's reading of an answer: "no" if its first sentence has the word no/not, else "yes"."""
    first = answer.split(".")[0].replace(",", " ").lower()
    return "no" if {"no", "not"} & set(re.findall(r"[a-z]+", first)) else "yes"


def evaluate_pope(answer_fn: AnswerFn, items: Sequence[dict[str, Any]], progress: bool = True) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 ("yes" is positive) and yes-ratio of ``answer_fn`` on POPE items."""
    from tqdm.auto import tqdm

    if not items:
        raise ValueError("no POPE items to evaluate")
    tp = fp = tn = fn = unclear = 0
    examples = []
    for item in tqdm(items, desc="POPE", disable=not progress, leave=False):
        raw = answer_fn(item["image"], item["question"])
        pred = pope_label(raw)
        words = set(re.findall(r"[a-z]+", raw.lower()))
        unclear += not ({"yes", "no", "not"} & words)
        if item["answer"] == "yes":
            tp, fn = tp + (pred == "yes"), fn + (pred == "no")
        else:
            fp, tn = fp + (pred == "yes"), tn + (pred == "no")
        if len(examples) < 8:
            examples.append({"question": item["question"], "answer": item["answer"], "prediction": raw})
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / total, "n": total, "unclear": unclear,
            "strategy": ",".join(sorted({i.get("strategy", "?") for i in items})), "pope_examples": examples}


# ----------------------------------------------------------------------------- report
def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.1f}"


def compare_table(results: dict[str, dict[str, Any]]) -> str:
    """Our slice results next to published LLaVA-Phi / TinyLLaVA numbers, with the caveat spelled out.

    ``results`` maps a name to an ``evaluate_captions`` or ``evaluate_pope`` result (POPE
    results are recognised by their ``f1`` key, captions by ``cider``).
    """
    pope = {k: r for k, r in results.items() if "f1" in r}
    caps = [r for r in results.values() if "cider" in r]
    models = list(PUBLISHED)
    ours: dict[str, str] = {}
    if pope:
        parts = [f"{100 * r['f1']:.1f} {r.get('strategy', k)}" for k, r in pope.items()]
        mean = sum(r["f1"] for r in pope.values()) / len(pope)
        ours["POPE (F1)"] = f"{100 * mean:.1f} (" + ", ".join(parts) + f"; n={sum(r['n'] for r in pope.values())})"
        ours["POPE accuracy"] = f"{100 * sum(r['accuracy'] for r in pope.values()) / len(pope):.1f}"
        ours["POPE yes-ratio"] = f"{100 * sum(r['yes_ratio'] for r in pope.values()) / len(pope):.1f}"
    for r in caps:
        ours["COCO BLEU-4"] = f"{100 * r['bleu4']:.1f} (n={r['n_captions']})"
        ours["COCO CIDEr"] = f"{100 * r['cider']:.1f} (n={r['n_captions']})"
    rows = ["VQAv2", "GQA", "ScienceQA-IMG", "TextVQA", "MME", "POPE (F1)", "POPE accuracy",
            "POPE yes-ratio", "COCO BLEU-4", "COCO CIDEr"]
    table = [["benchmark", "ours: slice", *[f"{m}: full" for m in models]]]
    for row in rows:
        key = "POPE" if row == "POPE (F1)" else row
        table.append([row, ours.get(row, "not run"),
                      *[_fmt(PUBLISHED[m][key]) if key in PUBLISHED[m] else "-" for m in models]])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["",
              "Published numbers are full benchmarks (POPE: 3 x 3000 questions on 500 COCO val images, F1",
              "averaged over random/popular/adversarial). Ours is a slice of a few hundred items from COCO val",
              "2017 with our own sampling and a simple tokenizer (no Java PTB): indicative, not comparable.",
              "Scores are shown x100 (CIDEr as in captioning papers)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running it
def coco_val_records(paths: Any, skips: SkipCounter | None = None) -> list[Any]:
    """COCO val caption records of a data view, without the held-out LLaVA train images."""
    from .coco import load_coco_captions

    held = paths.heldout_image_ids() if hasattr(paths, "heldout_image_ids") else set()
    return [r for r in load_coco_captions(paths.coco_root, "val", skips=skips) if r.image_id not in held]


def run_real_eval(profile: Any, answer_fn: AnswerFn, paths: Any = None,
                  strategies: Sequence[str] = ("random", "popular", "adversarial"),
                  progress: bool = True) -> dict[str, dict[str, Any]]:
    """Captions (``eval.n_captions``) and POPE (``eval.n_questions`` per strategy) on ``profile``'s data."""
    if paths is None:
        from .data_sources import dataset_paths

        paths = dataset_paths(profile)
    instances = getattr(paths, "instances_val", None)
    if instances is None:
        instances = shapesworld_instances(paths)
    results: dict[str, dict[str, Any]] = {
        "captions": evaluate_captions(answer_fn, coco_val_records(paths), profile.eval.n_captions,
                                      progress=progress)}
    n = profile.eval.n_questions - profile.eval.n_questions % 2
    for s in strategies:
        items = build_pope_items(instances, n, seed=profile.runtime.seed, strategy=s)
        results[f"pope_{s}"] = evaluate_pope(answer_fn, items, progress=progress)
    return results


def shapesworld_instances(paths: Any, out: str | Path | None = None) -> Path:
    """Write ShapesWorld's val scenes as a COCO ``instances_val2017.json`` (categories: "red circle" ...)."""
    from .shapesworld_scenes import COLORS, SHAPES

    out = Path(out) if out else Path(paths.coco_root) / "annotations" / "instances_val2017.json"
    captions = load_json(Path(paths.coco_root) / "annotations" / "captions_val2017.json")
    scenes = load_json(paths.scenes_val)
    categories = [{"id": i + 1, "name": f"{c} {s}", "supercategory": s}
                  for i, (c, s) in enumerate((c, s) for s in SHAPES for c in COLORS)]
    cat_id = {c["name"]: c["id"] for c in categories}
    annotations = []
    for scene in scenes:
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": scene["image_id"],
                                "category_id": cat_id[f"{obj['color']} {obj['shape']}"],
                                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                                "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
    data = {"info": {**captions.get("info", {}), "description": "ShapesWorld val (COCO instances format)"},
            "licenses": captions.get("licenses", []), "images": captions["images"],
            "annotations": annotations, "categories": categories}
    return write_json_atomic(out, data, separators=(",", ":"))
