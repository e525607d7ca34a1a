"""Tokenizers: a local byte-level BPE for cpu/smoke, the hub tokenizer on GPU profiles.

On ``cpu``/``smoke`` nothing can be downloaded, and a small vocabulary makes a tiny model
much faster (a 50k-row output head would dominate its step), so we train a GPT-2-style
byte-level BPE on the course corpus with the ``tokenizers`` library. It has two special
tokens: ``<|endoftext|>`` (end of document, also the padding token) and ``<image>`` (the
placeholder that stage 1 replaces with image features). It adds no BOS token.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` (with ``tokenizer_class``), the
directory is read both by LitGPT (``litgpt.Tokenizer``) and by ``AutoTokenizer``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .chat import IMAGE_TOKEN

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, IMAGE_TOKEN)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files fetched from the hub for a hub tokenizer (missing ones are skipped).
_HUB_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                        model_max_length: int | None = None) -> Path:
    """Train a byte-level BPE on ``texts`` and save it (tokenizer.json + config) in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the 256 byte symbols "
                         f"+ {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    # GPT-2's split: words keep their leading space; merges never cross a split, which is what
    # keeps the chat template's segments tokenizing exactly like the whole text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))   # marks them special (no-op for the ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": None, "bos_token": None,
        "extra_special_tokens": [IMAGE_TOKEN],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """A short hash of ``tokenizer.json``: caches of token ids are keyed by it."""
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]


def _settings_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_tokenizer(source: str, out_dir: str | Path, texts: Iterable[str] | None = None,
                      vocab_size: int = 1024, model_max_length: int | None = None,
                      corpus_id: str = "") -> Path:
    """A tokenizer directory for LitGPT and transformers; reused when already complete.

    ``source="train"`` trains a local BPE on ``texts`` (``corpus_id`` names the corpus, so a
    different corpus or vocabulary retrains); any other value is a hub id whose tokenizer
    files are downloaded into ``out_dir`` (GPU profiles, e.g. ``EleutherAI/pythia-160m``).
    """
    out_dir = Path(out_dir)
    stamp = out_dir / "capstone_tokenizer.json"
    key = _settings_hash(source, vocab_size, model_max_length, corpus_id)
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key and all(
            (out_dir / f).is_file() for f in TOKENIZER_FILES):
        return out_dir
    if source == "train":
        if texts is None:
            raise ValueError("training a tokenizer needs texts")
        train_bpe_tokenizer(texts, vocab_size, out_dir, model_max_length)
    else:
        from huggingface_hub import snapshot_download
        snapshot_download(source, allow_patterns=_HUB_PATTERNS, local_dir=str(out_dir))
        if not (out_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{source} has no tokenizer.json (LitGPT needs one)")
    stamp.write_text(json.dumps({"key": key, "source": source, "vocab_size": vocab_size}))
    return out_dir


def add_chat_tokens(tokenizer, eos_token: str = EOS_TOKEN):
    """Set eos (``eos_token`` where missing) and pad (= eos where missing); add ``<image>`` as a special token."""
    if tokenizer.eos_token is None:
        tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id) or \
            IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]},
                                     replace_extra_special_tokens=False)
    return tokenizer


def load_tokenizer(path_or_id: str | Path, spec=None):
    """``AutoTokenizer`` for a local directory or hub id, with eos/pad and ``<image>`` set up.

    With an ``LMSpec`` the tokenizer also gets the spec's chat format (its ``chat_template``)
    and is checked against the spec (``lm_spec.check_tokenizer``): a missing end-of-answer
    token or a template that tokenizes inconsistently is an error here, before any training.
    """
    from transformers import AutoTokenizer

    offline = os.path.isdir(str(path_or_id))
    tok = AutoTokenizer.from_pretrained(str(path_or_id), local_files_only=offline)
    if spec is None:
        return add_chat_tokens(tok)
    from .chat import set_format
    from .lm_spec import check_tokenizer

    set_format(add_chat_tokens(tok, spec.eos_token), spec.format)
    check_tokenizer(spec, tok)
    return tok
