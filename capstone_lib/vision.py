"""The vision encoder: load a frozen CLIP vision tower, or train a tiny CLIP on ShapesWorld.

GPU profiles load ``profile.vision.encoder`` (e.g. ``openai/clip-vit-base-patch32``) from the
hub. No CLIP weights can be installed offline, so the ``cpu``/``smoke`` profiles train a tiny
CLIP (a transformers ``CLIPModel``: vision + text tower) contrastively on the ShapesWorld
training captions, with a word-level tokenizer trained on the same captions, and save it to
``runs/<profile>/clip/`` (reused while its settings are unchanged). Either way
``load_vision_tower`` returns a ``CLIPVisionModel`` in eval mode with every weight frozen,
and its standard ``CLIPImageProcessor`` (the one later exported inside the Llava checkpoint).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .profiles import Profile

TINY_CLIP = "tiny-clip"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")   # ids 0..3; eos must not be 2 (see below)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Loading and using a frozen vision tower
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (a CLIPVisionModel ignores the text tower's weights)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with ``requires_grad=False`` everywhere; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def encoder_dir(profile: Profile) -> str | Path:
    """Where the vision encoder comes from: the tiny CLIP's run dir (trained if needed) or a hub id."""
    encoder = profile.vision.encoder
    return train_tiny_clip(profile) if encoder == TINY_CLIP else encoder


def load_image_processor(source: str | Path):
    """The standard (not Fast: that one needs torchvision) ``CLIPImageProcessor`` saved at ``source``."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(str(source))


def load_vision_tower(profile: Profile, device: str | None = None):
    """``(CLIPVisionModel, CLIPImageProcessor)`` for ``profile``: eval mode, frozen, on the profile's device."""
    from transformers import CLIPVisionModel

    source = encoder_dir(profile)
    device = device or profile.runtime.device
    dtype = _DTYPES.get(profile.runtime.precision, torch.float32) if device != "cpu" else torch.float32
    with _quiet_transformers():
        model = CLIPVisionModel.from_pretrained(str(source), dtype=dtype)
    return freeze(model.to(device)), load_image_processor(source)


def load_clip(profile: Profile, device: str | None = None):
    """``(CLIPModel, tokenizer, CLIPImageProcessor)``: both towers, frozen, for zero-shot matching."""
    from transformers import AutoTokenizer, CLIPModel

    source = encoder_dir(profile)
    with _quiet_transformers():
        model = CLIPModel.from_pretrained(str(source))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return freeze(model.to(device or profile.runtime.device)), tokenizer, load_image_processor(source)


def vision_features(vision_model, pixel_values: torch.Tensor, layer: int = -2,
                    drop_cls: bool = True) -> torch.Tensor:
    """Patch features ``(B, N_patches, D)``: ``hidden_states[layer]`` without CLS, exactly as Llava's "default"."""
    param = next(vision_model.parameters())
    out = vision_model(pixel_values.to(param.device, param.dtype), output_hidden_states=True)
    feats = out.hidden_states[layer]
    return feats[:, 1:] if drop_cls else feats


def preprocess(image_processor, images: Sequence) -> torch.Tensor:
    """``pixel_values (B, 3, H, W)`` for a list of RGB PIL images."""
    return image_processor(images=list(images), return_tensors="pt")["pixel_values"]


def load_pixel_values(image_processor, paths: Sequence[str | Path], batch_size: int = 256,
                      desc: str = "images") -> torch.Tensor:
    """Load (``capstone_lib.images.load_image``) and preprocess every image: ``(N, 3, H, W)``."""
    from tqdm.auto import tqdm

    from .images import load_image

    chunks = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, leave=False):
        chunks.append(preprocess(image_processor, [load_image(p) for p in paths[i:i + batch_size]]))
    return torch.cat(chunks)


def patch_similarity_map(patch_feats: torch.Tensor, index: int, center: bool = True) -> torch.Tensor:
    """Cosine similarity of every patch token to patch ``index``, as a square ``(g, g)`` grid.

    ``center`` first subtracts the image's mean patch feature: every token shares a large common
    component, which would otherwise make all similarities look close to 1.
    """
    feats = patch_feats.float()
    feats = F.normalize(feats - feats.mean(0) if center else feats, dim=-1)
    sims = feats @ feats[index]
    side = math.isqrt(len(sims))
    assert side * side == len(sims), f"{len(sims)} patch tokens do not form a square grid (CLS dropped?)"
    return sims.reshape(side, side)


def patch_index_at(x: float, y: float, image_size: int, patch_size: int) -> int:
    """Row-major index of the patch token covering pixel ``(x, y)`` of the (resized) image."""
    side = image_size // patch_size
    col = min(side - 1, max(0, int(x // patch_size)))
    row = min(side - 1, max(0, int(y // patch_size)))
    return row * side + col


def sample_photos() -> dict[str, Path]:
    """Real photos that ship inside installed packages (matplotlib, gradio): name -> path."""
    found = {}
    for package, rel in (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                         ("gradio", "media_assets/images/cheetah1.jpg"),
                         ("gradio", "media_assets/images/lion.jpg"),
                         ("gradio", "media_assets/images/tower.jpg"),
                         ("gradio", "media_assets/images/bus.png")):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            if (Path(root) / rel).is_file():
                found[Path(rel).stem.rstrip("0123456789").replace("_", " ")] = Path(root) / rel
    return found


# --------------------------------------------------------------------------------------------
# The tiny CLIP: tokenizer, config, contrastive training
# --------------------------------------------------------------------------------------------
def train_caption_tokenizer(texts: Sequence[str], max_length: int = 32):
    """A word-level tokenizer (``tokenizers``) trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Every text becomes ``<bos> words... <eos>``; CLIP's text tower reads its summary at ``<eos>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS),
                                                              show_progress=False))
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def tiny_clip_config(tiny: dict[str, Any], tokenizer):
    """A ``CLIPConfig`` from ``profile.vision.tiny_config`` and the caption tokenizer.

    ``eos_token_id`` is 3, not 2: transformers treats a CLIP whose eos id is 2 as a legacy
    checkpoint and pools at the largest token id instead of at ``<eos>``.
    """
    from transformers import CLIPConfig

    heads = tiny["num_attention_heads"]
    text_hidden = tiny.get("text_hidden_size", tiny["hidden_size"])
    text = dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                num_hidden_layers=tiny.get("text_layers", 2), num_attention_heads=heads,
                max_position_embeddings=tiny.get("text_max_len", 32),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(image_size=tiny["image_size"], patch_size=tiny["patch_size"],
                  hidden_size=tiny["hidden_size"], intermediate_size=tiny["intermediate_size"],
                  num_hidden_layers=tiny["num_hidden_layers"], num_attention_heads=heads)
    assert tokenizer.eos_token_id != 2, "CLIP pools at argmax(ids) when eos_token_id == 2"
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=tiny["projection_dim"])


def tiny_image_processor(image_size: int):
    """A standard ``CLIPImageProcessor`` for ``image_size`` px images (resize shortest edge, centre crop)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def contrastive_loss(logits_per_image: torch.Tensor, same_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with soft targets when two images share a caption text.

    ``same_text[i, j]`` is True when caption j is word for word image i's caption; a plain CLIP
    loss would push such an image away from an equally right caption.
    """
    target = same_text.float()
    loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits_per_image, 1)).sum(1)
    loss_t = -(target.t() / target.t().sum(1, keepdim=True) * F.log_softmax(logits_per_image.t(), 1)).sum(1)
    return (loss_i.mean() + loss_t.mean()) / 2


def linear_probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 300,
                          seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression fitted on the first half of ``(x, y)``."""
    torch.manual_seed(seed)
    half = len(x) // 2
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-6
    x = (x - mean) / std
    probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(probe(x[:half]), y[:half]) + 1e-3 * probe.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (probe(x[half:]).argmax(1) == y[half:]).float().mean().item()


@torch.no_grad()
def patch_token_probe(patch_feats: torch.Tensor, scenes: Sequence[Sequence[dict]], source_size: int,
                      image_size: int, patch_size: int) -> dict[str, float]:
    """What one patch token tells a linear classifier: the colour and shape of the object under it.

    ``patch_feats`` is ``(N_images, N_patches, D)`` (CLS dropped); ``scenes`` the objects of each
    image with boxes in ``source_size`` pixels. Probes are fitted on half the objects, scored on
    the other half. Also ``object``: whether a token lies on an object at all (what counting needs),
    and ``place``: which grid cell a token is, from its features alone (what "where?" needs: the
    language model reads the tokens in order, but a small one cannot count its way to a place).
    """
    from .shapesworld import COLORS, SHAPES

    scale = image_size / source_size
    x, colour, shape, occupied_x, occupied_y = [], [], [], [], []
    for feats, objects in zip(patch_feats.float(), scenes):
        on_object = set()
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            index = patch_index_at((x0 + x1) / 2 * scale, (y0 + y1) / 2 * scale, image_size, patch_size)
            on_object.add(index)
            x.append(feats[index])
            colour.append(list(COLORS).index(o["color"]))
            shape.append(SHAPES.index(o["shape"]))
        occupied_x.append(feats)
        occupied_y.extend(int(i in on_object) for i in range(len(feats)))
    x, tokens, n_patches = torch.stack(x), torch.cat(occupied_x), patch_feats.shape[1]
    return {"color": linear_probe_accuracy(x, torch.tensor(colour), len(COLORS)),
            "shape": linear_probe_accuracy(x, torch.tensor(shape), len(SHAPES)),
            "object": linear_probe_accuracy(tokens, torch.tensor(occupied_y), 2),
            "place": linear_probe_accuracy(tokens, torch.arange(n_patches).repeat(len(occupied_x)), n_patches)}


def caption_negatives(caption: str, rng: random.Random,
                      kinds: Sequence[str] = ("color", "shape", "position")) -> list[str]:
    """Hard negatives: copies of ``caption`` with one object's colour, shape or position changed.

    The wording stays the same, so only the changed fact tells the copy from the real caption.
    Returns one copy per kind that could be made (none for a caption without such mentions).
    """
    from .shapesworld import COLORS, POSITIONS, SHAPES

    pattern = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b"
                         rf"(?: (at|in|on) the ({'|'.join(sorted(POSITIONS, key=len, reverse=True))})\b)?",
                         re.IGNORECASE)
    mentions = list(pattern.finditer(caption))
    if not mentions:
        return []
    used_positions = {m.group(4).lower() for m in mentions if m.group(4)}
    out = []
    for kind in kinds:
        group = {"color": 1, "shape": 2, "position": 4}[kind]
        options = [m for m in mentions if m.group(group)]
        if not options:
            continue
        m = rng.choice(options)
        old = m.group(group).lower()
        pool = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}[kind]
        taken = used_positions if kind == "position" else {old}
        new = rng.choice([v for v in pool if v not in taken] or [old])
        if new == old:
            continue
        start = m.start(group)
        if kind == "position":     # keep the wording natural: "on the" only for left/right
            prep = m.group(3).lower()
            valid = {"left": ("on", "at"), "right": ("on", "at"), "top": ("at",), "bottom": ("at",)}
            new = f"{prep if prep in valid.get(new, ('at', 'in')) else 'at'} the {new}"
            start = m.start(3)
        out.append(caption[:start] + new + caption[m.end(group):])
    return out


def _encode_captions(tokenizer, captions: Sequence[Sequence[str]], max_len: int):
    """Token ids of every caption, the image each belongs to, and a text id per distinct caption."""
    flat = [(i, c) for i, caps in enumerate(captions) for c in caps]
    enc = tokenizer([c for _, c in flat], padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    text_ids = {}
    owner = torch.tensor([i for i, _ in flat])
    text_id = torch.tensor([text_ids.setdefault(" ".join(c.lower().split()), len(text_ids)) for _, c in flat])
    return enc["input_ids"], enc["attention_mask"], owner, text_id, [c for _, c in flat]


@torch.no_grad()
def embed_images(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``(N, P)`` (projected CLS), float32 on the CPU."""
    param = next(model.parameters())
    out = [model.get_image_features(pixel_values=pixel_values[i:i + batch_size].to(param.device, param.dtype))
           .pooler_output.float().cpu() for i in range(0, len(pixel_values), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings ``(N, P)`` (projected ``<eos>`` state), float32 on the CPU."""
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    out = model.get_text_features(input_ids=enc["input_ids"].to(device),
                                  attention_mask=enc["attention_mask"].to(device)).pooler_output
    return F.normalize(out.float().cpu(), dim=-1)


@torch.no_grad()
def caption_retrieval_accuracy(model, tokenizer, pixel_values: torch.Tensor, captions: Sequence[str],
                               group: int = 16) -> float:
    """Zero-shot matching: for each image, is its own caption the best among ``group`` captions?

    Images are taken in consecutive groups of ``group`` (chance = 1/group); a pick whose text is
    word for word the image's own caption counts as right.
    """
    was_training = model.training
    model.eval()
    img = embed_images(model, pixel_values)
    txt = embed_texts(model, tokenizer, captions)
    norm = [" ".join(c.lower().split()) for c in captions]
    right = total = 0
    for start in range(0, len(captions) - group + 1, group):
        sims = img[start:start + group] @ txt[start:start + group].t()
        picks = sims.argmax(1).tolist()
        right += sum(norm[start + p] == norm[start + i] for i, p in enumerate(picks))
        total += group
    model.train(was_training)
    return right / max(total, 1)


def describe_objects(objects: Sequence[dict]) -> str:
    """A plain ShapesWorld caption of ``objects`` (dicts with color, shape, position)."""
    def phrase(o: dict) -> str:
        """One object as a phrase, e.g. 'a red circle at the top left'."""
        where = "on the" if o["position"] in ("left", "right") else "at the"
        return f"a {o['color']} {o['shape']} {where} {o['position']}"
    parts = [phrase(o) for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


@torch.no_grad()
def attribute_probe(model, tokenizer, pixel_values: torch.Tensor, scenes: Sequence[Sequence[dict]],
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Zero-shot: does CLIP prefer the true caption over copies with one attribute changed?

    For each image one object is picked; its colour (or shape, or position) is replaced by every
    other value in turn. Returns ``{attribute: {"accuracy", "chance"}}``.
    """
    from .shapesworld import COLORS, POSITIONS, SHAPES

    rng = random.Random(seed)
    values = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}
    img = embed_images(model, pixel_values)
    out = {}
    for attr, options in values.items():
        right, chance = 0, 0.0
        for i, objects in enumerate(scenes):
            k = rng.randrange(len(objects))
            taken = {o[attr] for o in objects} if attr == "position" else {objects[k][attr]}
            alts = [v for v in options if v not in taken]
            texts = [describe_objects(objects)] + [
                describe_objects([dict(o, **{attr: v}) if j == k else o for j, o in enumerate(objects)])
                for v in alts]
            sims = embed_texts(model, tokenizer, texts) @ img[i]
            right += int(sims.argmax().item() == 0)
            chance += 1 / len(texts)
        out[attr] = {"accuracy": right / len(scenes), "chance": chance / len(scenes)}
    return out


def _loss_with_negatives(model, tokenizer, pixel_values, ids, mask, same, negatives: list[str],
                         precision: str = "fp32"):
    """Contrastive loss where the images also see ``negatives`` (captions that match no image).

    The towers run in ``precision``; similarities and the loss in fp32 (in bf16, logits of up to
    100 keep only ~2 significant digits and the loss stalls).
    """
    from .precision import autocast

    with autocast(precision, pixel_values.device.type):
        img = model.get_image_features(pixel_values=pixel_values).pooler_output
        txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        if negatives:
            enc = tokenizer(negatives, padding=True, truncation=True, return_tensors="pt")
            neg = model.get_text_features(**enc).pooler_output
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    scale = model.logit_scale.exp()
    logits_img = scale * img @ txt.t()
    loss_t = contrastive_loss(logits_img, same)                  # both directions over real pairs
    if not negatives:
        return loss_t
    neg = F.normalize(neg.float(), dim=-1)
    logits = torch.cat([logits_img, scale * img @ neg.t()], dim=1)
    target = torch.cat([same.float(), torch.zeros(len(img), len(neg))], dim=1)
    loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    return (loss_t + loss_i) / 2


def fit_tiny_clip(model, tokenizer, pixel_values: torch.Tensor, captions: Sequence[Sequence[str]],
                  steps: int, batch_size: int, lr: float, seed: int = 0, warmup_ratio: float = 0.05,
                  weight_decay: float = 0.05, hard_negatives: Sequence[str] = (),
                  log: Callable[[str], None] | None = None, precision: str = "fp32") -> list[float]:
    """Train ``model`` (a ``CLIPModel``) contrastively on image/caption pairs; returns per-step losses.

    Each step draws ``batch_size`` distinct images and one of each image's captions. With
    ``hard_negatives`` (kinds among "color", "shape", "position") every image also has to reject
    copies of its caption with one such fact changed (``caption_negatives``): a plain contrastive
    loss only learns what tells the images of a batch apart, which is mostly colour.
    ``precision`` (``capstone_lib.precision``): the towers' compute format; the loss stays fp32.
    """
    from tqdm.auto import tqdm

    from .precision import attention_implementation

    max_len = model.config.text_config.max_position_embeddings
    ids, mask, owner, text_id, texts = _encode_captions(tokenizer, captions, max_len)
    by_image = [[] for _ in captions]
    for row, i in enumerate(owner.tolist()):
        by_image[i].append(row)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    batch_size = min(batch_size, len(captions))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    max_scale = math.log(100.0)              # CLIP clamps its temperature at 100
    default_attention = model.config._attn_implementation
    model.set_attn_implementation(attention_implementation(precision, "cpu"))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="tiny CLIP", leave=False)
    for step in bar:
        images = torch.randperm(len(captions), generator=gen)[:batch_size]
        rows = torch.tensor([rng.choice(by_image[i]) for i in images.tolist()])
        length = int(mask[rows].sum(1).max())          # trim padding shared by the whole batch
        same = text_id[rows][:, None] == text_id[rows][None, :]
        negatives = [n for r in rows.tolist() for n in caption_negatives(texts[r], rng, hard_negatives)]
        loss = _loss_with_negatives(model, tokenizer, pixel_values[images], ids[rows, :length],
                                    mask[rows, :length], same, negatives, precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"step {step + 1}/{steps}  contrastive loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.set_attn_implementation(default_attention)
    model.eval()
    return losses


@torch.no_grad()
def scale_position_embeddings(model, std: float | None) -> None:
    """Re-draw the vision tower's position embeddings with ``std`` (None: keep CLIP's 0.02 init).

    CLIP initialises them ~40x smaller than a patch embedding of unit-variance pixels, and a
    contrastive loss never needs a *patch* token to say where it is (the CLS token reads that
    from the keys), so in a tiny CLIP the patch tokens forget their place. A language model
    reading 9 patch tokens must know which cell each one is, so the tiny CLIP starts with
    position embeddings as loud as its patch embeddings (notebook 02 measures the difference).
    """
    if std is not None:
        model.vision_model.embeddings.position_embedding.weight.normal_(0.0, std)


def tiny_clip_settings(profile: Profile, data_id: str) -> dict[str, Any]:
    """Everything the tiny CLIP's weights depend on; a saved CLIP is reused only if these match."""
    v = profile.vision
    return {"tiny_config": v.tiny_config, "clip_train_steps": v.clip_train_steps,
            "clip_batch_size": v.clip_batch_size, "clip_lr": v.clip_lr,
            "clip_hard_negatives": list(v.clip_hard_negatives), "seed": profile.runtime.seed, "data": data_id,
            "position_init_std": v.position_init_std}


def _data_id(paths) -> str:
    """A short id of the ShapesWorld data: its manifest's hash (or the folder name)."""
    manifest = Path(paths.coco_root).parent / "manifest.json"
    if manifest.is_file():
        return Path(paths.coco_root).parent.name + ":" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return str(Path(paths.coco_root).resolve())


def clip_dir(profile: Profile) -> Path:
    """Where the tiny CLIP of ``profile`` lives: ``runs/<profile>/clip/``."""
    return profile.run_dir / "clip"


def train_tiny_clip(profile: Profile, paths=None, force: bool = False) -> Path:
    """Train (or reuse) the tiny CLIP of ``profile`` on ShapesWorld captions; returns its directory.

    The directory holds the ``CLIPModel``, its ``CLIPImageProcessor`` and caption tokenizer
    (``save_pretrained``, safetensors), ``metrics.json`` (losses, zero-shot accuracy) and
    ``settings.json``, written last: a directory whose settings match is reused as it is.
    """
    from .coco import load_coco_captions
    from .shapesworld import ensure_shapesworld

    paths = paths or ensure_shapesworld(profile)
    out = clip_dir(profile)
    settings = tiny_clip_settings(profile, _data_id(paths))
    settings_file = out / "settings.json"
    if not force and settings_file.is_file():
        if json.loads(settings_file.read_text()) == json.loads(json.dumps(settings)):
            return out
        print(f"tiny CLIP settings changed: retraining {out}")
    elif not force:
        print(f"no tiny CLIP in {out} yet: training it now (notebook 02's step, {profile.vision.clip_train_steps} steps)")
    tiny, v = profile.vision.tiny_config, profile.vision
    train = load_coco_captions(paths.coco_root, "train")
    val = load_coco_captions(paths.coco_root, "val")
    t0 = time.perf_counter()
    tokenizer = train_caption_tokenizer([c for r in train for c in r.captions],
                                        max_length=tiny.get("text_max_len", 32))
    processor = tiny_image_processor(tiny["image_size"])
    train_px = load_pixel_values(processor, [r.path for r in train], desc="train images")
    val_px = load_pixel_values(processor, [r.path for r in val], desc="val images")
    torch.manual_seed(profile.runtime.seed)
    from transformers import CLIPModel

    model = CLIPModel(tiny_clip_config(tiny, tokenizer))
    scale_position_embeddings(model, v.position_init_std)
    val_caps = [r.captions[0] for r in val]
    group = min(16, len(val))
    before = caption_retrieval_accuracy(model, tokenizer, val_px, val_caps, group)
    from .precision import describe

    print(f"tiny CLIP: {v.clip_train_steps} steps of {v.clip_batch_size} images; {describe(profile.runtime)}")
    losses = fit_tiny_clip(model, tokenizer, train_px, [r.captions for r in train],
                           steps=v.clip_train_steps, batch_size=v.clip_batch_size, lr=v.clip_lr,
                           seed=profile.runtime.seed, hard_negatives=v.clip_hard_negatives, log=print,
                           precision=profile.runtime.precision)
    after = caption_retrieval_accuracy(model, tokenizer, val_px, val_caps, group)
    metrics = {"seconds": round(time.perf_counter() - t0, 1), "steps": len(losses),
               "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
               "losses": losses, "val_retrieval_group": group,
               "val_retrieval_acc_before": before, "val_retrieval_acc": after,
               "n_train_images": len(train), "n_val_images": len(val)}
    save_tiny_clip(model, processor, tokenizer, out, settings, metrics)
    print(f"tiny CLIP: {len(losses)} steps in {metrics['seconds']} s, loss {losses[0]:.2f} -> "
          f"{metrics['loss_last']:.2f}, val caption matching {before:.2f} -> {after:.2f} "
          f"(chance {1 / group:.2f})")
    return out


def save_tiny_clip(model, processor, tokenizer, out: Path, settings: dict, metrics: dict) -> Path:
    """Write the CLIP dir atomically: a ``.tmp`` dir renamed into place, ``settings.json`` last."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    (out / "settings.json.tmp").write_text(json.dumps(settings, indent=2))
    os.replace(out / "settings.json.tmp", out / "settings.json")
    return out


def clip_metrics(profile: Profile) -> dict[str, Any]:
    """The saved training metrics of the profile's tiny CLIP (empty for a hub encoder)."""
    path = clip_dir(profile) / "metrics.json"
    return json.loads(path.read_text()) if profile.vision.encoder == TINY_CLIP and path.is_file() else {}
