"""The tiny CLIP of the cpu/smoke profiles: trained contrastively on ShapesWorld captions (notebook 02).

No CLIP weights can be installed offline, so these profiles train a small transformers
``CLIPModel`` (vision + text tower) with a word-level tokenizer trained on the same captions,
and save it to ``runs/<profile>/clip/`` (reused while ``tiny_clip_settings`` are unchanged).
Hard negatives (a caption with one colour, shape or position changed) teach it more than
colour; the towers run in the profile's precision and the loss in fp32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .profiles import Profile
from .vision import TINY_CLIP, caption_retrieval_accuracy, load_pixel_values

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")   # ids 0..3; eos must not be 2 (see below)


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


def caption_negatives(caption: str, rng: random.Random,
                      kinds: Sequence[str] = ("color", "shape", "position")) -> list[str]:
    """Hard negatives: copies of ``caption`` with one object's colour, shape or position changed.

    The wording stays the same, so only the changed fact tells the copy from the real caption.
    Returns one copy per kind that could be made (none for a caption without such mentions).
    """
    from .shapesworld_scenes import COLORS, POSITIONS, SHAPES

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
    model.set_attn_implementation(attention_implementation(precision, pixel_values.device.type))
    try:
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
    finally:
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
