"""The cpu/smoke tokenizer: a byte-level BPE trained on ShapesWorld text, read by LitGPT and transformers."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from capstone_lib.chat import IMAGE_TOKEN, TemplateError, encode_conversation, encode_prompt
from capstone_lib.shapesworld_scenes import sample_scene
from capstone_lib.shapesworld_text import make_captions, make_conversation, make_corpus_doc
from capstone_lib.tokenizer import (EOS_TOKEN, load_tokenizer, prepare_tokenizer,
                                    tokenizer_fingerprint, train_bpe_tokenizer)


def shapes_texts(n: int = 300, seed: int = 0) -> list[str]:
    """ShapesWorld corpus documents (captions, text-only chats, sentences), as in the real corpus."""
    rng, r = np.random.default_rng(seed), random.Random(seed)
    return [make_corpus_doc(rng, r, 64, 3)["text"] for _ in range(n)]


def shapes_conversations(n: int = 40, seed: int = 1) -> list[list[dict]]:
    """LLaVA-style ShapesWorld conversations with ``<image>`` in the first turn."""
    rng, r = np.random.default_rng(seed), random.Random(seed)
    out = []
    for _ in range(n):
        objs = sample_scene(rng, 64, 3)
        out.append(make_conversation(objs, r.randint(1, 3), make_captions(objs, 2, r), r))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe_tokenizer(shapes_texts(), 512, tmp_path_factory.mktemp("tok"), model_max_length=128)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_files_and_special_tokens(tok_dir, hf_tok):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] and (tok_dir / "tokenizer.json").is_file()
    assert hf_tok.eos_token == EOS_TOKEN and hf_tok.pad_token == EOS_TOKEN
    assert hf_tok.pad_token_id == hf_tok.eos_token_id
    image_id = hf_tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id != hf_tok.eos_token_id and image_id < 512
    # special tokens are atomic, also next to text, and round-trip through decode
    ids = hf_tok(f"x{IMAGE_TOKEN}{IMAGE_TOKEN}red{EOS_TOKEN}", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 2 and ids[-1] == hf_tok.eos_token_id
    assert len(hf_tok) <= 512


def test_no_bos_and_roundtrip(hf_tok):
    text = "A red circle at the top left and a blue square."
    plain = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok(text)["input_ids"] == plain          # nothing added even with special tokens on
    assert hf_tok.decode(plain) == text
    # ShapesWorld words are whole tokens, not spelled out byte by byte
    assert len(plain) <= len(text.split()) + 2


def test_litgpt_reads_the_same_tokenizer(tok_dir, hf_tok):
    from litgpt import Tokenizer

    lit = Tokenizer(tok_dir)
    text = f"Instruct: What colour is the circle?\nOutput: red{EOS_TOKEN}\nInstruct: Where is it?"
    assert not lit.use_bos
    assert lit.eos_id == hf_tok.eos_token_id
    assert lit.encode(text).tolist() == hf_tok(text, add_special_tokens=False)["input_ids"]


def test_chat_template_tokenizes_consistently(hf_tok):
    convs = shapes_conversations()
    assert any(len(c) > 2 for c in convs)
    for conv in convs:
        enc = encode_conversation(hf_tok, conv, n_image_tokens=16, max_len=512, check=True)
        assert enc.input_ids.count(hf_tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 16
        prompt = encode_prompt(hf_tok, [], conv[0]["value"], n_image_tokens=16)
        assert enc.input_ids[:len(prompt)] == prompt


def test_check_catches_an_inconsistent_tokenizer(tmp_path):
    """The consistency check is not vacuous: BPE merges across word boundaries (no GPT-2 split)
    join ``Output:`` with the answer in the whole text but not in the segments."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(shapes_texts(300), trainers.BpeTrainer(
        vocab_size=800, special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN}))
    bad = load_tokenizer(tmp_path)
    failures = 0
    for conv in shapes_conversations(20):
        try:
            encode_conversation(bad, conv, 4, 512, check=True)
        except TemplateError:
            failures += 1
    assert failures > 0


def test_vocab_size_validation(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b c"], 100, tmp_path)


def test_prepare_tokenizer_reuses_and_retrains(tmp_path):
    texts = shapes_texts(100)
    d = prepare_tokenizer("train", tmp_path / "t", texts, 400, corpus_id="a")
    fp = tokenizer_fingerprint(d)
    mtime = (d / "tokenizer.json").stat().st_mtime_ns
    assert prepare_tokenizer("train", d, None, 400, corpus_id="a") == d      # reused: no texts needed
    assert (d / "tokenizer.json").stat().st_mtime_ns == mtime
    prepare_tokenizer("train", d, ["only green"] * 10, 300, corpus_id="b")   # other corpus: retrained
    assert tokenizer_fingerprint(d) != fp
    with pytest.raises(ValueError):
        prepare_tokenizer("train", tmp_path / "u", None, 400)


def test_load_tokenizer_adds_image_token(tmp_path):
    """A tokenizer without ``<image>`` (like a hub one) gets it as a new special token; pad = eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(shapes_texts(50), trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN}))
    tok = load_tokenizer(tmp_path)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == raw.get_vocab_size()                         # appended after the vocabulary
    assert tok(f"a{IMAGE_TOKEN}b", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert tok.pad_token == EOS_TOKEN
