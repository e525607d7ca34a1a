"""ShapesWorld generator: determinism, split hygiene, real-format output, ground-truth consistency."""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from capstone_lib.chat import IMAGE_TOKEN, segments
from capstone_lib.coco import load_coco_captions
from capstone_lib.images import load_image
from capstone_lib.llava_data import load_llava_instruct
from capstone_lib.profiles import get_profile
from capstone_lib.redpajama import read_jsonl_texts
from capstone_lib.shapesworld import ShapesWorldPaths, ensure_shapesworld, generate
from capstone_lib.shapesworld_scenes import (COLORS, NUMBER_WORDS, POSITIONS, QUESTION_TYPES, SHAPES,
                                             ShapeObject, render_scene, scene_key)
from capstone_lib.shapesworld_text import parse_caption, score_caption
from capstone_lib.validation import validate_conversation

SMALL = dict(seed=3, image_size=64, n_train=40, n_val=20, max_objects=3, captions_per_image=3,
             questions_per_image=4, corpus_docs=200)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> ShapesWorldPaths:
    return generate(tmp_path_factory.mktemp("sw"), progress=False, **SMALL)


# ----------------------------------------------------------------- independent ground truth
_C, _S = "|".join(COLORS), "|".join(SHAPES)
_P = "|".join(sorted(POSITIONS, key=len, reverse=True))


def answer_from_scene(question: str, objects: list[dict]) -> str | None:
    """Answer a ShapesWorld question from the scene, written independently of the generator."""
    q = question.lower().replace("colour", "color")
    pos = re.search(rf"\b(?:at|in|on) the ({_P})\b", q)
    pair = re.search(rf"\b({_C}) ({_S})\b", q)
    if q.startswith(("is there", "can you see", "does the image contain")):
        return "yes" if any((o["color"], o["shape"]) == pair.groups() for o in objects) else "no"
    if q.startswith("where") or q.startswith("in which part"):
        return next(o["position"] for o in objects if (o["color"], o["shape"]) == pair.groups())
    if "how many" in q or q.startswith("count"):
        return NUMBER_WORDS[len(objects)]
    if "color" in q:
        if pos:
            hits = [o for o in objects if o["position"] == pos.group(1)]
        else:
            shape = re.search(rf"\b({_S})\b", q).group(1)
            hits = [o for o in objects if o["shape"] == shape]
        return hits[0]["color"] if len(hits) == 1 else None
    if "shape" in q:
        if pos:
            hits = [o for o in objects if o["position"] == pos.group(1)]
        else:
            color = re.search(rf"\b({_C})\b", q).group(1)
            hits = [o for o in objects if o["color"] == color]
        return hits[0]["shape"] if len(hits) == 1 else None
    return None


def caption_scenes(world: ShapesWorldPaths, split: str) -> dict[int, frozenset]:
    """Scene keys recovered from every caption of every image (they must all agree)."""
    out: dict[int, frozenset] = {}
    for rec in load_coco_captions(world.coco_root, split):
        keys = {frozenset(parse_caption(c)) for c in rec.captions}
        assert len(keys) == 1, (rec.image_id, rec.captions)
        out[rec.image_id] = keys.pop()
    return out


# ----------------------------------------------------------------- tests
def test_same_settings_give_identical_bytes(tmp_path, world):
    again = generate(tmp_path / "again", progress=False, **SMALL)
    assert tree_digest(world.root) == tree_digest(again.root)
    other = generate(tmp_path / "other", progress=False, **{**SMALL, "seed": 4})
    a, b = tree_digest(world.root), tree_digest(other.root)
    assert a.keys() == b.keys() and a != b


def test_layout_matches_architecture(world):
    for p in (world.coco_root / "annotations" / "captions_train2017.json",
              world.coco_root / "annotations" / "captions_val2017.json", world.llava_train,
              world.llava_val, world.corpus_train, world.corpus_val, world.scenes_val,
              world.eval_questions, world.manifest):
        assert p.is_file(), p
    names = sorted(p.name for p in world.train_images.iterdir())
    assert len(names) == SMALL["n_train"] and all(re.fullmatch(r"\d{12}\.png", n) for n in names)
    manifest = json.loads(world.manifest.read_text())
    assert manifest["settings"] == SMALL
    assert manifest["counts"]["val_images"] == SMALL["n_val"]
    coco = json.loads(world.captions_train.read_text())
    assert set(coco) >= {"info", "licenses", "images", "annotations"}
    assert {"id", "file_name", "height", "width"} <= set(coco["images"][0])
    assert {"id", "image_id", "caption"} <= set(coco["annotations"][0])


def test_splits_share_no_image_and_no_scene(tmp_path):
    # one object per scene -> only 6*3*9 = 162 distinct scenes: train must avoid val's
    paths = generate(tmp_path, progress=False, seed=1, image_size=32, n_train=300, n_val=60,
                     max_objects=1, captions_per_image=1, questions_per_image=2, corpus_docs=10)
    train, val = caption_scenes(paths, "train"), caption_scenes(paths, "val")
    assert not set(train) & set(val)
    assert not set(train.values()) & set(val.values())
    assert len(set(val.values())) > 30        # the constraint did bite
    train_files = {p.name for p in paths.train_images.iterdir()}
    assert not train_files & {p.name for p in paths.val_images.iterdir()}


def test_output_loads_through_the_real_format_loaders(world):
    train = load_coco_captions(world.coco_root, "train")
    val = load_coco_captions(world.coco_root, "val")
    assert len(train) == SMALL["n_train"] and len(val) == SMALL["n_val"]
    assert all(len(r.captions) == SMALL["captions_per_image"] for r in train + val)
    assert all(len(set(r.captions)) == len(r.captions) for r in train)   # varied wordings
    img = load_image(train[0].path)
    assert img.mode == "RGB" and img.size == (64, 64)
    conv = load_llava_instruct(world.llava_train, world.train_images)
    assert len(conv) == SMALL["n_train"]
    lengths = Counter(len(r.conversations) // 2 for r in conv)
    assert set(lengths) <= {3, 4} and len(lengths) == 2
    assert load_llava_instruct(world.llava_val, world.val_images)
    first = [r.conversations[0]["value"] for r in conv]
    assert any(v.startswith(IMAGE_TOKEN + "\n") for v in first)
    assert any(v.endswith("\n" + IMAGE_TOKEN) for v in first)
    texts = read_jsonl_texts([world.corpus_train, world.corpus_val])
    assert len(texts) == SMALL["corpus_docs"] and all(IMAGE_TOKEN not in t for t in texts)


def test_captions_and_scene_ground_truth_agree(world):
    scenes = {s["image_id"]: s for s in json.loads(world.scenes_val.read_text())}
    from_captions = caption_scenes(world, "val")
    assert set(scenes) == set(from_captions)
    for image_id, scene in scenes.items():
        objs = scene["objects"]
        assert from_captions[image_id] == scene_key(objs)
        assert 1 <= len(objs) <= SMALL["max_objects"]
        assert len({o["position"] for o in objs}) == len(objs)
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        order = [POSITIONS.index(o["position"]) for o in objs]
        assert order == sorted(order)                          # reading order
        for cap in scene["captions"]:                          # objects mentioned in that order
            found = [m.group(0) for m in re.finditer(rf"\b({_C}) ({_S})\b", cap)]
            assert found == [f"{o['color']} {o['shape']}" for o in objs], cap


def test_pixels_show_the_scene(world):
    scenes = json.loads(world.scenes_val.read_text())
    for scene in scenes[:10]:
        arr = np.asarray(load_image(world.root / scene["image"]), dtype=int)
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["box"]
            cy, cx = int((y0 + y1) / 2 + (y1 - y0) * 0.15), int((x0 + x1) / 2)
            dist = np.abs(arr[cy, cx] - np.array(COLORS[o["color"]])).max()
            assert dist < 40, (scene["image"], o, arr[cy, cx])


def test_shapes_differ_in_fill():
    fills, corners = {}, {}
    for shape in SHAPES:
        obj = ShapeObject("red", shape, "center", (16.0, 16.0, 48.0, 48.0))
        red = np.asarray(render_scene([obj], 64, background=(0, 0, 0)), dtype=int)[..., 0] > 110
        fills[shape] = red[16:48, 16:48].mean()
        corners[shape] = (red[19, 19], red[19, 44], red[44, 19], red[44, 44])
    assert fills["triangle"] < 0.6 < fills["circle"] < 0.85 and 0.6 < fills["square"] < 0.9
    assert all(corners["square"]) and not any(corners["circle"])
    assert corners["triangle"] == (False, False, True, True)


def test_every_answer_follows_from_the_scene(world):
    scenes = {s["image_id"]: s["objects"] for s in json.loads(world.scenes_val.read_text())}
    questions = json.loads(world.eval_questions.read_text())
    for q in questions:
        assert q["type"] in QUESTION_TYPES
        assert answer_from_scene(q["question"], scenes[q["image_id"]]) == q["answer"], q
        assert (world.root / q["image"]).is_file()
    # train conversations: scenes recovered from the captions
    train = {k: [dict(zip(("color", "shape", "position"), t)) for t in v]
             for k, v in caption_scenes(world, "train").items()}
    for rec in json.loads(world.llava_train.read_text()):
        turns = validate_conversation(rec["conversations"])
        objs = train[int(rec["id"])]
        for human, gpt in zip(turns[::2], turns[1::2]):
            q = human["value"].replace(IMAGE_TOKEN, "").strip()
            if q in ("Describe the image.", "What do you see in the image?", "Describe this picture."):
                assert frozenset(parse_caption(gpt["value"])) == scene_key(objs)
            else:
                assert answer_from_scene(q, objs) == gpt["value"], (rec["id"], q)


def test_eval_questions_cover_types_and_balance(world):
    questions = json.loads(world.eval_questions.read_text())
    assert len(questions) == SMALL["n_val"] * SMALL["questions_per_image"]
    by_type = Counter(q["type"] for q in questions)
    assert set(by_type) == set(QUESTION_TYPES) and max(by_type.values()) - min(by_type.values()) <= 1
    yes_no = Counter(q["answer"] for q in questions if q["type"] == "exists")
    assert set(yes_no) == {"yes", "no"}
    val_ids = {s["image_id"] for s in json.loads(world.scenes_val.read_text())}
    assert {q["image_id"] for q in questions} == val_ids
    assert len({q["question"] for q in questions}) > 20        # varied wordings


def test_corpus_mixes_captions_chat_and_text(world):
    kinds = Counter()
    for line in world.corpus_train.read_text().splitlines():
        doc = json.loads(line)
        kinds[doc["meta"]["source"]] += 1
        if doc["meta"]["source"] == "shapesworld-chat":
            assert doc["text"].startswith("Instruct: ") and "\nOutput: " in doc["text"]
            assert doc["text"].endswith("<|endoftext|>")
    assert set(kinds) == {"shapesworld-captions", "shapesworld-chat", "shapesworld-text"}
    # the chat docs are rendered by the course template itself
    turns = [{"from": "human", "value": "Scene: a red circle at the top.\nHow many shapes are there?"},
             {"from": "gpt", "value": "one"}]
    assert "".join(t for t, _ in segments(turns)) == (
        "Instruct: Scene: a red circle at the top.\nHow many shapes are there?\nOutput: one<|endoftext|>")


def test_corpus_mix_and_chat_turns_are_settings(tmp_path):
    world = generate(tmp_path / "chat", progress=False, **{**SMALL, "n_train": 8, "n_val": 4},
                     corpus_mix={"chat": 1}, corpus_chat_turns=5)
    docs = [json.loads(line) for line in world.corpus_train.read_text().splitlines()]
    assert {d["meta"]["source"] for d in docs} == {"shapesworld-chat"}
    turns = Counter(d["text"].count("\nOutput: ") for d in docs)
    assert min(turns) >= 2 and max(turns) == 5                      # 2..5 exchanges per chat
    manifest = json.loads(world.manifest.read_text())
    assert manifest["settings"]["corpus_mix"] == {"chat": 1} and manifest["settings"]["corpus_chat_turns"] == 5
    default = generate(tmp_path / "default", progress=False, **{**SMALL, "n_train": 8, "n_val": 4})
    assert "corpus_mix" not in json.loads(default.manifest.read_text())["settings"]   # old hash kept
    with pytest.raises(ValueError, match="corpus_mix"):
        generate(tmp_path / "bad", progress=False, **SMALL, corpus_mix={"chats": 1})


def _described(world) -> float:
    """The share of training conversations with a description request (one of the generator's prompts)."""
    from capstone_lib.shapesworld_text import _DESCRIBE_PROMPTS

    convs = json.loads(world.llava_train.read_text())
    return sum(any(t["from"] == "human" and t["value"].replace("<image>", "").strip() in _DESCRIBE_PROMPTS
                   for t in c["conversations"]) for c in convs) / len(convs)


def test_describe_fraction_is_a_setting(tmp_path):
    base = {**SMALL, "n_train": 200, "n_val": 4, "corpus_docs": 10}
    default = generate(tmp_path / "default", progress=False, **base)
    every = generate(tmp_path / "every", progress=False, **base, describe_fraction=1.0)
    never = generate(tmp_path / "never", progress=False, **base, describe_fraction=0.0)
    assert _described(every) == 1.0 and _described(never) == 0.0
    assert 0.15 < _described(default) < 0.45                       # the default share, 0.3
    assert "describe_fraction" not in json.loads(default.manifest.read_text())["settings"]  # old hash kept
    assert json.loads(every.manifest.read_text())["settings"]["describe_fraction"] == 1.0
    with pytest.raises(ValueError, match="describe_fraction"):
        generate(tmp_path / "bad", progress=False, **base, describe_fraction=1.5)


def test_explained_exists_answers_state_the_evidence_then_the_right_verdict(tmp_path):
    from capstone_lib.evaluate import yes_no_verdict
    from capstone_lib.shapesworld_text import exists_evidence

    base = {**SMALL, "n_train": 60, "n_val": 4, "corpus_docs": 40, "corpus_mix": {"chat": 1}}
    plain = generate(tmp_path / "plain", progress=False, **base)
    told = generate(tmp_path / "told", progress=False, **base, explain_exists=True)
    assert json.loads(told.manifest.read_text())["settings"]["explain_exists"] is True
    assert "explain_exists" not in json.loads(plain.manifest.read_text())["settings"]   # old hash kept
    # Same draws: the images, captions and held-out questions are identical; only answers differ.
    assert plain.eval_questions.read_text() == told.eval_questions.read_text()
    assert plain.captions_train.read_text() == told.captions_train.read_text()
    scenes = {c["id"]: c for c in json.loads(plain.llava_train.read_text())}
    n = 0
    for conv in json.loads(told.llava_train.read_text()):
        before = scenes[conv["id"]]["conversations"]
        for i, (t, b) in enumerate(zip(conv["conversations"], before)):
            if t["value"] == b["value"]:
                continue
            q = conv["conversations"][i - 1]["value"]
            m = re.search(r"a (\w+) (circle|square|triangle)", q)
            assert t["from"] == "gpt" and m, (q, t["value"])
            assert b["value"] in ("yes", "no") and yes_no_verdict(t["value"]) == b["value"]
            assert re.fullmatch(r"(There is no \w+|The \w+ is \w+|The \w+s are [\w ,]+), so (yes|no)\.",
                                t["value"]), t["value"]
            n += 1
    assert n > 30
    docs = [json.loads(line)["text"] for line in told.corpus_train.read_text().splitlines()]
    assert any(", so yes." in d for d in docs) and any(", so no." in d for d in docs)
    red_square, blue_square = ShapeObject("red", "square", "center"), ShapeObject("blue", "square", "top")
    assert exists_evidence([red_square], "circle") == "There is no circle"
    assert exists_evidence([red_square, blue_square], "square") == "The squares are red and blue"


def test_ensure_reuses_data_with_a_corpus_mix(tmp_path):
    profile = get_profile("smoke", data={"shapesworld": {**SMALL, "n_train": 6, "n_val": 3, "corpus_docs": 10,
                                                         "corpus_mix": {"chat": 3, "captions": 1},
                                                         "corpus_chat_turns": 4}})
    first = ensure_shapesworld(profile, base_dir=tmp_path)
    stamp = first.manifest.stat().st_mtime_ns
    assert ensure_shapesworld(profile, base_dir=tmp_path) == first
    assert first.manifest.stat().st_mtime_ns == stamp            # the manifest matches: reused


def test_parse_and_score_caption():
    got = parse_caption("Two shapes: a Red circle in the top left, and a blue square in the middle.")
    assert got == {("red", "circle", "top left"), ("blue", "square", "center")}
    assert parse_caption("a green triangle") == {("green", "triangle", None)}
    assert parse_caption("nothing to see") == set()
    objs = [{"color": "red", "shape": "circle", "position": "top left"},
            {"color": "blue", "shape": "square", "position": "center"}]
    assert score_caption("a red circle at the top left and a blue square in the center", objs)["exact"] == 1
    s = score_caption("a red circle at the bottom and a green square", objs)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["position_accuracy"] == 0 and s["exact"] == 0


def test_ensure_reuses_and_repairs(tmp_path):
    profile = get_profile("smoke", data={"shapesworld": {**SMALL, "n_train": 12, "n_val": 6,
                                                         "corpus_docs": 20}})
    first = ensure_shapesworld(profile, base_dir=tmp_path)
    assert first.root.name.startswith("shapesworld-") and first.manifest.is_file()
    stamp = first.manifest.stat().st_mtime_ns
    assert ensure_shapesworld(profile, base_dir=tmp_path) == first
    assert first.manifest.stat().st_mtime_ns == stamp            # reused, not regenerated
    first.manifest.unlink()                                        # as if interrupted
    (first.train_images / "000000000001.png").write_bytes(b"partial")
    again = ensure_shapesworld(profile, base_dir=tmp_path)
    assert again.manifest.is_file()
    load_image(again.train_images / "000000000001.png")
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]   # no temp folders left


def test_cpu_profile_settings_generate_complete_data(tmp_path):
    settings = get_profile("cpu").data.shapesworld
    t0, c0 = time.perf_counter(), time.process_time()
    paths = generate(tmp_path, progress=False, **settings)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["counts"]["eval_questions"] >= 300
    assert manifest["counts"]["train_images"] == settings["n_train"]
    assert manifest["counts"]["val_images"] == settings["n_val"]
    # Timing is reported, not asserted (speed goals live in benchmarks, not unit tests).
    print(f"cpu ShapesWorld generated in {cpu:.1f} CPU s, {wall:.1f} s wall")


def test_spoken_truth_answers_the_shipped_questions_from_the_scene():
    from capstone_lib.shapesworld_scenes import ShapeObject
    from capstone_lib.shapesworld_text import spoken_truth

    scene = [ShapeObject("red", "square", "top left"), ShapeObject("blue", "circle", "center")]
    assert spoken_truth("What color is the circle?", scene) == "blue"
    assert spoken_truth("What shape is the red object?", scene) == "square"
    assert spoken_truth("How many shapes are there?", [o.to_dict() for o in scene]) == "two"
    two_circles = scene + [ShapeObject("red", "circle", "bottom")]
    assert spoken_truth("What color is the circle?", two_circles) is None      # ambiguous
    assert spoken_truth("What shape is the red object?", two_circles) is None
    with pytest.raises(KeyError, match="not a shipped spoken question"):
        spoken_truth("What is this?", scene)
