"""COCO / LLaVA-Instruct / RedPajama loaders on real-format and hostile input."""
from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
from PIL import Image

from capstone_lib.coco import load_coco_captions
from capstone_lib.llava_data import load_llava_instruct
from capstone_lib.redpajama import iter_jsonl_texts, read_jsonl_texts
from capstone_lib.validation import DataError, SkipCounter

# A record shaped exactly like the real COCO 2017 captions file (extra fields, trailing spaces).
COCO = {
    "info": {"description": "COCO 2017 Dataset", "year": 2017},
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "x"}],
    "images": [
        {"license": 4, "file_name": "000000397133.jpg", "height": 427, "width": 640, "id": 397133},
        {"license": 1, "file_name": "000000037777.jpg", "height": 230, "width": 352, "id": 37777},
    ],
    "annotations": [
        {"image_id": 397133, "id": 370, "caption": "A man is in a kitchen making pizzas."},
        {"image_id": 397133, "id": 381, "caption": "Man in apron standing on front of oven with pans. "},
        {"image_id": 37777, "id": 400, "caption": "The dining table near the kitchen has a bowl.\n"},
        {"image_id": 397133, "id": 500, "caption": "A baker is working in the kitchen."},
    ],
}
# Shaped like llava_instruct_150k.json (<image> at the start, or at the end of the first turn).
LLAVA = [
    {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
        {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
        {"from": "gpt", "value": "The cat is positioned on top of the back of the couch."}]},
]


def write_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (16, 16), (90, 90, 90)).save(folder / name, format="JPEG")


@pytest.fixture
def coco_root(tmp_path) -> Path:
    write_images(tmp_path / "val2017", [im["file_name"] for im in COCO["images"]])
    return tmp_path


def write_coco(root: Path, data, split: str = "val") -> Path:
    path = root / "annotations" / f"captions_{split}2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def llava_dir(tmp_path) -> Path:
    write_images(tmp_path / "images", [r["image"] for r in LLAVA])
    return tmp_path


def write_llava(tmp_path: Path, data) -> Path:
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------ COCO captions
def test_coco_real_format_keeps_every_caption(coco_root):
    write_coco(coco_root, COCO)
    recs = load_coco_captions(coco_root, "val")
    assert [r.image_id for r in recs] == [397133, 37777]
    assert recs[0].captions == ["A man is in a kitchen making pizzas.",
                                "Man in apron standing on front of oven with pans.",
                                "A baker is working in the kitchen."]
    assert recs[1].captions == ["The dining table near the kitchen has a bowl."]
    assert recs[0].path == coco_root / "val2017" / "000000397133.jpg"


def test_coco_malformed_json_names_file_and_position(coco_root):
    path = write_coco(coco_root, json.dumps(COCO)[:-30])
    with pytest.raises(DataError, match=r"malformed JSON at line 1 column \d+") as info:
        load_coco_captions(coco_root, "val")
    assert str(path) in str(info.value)


def test_coco_non_utf8_names_byte(coco_root):
    path = write_coco(coco_root, COCO)
    path.write_bytes(path.read_bytes().replace(b"pizzas", b"pizz\xe0s"))
    with pytest.raises(DataError, match=r"not UTF-8: byte \d+") as info:
        load_coco_captions(coco_root, "val")
    assert str(path) in str(info.value)


def test_coco_missing_file(coco_root):
    with pytest.raises(DataError, match="captions_train2017.json: file not found"):
        load_coco_captions(coco_root, "train")


@pytest.mark.parametrize("change, message, record", [
    (lambda d: d["annotations"][1].pop("caption"), "no 'caption'", "annotations[1] (id 381)"),
    (lambda d: d["annotations"][2].update(caption="   "), "empty caption", "annotations[2] (id 400)"),
    (lambda d: d["annotations"][0].update(caption=17), "must be a string", "annotations[0] (id 370)"),
    (lambda d: d["annotations"][3].update(image_id=5), "unknown image_id", "annotations[3] (id 500)"),
    (lambda d: d["annotations"][3].update(image_id="397133"), "must be an integer", "annotations[3]"),
    (lambda d: d["images"][1].pop("file_name"), "without 'file_name'", "images[1] (id 37777)"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id", "images[2]"),
])
def test_coco_bad_records_raise_or_skip(coco_root, change, message, record):
    data = copy.deepcopy(COCO)
    change(data)
    path = write_coco(coco_root, data)
    with pytest.raises(DataError, match=message) as info:
        load_coco_captions(coco_root, "val")
    assert str(path) in str(info.value) and f"record {record}" in str(info.value)
    skips = SkipCounter()
    recs = load_coco_captions(coco_root, "val", skips=skips)
    assert skips.count >= 1 and record in skips.report()
    assert sum(len(r.captions) for r in recs) <= 4


def test_coco_structure_errors(coco_root):
    write_coco(coco_root, [1, 2])
    with pytest.raises(DataError, match="top level must be an object"):
        load_coco_captions(coco_root, "val")
    write_coco(coco_root, {"images": []})
    with pytest.raises(DataError, match="'annotations'"):
        load_coco_captions(coco_root, "val")


def test_coco_missing_image_file(coco_root):
    write_coco(coco_root, COCO)
    (coco_root / "val2017" / "000000037777.jpg").unlink()
    with pytest.raises(DataError, match="missing image file.*000000037777.jpg") as info:
        load_coco_captions(coco_root, "val")
    assert "record image id 37777" in str(info.value)
    skips = SkipCounter()
    assert [r.image_id for r in load_coco_captions(coco_root, "val", skips=skips)] == [397133]
    assert skips.by_reason == {"missing image file": 1}
    assert len(load_coco_captions(coco_root, "val", check_files=False)) == 2


def test_coco_image_without_captions(coco_root):
    data = copy.deepcopy(COCO)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 37777]
    write_coco(coco_root, data)
    with pytest.raises(DataError, match="image without captions"):
        load_coco_captions(coco_root, "val")
    skips = SkipCounter()
    assert len(load_coco_captions(coco_root, "val", skips=skips)) == 1 and skips.count == 1


# ------------------------------------------------------------------ LLaVA-Instruct
def test_llava_real_format(llava_dir):
    recs = load_llava_instruct(write_llava(llava_dir, LLAVA), llava_dir / "images")
    assert [r.id for r in recs] == ["000000033471", "000000052846"]
    assert recs[0].image == llava_dir / "images" / "000000033471.jpg"
    assert len(recs[0].conversations) == 4 and recs[1].conversations[0]["value"].endswith("<image>")


def turn(i, key, value):
    def change(d):
        d[0]["conversations"][i][key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d[0].pop("id"), "no 'id'"),
    (lambda d: d[0].update(id=[1]), "'id' must be a string or integer"),
    (lambda d: d[0].pop("conversations"), "no 'conversations'"),
    (lambda d: d[0].update(conversations={"from": "human"}), "must be a list"),
    (lambda d: d[0].update(conversations=[]), "is empty"),
    (lambda d: d[0].update(image=3), "'image' must be a non-empty string"),
    (lambda d: d[0]["conversations"].pop(), "odd number of turns"),
    (lambda d: d[0]["conversations"].reverse(), "expected from='human', got 'gpt'"),
    (turn(2, "from", "gpt"), "turn 2: expected from='human'"),
    (turn(1, "from", "assistant"), "turn 1: expected from='gpt'"),
    (lambda d: d[0]["conversations"][1].pop("value"), "turn 1 has no 'value'"),
    (turn(1, "value", None), "turn 1: 'value' must be a string"),
    (turn(3, "value", "  "), "turn 3: empty text"),
    (turn(0, "value", "<image>\n"), "turn 0: empty text"),
    (turn(0, "value", "What is this?"), "contain <image> exactly once, found 0"),
    (turn(0, "value", "<image>\n<image>\nWhat?"), "exactly once, found 2"),
    (turn(2, "value", "<image>\nAnd now?"), "turn 2: <image> may only appear in the first"),
    (lambda d: d.__setitem__(0, "not a record"), "record must be an object"),
])
def test_llava_bad_records_name_file_and_record(llava_dir, change, message):
    data = copy.deepcopy(LLAVA)
    change(data)
    path = write_llava(llava_dir, data)
    with pytest.raises(DataError, match=message) as info:
        load_llava_instruct(path, llava_dir / "images")
    assert str(path) in str(info.value) and "record 0" in str(info.value)
    skips = SkipCounter()
    recs = load_llava_instruct(path, llava_dir / "images", skips=skips)
    assert [r.id for r in recs] == ["000000052846"]
    assert skips.by_reason == {"invalid record": 1} and message.split("'")[0] in skips.report()


def test_llava_text_only_record_is_a_counted_skip(llava_dir):
    data = copy.deepcopy(LLAVA) + [{"id": "oasst-1", "conversations": [
        {"from": "human", "value": "Tell me a joke."}, {"from": "gpt", "value": "Knock knock."}]}]
    path = write_llava(llava_dir, data)
    with pytest.raises(DataError, match="text-only record") as info:
        load_llava_instruct(path, llava_dir / "images")
    assert "record 2 (id 'oasst-1')" in str(info.value)
    skips = SkipCounter()
    assert len(load_llava_instruct(path, llava_dir / "images", skips=skips)) == 2
    assert skips.by_reason == {"text-only record": 1} and "oasst-1" in skips.report()


def test_llava_missing_image_and_skip_limit(llava_dir):
    path = write_llava(llava_dir, LLAVA)
    (llava_dir / "images" / "000000052846.jpg").unlink()
    with pytest.raises(DataError, match="missing image file") as info:
        load_llava_instruct(path, llava_dir / "images")
    assert "record 1 (id '000000052846')" in str(info.value)
    skips = SkipCounter(limit=0)
    with pytest.raises(DataError, match="more than 0 records skipped"):
        load_llava_instruct(path, llava_dir / "images", skips=skips)
    all_bad = write_llava(llava_dir, [LLAVA[1]])
    with pytest.raises(DataError, match="no usable conversation records"):
        load_llava_instruct(all_bad, llava_dir / "images", skips=SkipCounter())


def test_llava_top_level_and_encoding(llava_dir):
    path = write_llava(llava_dir, {"data": LLAVA})
    with pytest.raises(DataError, match="top level must be a list"):
        load_llava_instruct(path, llava_dir)
    path.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        load_llava_instruct(path, llava_dir)
    path.write_text('[{"id": "1", }]')
    with pytest.raises(DataError, match="malformed JSON at line 1 column 14"):
        load_llava_instruct(path, llava_dir)


# ------------------------------------------------------------------ RedPajama jsonl
def write_lines(path: Path, lines) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_jsonl_reads_texts_in_order(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", ['{"text": "one", "meta": {"source": "x"}}', "",
                                           '{"text": "two\\nlines", "meta": {}}'])
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write('{"text": "three"}\n')
    assert list(iter_jsonl_texts(a)) == ["one", "two\nlines"]
    assert read_jsonl_texts([a, b]) == ["one", "two\nlines", "three"]
    assert read_jsonl_texts(tmp_path) == ["one", "two\nlines", "three"]


@pytest.mark.parametrize("bad, message", [
    ('{"text": "ok"', "not JSON"),
    ('{"meta": {}}', "no string 'text' field"),
    ('{"text": 42}', "'text' must be a string, got int"),
    ('["text"]', "must be a JSON object"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "c.jsonl", ['{"text": "fine"}', "", bad])
    with pytest.raises(DataError, match=message) as info:
        list(iter_jsonl_texts(path))
    assert str(info.value).startswith(f"{path}:3: ")


def test_jsonl_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty corpus") as info:
        read_jsonl_texts(tmp_path / "empty.jsonl")
    assert "empty.jsonl" in str(info.value)
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no .jsonl files"):
        read_jsonl_texts(tmp_path / "sub")
    with pytest.raises(DataError, match="file not found"):
        read_jsonl_texts(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- paths stay inside their data set
@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "a/../../b.png", "x" * 300 + ".png", "a\x00b.png"])
def test_record_file_names_cannot_leave_the_data_set(tmp_path, name):
    """COCO and LLaVA records may only name files inside their image folder: a clear error, or a counted skip."""
    import json

    from capstone_lib.coco import load_coco_captions
    from capstone_lib.llava_data import load_llava_instruct
    from capstone_lib.validation import DataError, SkipCounter

    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "ok.png").write_bytes(b"png")
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": name}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a red circle"},
                        {"id": 2, "image_id": 2, "caption": "a blue square"}]}))
    with pytest.raises(DataError, match="outside the data set"):
        load_coco_captions(tmp_path, "train")
    skips = SkipCounter()
    assert [r.image_id for r in load_coco_captions(tmp_path, "train", skips=skips)] == [1]
    assert skips.by_reason["image file name outside the data set"] == 1

    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "a", "image": "ok.png", "conversations": turns},
                                 {"id": "b", "image": name, "conversations": turns}]))
    with pytest.raises(DataError, match="outside the data set"):
        load_llava_instruct(llava, tmp_path / "train2017")
    assert [r.id for r in load_llava_instruct(llava, tmp_path / "train2017", skips=SkipCounter())] == ["a"]


def test_a_checkpoint_manifest_cannot_name_files_outside_it(tmp_path):
    import json

    import torch

    from capstone_lib.checkpoint import CheckpointError, save_checkpoint, verify_checkpoint

    ckpt = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"x": 1}, {"m": 1})
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a file of a checkpoint"):
        verify_checkpoint(ckpt)
