"""real_eval: BLEU/CIDEr against hand-derived values and another package; POPE on ShapesWorld labels."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from capstone_lib.chat import CAPTION_PROMPT
from capstone_lib.coco import load_coco_captions
from capstone_lib.profiles import get_profile
from capstone_lib.real_eval import (PUBLISHED, build_pope_items, caption_scores, compare_table,
                                    evaluate_captions, evaluate_pope, pope_label, run_real_eval,
                                    shapesworld_instances, tokenize_caption)
from capstone_lib.shapesworld import generate
from capstone_lib.validation import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("sw") / "world", seed=3, n_train=4, n_val=24, max_objects=3,
                     captions_per_image=3, questions_per_image=1, corpus_docs=2, progress=False)
    scenes = {s["image_id"]: s for s in json.loads(paths.scenes_val.read_text())}
    return paths, scenes, shapesworld_instances(paths)


# ----------------------------------------------------------------------------- caption metrics
def test_bleu_matches_hand_computation_and_torchmetrics():
    from torchmetrics.text import BLEUScore

    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    got = caption_scores({1: [ref]}, {1: hyp})
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> no brevity penalty
    assert got["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert got["bleu1"] == pytest.approx(5 / 6, abs=1e-6)
    assert got["bleu4"] == pytest.approx(float(BLEUScore(4)([hyp], [[ref]])), abs=1e-4)


def test_cider_matches_hand_computation():
    # Two images with disjoint words: every n-gram has idf log(2), so CIDEr-D reduces to the
    # clipped cosine of raw n-gram counts. Image 1: unigrams 5/sqrt(8*6), bigrams 3/5,
    # trigrams 2/4, 4-grams 1/3; image 2 is an exact match (1 for every n). x10, averaged.
    refs = {1: ["The cat sat on a mat."], 2: ["dogs run in green parks"]}
    got = caption_scores(refs, {1: "the cat, sat on the mat", 2: "Dogs run in green parks!"})
    img1 = (5 / math.sqrt(48) + 3 / 5 + 2 / 4 + 1 / 3) / 4 * 10
    assert got["cider"] == pytest.approx((img1 + 10.0) / 2, abs=1e-9)
    exact = caption_scores(refs, {1: refs[1][0], 2: refs[2][0]})
    assert exact["cider"] == pytest.approx(10.0) and exact["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert caption_scores(refs, {1: "zebra", 2: "zebra"})["cider"] == 0.0


def test_tokenizer_ignores_case_and_punctuation():
    assert tokenize_caption("A man's DOG, running... (fast)!") == "a man 's dog running fast"
    refs = {1: ["a red circle"], 2: ["two blue squares"]}
    assert caption_scores(refs, {1: "A red circle.", 2: "Two blue squares!"}) == \
        caption_scores(refs, {1: "a red circle", 2: "two blue squares"})
    with pytest.raises(ValueError):
        caption_scores(refs, {1: "x"})


def test_evaluate_captions_perfect_vs_constant(world):
    paths, _, _ = world
    records = load_coco_captions(paths.coco_root, "val")
    by_path = {str(r.path): r for r in records}
    seen = []

    def perfect(image_path: str, question: str) -> str:
        assert Path(image_path).is_file() and question == CAPTION_PROMPT
        seen.append(image_path)
        return by_path[image_path].captions[0]

    good = evaluate_captions(perfect, records, n=12, progress=False)
    bad = evaluate_captions(lambda p, q: "a photo of something", records, n=12, progress=False)
    assert good["n_captions"] == 12 and len(seen) == 12
    assert good["bleu4"] > 0.99 and good["cider"] > 1.0
    assert bad["bleu4"] < 0.05 and bad["cider"] < 0.1
    with pytest.raises(ValueError):
        evaluate_captions(perfect, records, n=1, progress=False)


# ----------------------------------------------------------------------------- POPE
def test_shapesworld_instances_is_valid_coco(world):
    from pycocotools.coco import COCO

    paths, scenes, instances = world
    coco = COCO(str(instances))                          # the reference COCO API reads it
    for image_id, scene in scenes.items():
        names = {coco.cats[a["category_id"]]["name"] for a in coco.imgToAnns[image_id]}
        assert names == {f"{o['color']} {o['shape']}" for o in scene["objects"]}


def test_pope_items_balanced_and_true_to_the_scenes(world):
    _, scenes, instances = world
    items = build_pope_items(instances, 40, seed=0, strategy="random")
    assert len(items) == 40 and sum(i["answer"] == "yes" for i in items) == 20
    for it in items:
        present = {f"{o['color']} {o['shape']}" for o in scenes[it["image_id"]]["objects"]}
        assert (it["object"] in present) == (it["answer"] == "yes")
        assert it["question"] == f"Is there a {it['object']} in the image?" and Path(it["image"]).is_file()
    assert build_pope_items(instances, 40, seed=0) == items
    assert build_pope_items(instances, 40, seed=1) != items
    # popular negatives: the most frequent absent objects of each image
    counts: dict[str, int] = {}
    for s in scenes.values():
        for name in {f"{o['color']} {o['shape']}" for o in s["objects"]}:
            counts[name] = counts.get(name, 0) + 1
    negatives: dict[int, list[str]] = {}
    for it in build_pope_items(instances, 20, strategy="popular"):
        if it["answer"] == "no":
            negatives.setdefault(it["image_id"], []).append(it["object"])
    for image_id, chosen in negatives.items():     # the k most frequent absent objects (ties: any)
        present = {f"{o['color']} {o['shape']}" for o in scenes[image_id]["objects"]}
        absent_counts = sorted((counts.get(c, 0) for c in counts if c not in present), reverse=True)
        assert sorted((counts.get(c, 0) for c in chosen), reverse=True) == absent_counts[:len(chosen)]
    adversarial = build_pope_items(instances, 20, strategy="adversarial")
    assert len(adversarial) == 20 and {i["strategy"] for i in adversarial} == {"adversarial"}
    with pytest.raises(ValueError):
        build_pope_items(instances, 7)
    with pytest.raises(ValueError):
        build_pope_items(instances, 8, strategy="hard")


def test_pope_items_name_a_missing_image(world, tmp_path):
    _, _, instances = world
    with pytest.raises(DataError, match="missing image file"):
        build_pope_items(instances, 8, image_dir=tmp_path)


def test_pope_label_follows_pope_rule():
    assert pope_label("Yes, there is a red circle.") == "yes"
    assert pope_label("No.") == "no"
    assert pope_label("There is not a cat in the image. Yes I am sure.") == "no"
    assert pope_label("I see a blue square") == "yes"


def test_evaluate_pope_metric_sanity(world):
    _, _, instances = world
    items = build_pope_items(instances, 60, seed=2)
    truth = {(i["image"], i["question"]): i["answer"] for i in items}
    perfect = evaluate_pope(lambda p, q: "Yes, there is." if truth[p, q] == "yes" else "No, there is not.",
                            items, progress=False)
    assert perfect["accuracy"] == 1.0 and perfect["f1"] == 1.0 and perfect["yes_ratio"] == 0.5
    yes = evaluate_pope(lambda p, q: "yes", items, progress=False)
    assert yes["accuracy"] == pytest.approx(0.5) and yes["yes_ratio"] == 1.0
    assert yes["recall"] == 1.0 and yes["precision"] == pytest.approx(0.5)
    no = evaluate_pope(lambda p, q: "No", items, progress=False)
    assert no["accuracy"] == pytest.approx(0.5) and no["yes_ratio"] == 0.0 and no["f1"] == 0.0
    babble = evaluate_pope(lambda p, q: "a picture", items, progress=False)
    assert babble["unclear"] == len(items) and babble["yes_ratio"] == 1.0


def test_compare_table_marks_the_slice(world):
    _, _, instances = world
    items = build_pope_items(instances, 20)
    pope = evaluate_pope(lambda p, q: "yes", items, progress=False)
    caps = {"bleu4": 0.123, "cider": 0.456, "n_captions": 10}
    table = compare_table({"captions": caps, "pope_random": pope})
    for model in PUBLISHED.values():
        assert all(f"{v:g}" in table for v in model.values())
    assert "71.4" in table and "76.8" in table and "1335" in table
    assert f"{100 * pope['f1']:.1f}" in table and "12.3" in table and "45.6" in table
    assert "full" in table and "slice" in table and "not comparable" in table and "not run" in table


def test_run_real_eval_on_shapesworld_with_an_oracle(world):
    paths, scenes, _ = world
    captions = {str(r.path): r.captions[0] for r in load_coco_captions(paths.coco_root, "val")}
    by_image = {str(paths.root / s["image"]): s for s in scenes.values()}

    def oracle(image_path: str, question: str) -> str:
        if question == CAPTION_PROMPT:
            return captions[image_path]
        present = {f"{o['color']} {o['shape']}" for o in by_image[str(Path(image_path))]["objects"]}
        return "yes" if any(f" {p} " in question for p in present) else "no"

    profile = get_profile("smoke", eval={"n_questions": 21, "n_captions": 6})
    results = run_real_eval(profile, oracle, paths=paths, progress=False)
    assert set(results) == {"captions", "pope_random", "pope_popular", "pope_adversarial"}
    assert all(results[k]["accuracy"] == 1.0 and results[k]["n"] == 20 for k in results if k != "captions")
    assert results["captions"]["n_captions"] == 6 and results["captions"]["bleu4"] > 0.99
