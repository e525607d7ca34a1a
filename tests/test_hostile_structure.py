"""Malformed structure is stopped where data enters, with a DataError naming the file (part of #22)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from capstone_lib.checkpoint import CheckpointError, verify_checkpoint
from capstone_lib.feature_cache import FeatureCache
from capstone_lib.redpajama import read_jsonl_texts
from capstone_lib.validation import DataError, load_json, validate_caption, validate_conversation


@pytest.mark.parametrize("text, message", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"n": ' + "9" * 5000 + "}", "unreadable JSON value"),
    ('{"a": 1,}', "malformed JSON at line 1"),
])
def test_json_that_python_cannot_hold_is_a_data_error(tmp_path, text, message):
    path = tmp_path / "captions_train2017.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        load_json(path)
    assert str(path) in str(err.value)


def test_lone_surrogates_stop_at_the_loader_not_in_the_tokenizer():
    record = json.loads('{"caption": "a red \\ud800 square"}')        # valid JSON, invalid text
    with pytest.raises(DataError, match=r"captions.json: record 7: caption contains an unpaired surrogate"):
        validate_caption(record["caption"], "captions.json", 7)
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red\udc80"}]
    with pytest.raises(DataError, match=r"turn 1 contains an unpaired surrogate \(\\udc80\)"):
        validate_conversation(turns, "llava.json", "0 (id 'x')")


def test_jsonl_corpus_surrogates_and_broken_gzip(tmp_path):
    plain = tmp_path / "corpus.jsonl"
    plain.write_text('{"text": "fine"}\n{"text": "bad \\udc80"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: 'text' contains an unpaired surrogate"):
        read_jsonl_texts(plain)
    blob = gzip.compress("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(4000)).encode())
    truncated = tmp_path / "c4_sample.jsonl.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"c4_sample.jsonl.gz: cannot read past line \d+: .*truncated or corrupt"):
        read_jsonl_texts(truncated)
    corrupt = tmp_path / "wiki.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(DataError, match="wiki.jsonl.gz: cannot read past line 0"):
        read_jsonl_texts(corrupt)


@pytest.mark.parametrize("manifest", [{"files": 3}, {"files": ["model.safetensors"]}, [1, 2], {"nofiles": {}}])
def test_checkpoint_manifest_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, manifest):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json"):
        verify_checkpoint(tmp_path)


def _cache(tmp_path, meta=None, index=None):
    np.save(tmp_path / "features.npy", np.zeros((2, 9, 4), dtype=np.float32))
    (tmp_path / "meta.json").write_text(json.dumps(meta if meta is not None else
                                                   {"shape": [2, 9, 4], "dtype": "float32", "fingerprint": "f"}))
    (tmp_path / "index.json").write_text(json.dumps(index if index is not None else
                                                    {"ids": [5, 6], "rows": [0, 1], "skipped": 1}))
    return tmp_path


def test_a_well_formed_feature_cache_opens(tmp_path):
    cache = FeatureCache.open(_cache(tmp_path))
    assert cache.ids == [5, 6] and cache.get_batch([6]).shape == (1, 9, 4)


@pytest.mark.parametrize("meta, index, message", [
    (["not", "an", "object"], None, "meta.json: must be an object"),
    ({"shape": "2x9x4", "dtype": "float32", "fingerprint": "f"}, None, "'shape' must be three non-negative integers"),
    ({"shape": [2, 9, 4], "dtype": 32, "fingerprint": "f"}, None, "'dtype' must be a string"),
    (None, {"ids": [5, 6], "rows": [0]}, "2 ids but 1 rows"),
    (None, {"ids": [5, "6"], "rows": [0, 1]}, "entry 1: id '6'"),
    (None, {"ids": [5, 6], "rows": [0, 7]}, "row 7 is not"),
    (None, {"ids": 5}, "index.json: must be an object with the lists"),
    (None, {"ids": [5, 6], "rows": [0, 1], "skipped": "none"}, "'skipped' must be a count"),
])
def test_a_feature_cache_index_or_meta_of_the_wrong_type_is_named(tmp_path, meta, index, message):
    with pytest.raises(DataError, match=message):
        FeatureCache.open(_cache(tmp_path, meta, index))


def test_a_symlink_out_of_the_data_set_is_refused_or_counted(tmp_path):
    from capstone_lib.coco import load_coco_captions
    from capstone_lib.validation import SkipCounter, file_in

    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    (images / "000000000001.png").write_bytes(b"fine")
    (images / "000000000002.png").symlink_to(secret)
    assert file_in(images, "000000000001.png") == (images / "000000000001.png", "")
    path, why = file_in(images, "000000000002.png")
    assert path is None and "symbolic link" in why and "outside" in why
    loop = images / "000000000003.png"
    loop.symlink_to(loop)
    assert file_in(images, "000000000003.png")[0] is None
    # A folder that is itself a link (the real-data view links train2017 into its store) is fine.
    linked = tmp_path / "view" / "train2017"
    linked.parent.mkdir()
    linked.symlink_to(images)
    assert file_in(linked, "000000000001.png")[0] == linked / "000000000001.png"

    ann = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.png"}, {"id": 2, "file_name": "000000000002.png"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a red square"},
                        {"id": 11, "image_id": 2, "caption": "a blue circle"}]}))
    with pytest.raises(DataError, match="symbolic link to .*secret.png"):
        load_coco_captions(tmp_path / "coco", "train")
    skips = SkipCounter()
    records = load_coco_captions(tmp_path / "coco", "train", skips=skips)
    assert [r.image_id for r in records] == [1]
    assert skips.by_reason == {"image file name outside the data set": 1, "caption for an unknown image_id": 1}


def test_a_decompression_bomb_upload_gets_a_clear_message(tmp_path):
    import gradio as gr
    from gradio.data_classes import FileData

    from capstone_lib.app import ImageInput
    from test_images import bomb_png

    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(gr.Error, match=r"bomb.png: too many pixels to open safely"):
        ImageInput(type="filepath", image_mode=None).preprocess(FileData(path=str(bomb), orig_name="bomb.png"))
