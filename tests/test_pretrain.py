"""Pretraining with LitGPT: the jsonl DataModule, the conversion to transformers, resume, errors."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from capstone_lib import get_profile
from capstone_lib.lit_data import JsonlText, ResumableLoader, TokenBlocks, load_token_ids
from capstone_lib.shapesworld_text import make_corpus_doc
from capstone_lib.tokenizer import EOS_TOKEN, train_bpe_tokenizer
from capstone_lib.validation import DataError


def corpus_docs(n: int, seed: int = 0) -> list[str]:
    rng, r = np.random.default_rng(seed), random.Random(seed)
    return [make_corpus_doc(rng, r, 64, 3)["text"] for _ in range(n)]


def write_jsonl(path, texts, extra_lines=()):
    lines = [json.dumps({"text": t, "meta": {"source": "test"}}) for t in texts] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe_tokenizer(corpus_docs(200), 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def lit_tok(tok_dir):
    from litgpt import Tokenizer
    return Tokenizer(tok_dir)


# ----------------------------------------------------------------------------- data module
def test_blocks_cover_the_token_stream(tmp_path, lit_tok):
    texts = corpus_docs(60, seed=3)
    data = JsonlText(train_path=write_jsonl(tmp_path / "train.jsonl", texts),
                     val_path=write_jsonl(tmp_path / "val.jsonl", texts[:10]), cache_dir=tmp_path / "c")
    data.connect(lit_tok, batch_size=4, max_seq_length=16)
    data.prepare_data()
    # the stream is every document in order, each followed by exactly one EOS
    expected = []
    for t in texts:
        ids = lit_tok.processor.encode(t).ids
        expected += ids if ids[-1] == lit_tok.eos_id else ids + [lit_tok.eos_id]
    assert data.train_ids.tolist() == expected
    joined = "".join(t if t.endswith(EOS_TOKEN) else t + EOS_TOKEN for t in texts)
    assert lit_tok.processor.decode(data.train_ids.tolist(), skip_special_tokens=False) == joined
    blocks = TokenBlocks(data.train_ids, 17)
    assert len(blocks) == (len(expected) - 1) // 16
    for i in range(len(blocks) - 1):                   # blocks of 17 ids, overlapping by one
        assert blocks[i].shape == (17,) and blocks[i][-1] == blocks[i + 1][0]
    assert blocks[1].tolist() == expected[16:33]
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    val = list(data.val_dataloader())
    assert sum(len(b) for b in val) == len(TokenBlocks(data.val_ids, 17))


def test_token_ids_are_cached(tmp_path, lit_tok):
    path = write_jsonl(tmp_path / "c.jsonl", corpus_docs(20))
    first = load_token_ids(path, lit_tok, tmp_path / "cache", verbose=False)
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1
    again = load_token_ids(path, lit_tok, tmp_path / "cache", verbose=False)
    assert isinstance(again, np.memmap) and np.array_equal(first, again)
    write_jsonl(path, corpus_docs(21))                  # the corpus changed: new cache entry
    load_token_ids(path, lit_tok, tmp_path / "cache", verbose=False)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_held_out_validation_when_no_val_file(tmp_path, lit_tok):
    data = JsonlText(train_path=write_jsonl(tmp_path / "t.jsonl", corpus_docs(80)), val_fraction=0.1)
    data.connect(lit_tok, batch_size=2, max_seq_length=16)
    data.setup()
    total = len(data.train_ids) + len(data.val_ids)
    assert len(data.val_ids) == int(total * 0.1)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not JSON"),
    (json.dumps({"txt": "a red circle"}), "no string 'text'"),
    (json.dumps(["a list"]), "JSON object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, lit_tok, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ["A red circle.", "A blue square."], [bad_line])
    data = JsonlText(train_path=path)
    data.connect(lit_tok, batch_size=1, max_seq_length=4)
    with pytest.raises(DataError, match=message) as err:
        data.prepare_data()
    assert f"{path}:3" in str(err.value)


def test_empty_corpus(tmp_path, lit_tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    data = JsonlText(train_path=path)
    data.connect(lit_tok, batch_size=1, max_seq_length=4)
    with pytest.raises(DataError, match="empty corpus") as err:
        data.prepare_data()
    assert str(path) in str(err.value)


def test_corpus_smaller_than_one_block(tmp_path, lit_tok):
    train = write_jsonl(tmp_path / "train.jsonl", corpus_docs(30))
    val = write_jsonl(tmp_path / "tiny.jsonl", ["red"])
    data = JsonlText(train_path=train, val_path=val)
    data.connect(lit_tok, batch_size=1, max_seq_length=64)
    with pytest.raises(DataError, match="fewer than one block") as err:
        data.prepare_data()
    assert str(val) in str(err.value)


def test_loader_resumes_at_the_next_batch():
    ids = np.arange(200, dtype=np.uint16)
    loader = ResumableLoader(TokenBlocks(ids, 5, seed=7), batch_size=3)
    n_per_epoch = len(loader)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    rest = [b.tolist() for b in it] + [b.tolist() for b in loader][:2]   # end of epoch 0, start of 1
    resumed = ResumableLoader(TokenBlocks(ids, 5, seed=7), batch_size=3)
    resumed.load_state_dict(state)
    again = [b.tolist() for b in resumed] + [b.tolist() for b in resumed][:2]
    assert state == {"epoch": 0, "served": 4} and again == rest
    assert len(rest) == n_per_epoch - 4 + 2
    # epochs are shuffled differently, and every block appears once per epoch
    e0 = [tuple(x) for b in ResumableLoader(TokenBlocks(ids, 5, seed=7), batch_size=1) for x in b.tolist()]
    assert sorted(e0) == sorted(tuple(TokenBlocks(ids, 5)[i].tolist()) for i in range(len(e0)))


# ----------------------------------------------------------------------------- conversion
def _lit_checkpoint(tmp_path, vocab: int):
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    config = Config(name="pythia-test", block_size=64, n_layer=2, n_head=4, n_embd=64,
                    intermediate_size=128, rotary_percentage=0.25, parallel_residual=True, bias=True,
                    vocab_size=vocab, padded_vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():                     # non-trivial norms and biases, so a mix-up shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    torch.save({"model": model.state_dict(), "iter_num": 3}, ckpt / "lit_model.pth")
    save_config(config, ckpt)
    return ckpt, model.eval()


def test_converted_model_matches_litgpt(tmp_path, tok_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capstone_lib.pretrain import hf_generate, lit_generate

    from capstone_lib.language_model import convert_to_hf, hf_complete

    ckpt, lit = _lit_checkpoint(tmp_path, vocab=400)
    out = convert_to_hf(ckpt, tok_dir, tmp_path / "hf", info={"note": "test"})
    assert hf_complete(out) and not (tmp_path / "hf.tmp").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    x = torch.randint(0, 400, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lit(x), atol=1e-5, rtol=1e-5)
    prompts = ["A red circle", "Instruct: Where is the blue square?\nOutput:"]
    assert hf_generate(hf, tok, prompts, 12) == lit_generate(lit, tok_dir, prompts, 12)
    assert tok.eos_token == EOS_TOKEN and tok.convert_tokens_to_ids("<image>") < 400
    assert json.loads((out / "capstone_hf.json").read_text())["note"] == "test"


def test_conversion_refuses_other_architectures():
    from litgpt import Config

    from capstone_lib.language_model import hf_config_from_lit

    with pytest.raises(ValueError, match="GPT-NeoX"):
        hf_config_from_lit(Config.from_name("tiny-llama-1.1b"))
    cfg = hf_config_from_lit(Config.from_name("pythia-160m"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (768, 12, 50304)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25


def test_load_language_model_offline(tmp_path, tok_dir, monkeypatch):
    from capstone_lib.lm_spec import lm_preset
    from capstone_lib.language_model import convert_to_hf, ensure_language_model, load_language_model

    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path / "runs"))
    smoke = get_profile("smoke")
    ckpt, _ = _lit_checkpoint(tmp_path, vocab=400)
    convert_to_hf(ckpt, tok_dir, smoke.run_dir / "pretrain" / "hf")
    assert ensure_language_model(smoke) == smoke.run_dir / "pretrain" / "hf"   # no training needed
    model, tok = load_language_model(smoke)
    assert tok.pad_token == tok.eos_token == EOS_TOKEN
    ids = tok("Instruct: <image>\nWhat?", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<image>") in ids
    assert model.get_input_embeddings().num_embeddings == 400      # not resized: <image> fits
    assert ensure_language_model(get_profile("a100")) == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert ensure_language_model(get_profile("t4")) == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert ensure_language_model(get_profile("a100", lm=lm_preset("phi-2"))) == "microsoft/phi-2"


# ----------------------------------------------------------------------------- LitGPT runs
@pytest.mark.slow
def test_resume_continues_the_step_count(tmp_path, monkeypatch):
    """Stop a run (small token budget), resume with a bigger one: steps continue, not restart."""
    from capstone_lib.pretrain import read_metrics, run_pretraining, tokens_per_iter

    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path))
    profile = get_profile("smoke", pretrain={"save_interval": 3, "eval_interval": 3})
    per_iter = tokens_per_iter(profile)
    first = run_pretraining(profile, max_tokens=6 * per_iter, resume=False, verbose="none")
    assert first.resumed_from is None and first.initial_val_loss > first.final_val_loss
    lit = first.out_dir
    assert (lit / "step-00000006" / "lit_model.pth").is_file()
    partial = lit / "step-00000007"                    # a save cut off by the interruption
    partial.mkdir()
    (partial / "lit_model.pth").write_bytes(b"PK\x03\x04 truncated")
    second = run_pretraining(profile, max_tokens=9 * per_iter, verbose="none")
    assert second.resumed_from.endswith("step-00000006/lit_model.pth") and not partial.exists()
    ckpt = torch.load(lit / "step-00000009" / "lit_model.pth", weights_only=True)
    assert (ckpt["iter_num"], ckpt["step_count"]) == (9, 9)
    assert ckpt["train_dataloader"]["served"] + ckpt["train_dataloader"]["epoch"] > 0
    second_log = (lit / "logs" / "csv" / "version_1" / "metrics.csv").read_text().splitlines()
    iters = [int(float(r.split(",")[second_log[0].split(",").index("iter")]))
             for r in second_log[1:] if r.split(",")[second_log[0].split(",").index("iter")]]
    assert iters[0] == 7 and iters[-1] == 9                  # continued from the checkpoint
    rows = read_metrics(lit)
    assert [r["iter"] for r in rows if "iter" in r] == list(range(1, 10))
    # the same settings again: nothing to do
    assert run_pretraining(profile, max_tokens=9 * per_iter, verbose="none").skipped


def test_a_failing_command_raises_with_the_log_tail(tmp_path):
    import sys

    from capstone_lib.pretrain import PretrainError, PretrainPaths, run_litgpt

    paths = PretrainPaths(tmp_path / "pretrain")
    script = ("print('Epoch 1 | iter 1 step 1 | loss train: 6.500, val: 6.900 | iter time: 1 ms');"
              "import sys; print('ValueError: bad precision', flush=True); sys.exit(3)")
    with pytest.raises(PretrainError, match="exit code 3") as err:
        run_litgpt([sys.executable, "-c", script], paths, max_iters=5, verbose="none")
    assert "ValueError: bad precision" in str(err.value) and str(paths.log) in str(err.value)
    assert "loss train: 6.500" in paths.log.read_text()
    ok = run_litgpt([sys.executable, "-c", script.split(";import")[0]], paths, 5, verbose="none")
    assert ok.initial_val_loss == 6.9


def test_bad_corpus_fails_before_litgpt_starts(tmp_path, monkeypatch):
    from capstone_lib.pretrain import run_pretraining

    monkeypatch.setenv("CAPSTONE_RUNS", str(tmp_path / "runs"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", corpus_docs(5), [json.dumps({"meta": {}})])
    profile = get_profile("smoke", data={"source": "real", "redpajama_dir": str(corpus)})
    with pytest.raises(DataError, match=r"a\.jsonl:6"):
        run_pretraining(profile, verbose="none")
    assert not (profile.run_dir / "pretrain" / "train.log").exists()
