"""The vision encoder: load a frozen CLIP vision tower, and the probes notebook 02 explores it with.

GPU profiles load ``profile.vision.encoder`` (e.g. ``openai/clip-vit-base-patch32``) from the
hub; the ``cpu``/``smoke`` profiles train a tiny CLIP on ShapesWorld first (``tiny_clip``). Either way
``load_vision_tower`` returns a ``CLIPVisionModel`` in eval mode with every weight frozen,
and its standard ``CLIPImageProcessor`` (the one later exported inside the Llava checkpoint).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import random
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .profiles import Profile

TINY_CLIP = "tiny-clip"


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
    if encoder != TINY_CLIP:
        return encoder
    from .tiny_clip import train_tiny_clip

    return train_tiny_clip(profile)


def load_image_processor(source: str | Path):
    """The standard (not Fast: that one needs torchvision) ``CLIPImageProcessor`` saved at ``source``."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(str(source))


def load_vision_tower(profile: Profile, device: str | None = None):
    """``(CLIPVisionModel, CLIPImageProcessor)`` for ``profile``: eval mode, frozen, on the profile's device."""
    from transformers import CLIPVisionModel

    source = encoder_dir(profile)
    device = device or profile.runtime.device
    from .precision import storage_dtype

    dtype = storage_dtype(profile.runtime.precision, device)
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
# Probes: what the patch features and embeddings know (notebook 02)
# --------------------------------------------------------------------------------------------


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
    from .shapesworld_scenes import COLORS, SHAPES

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
    from .shapesworld_scenes import COLORS, POSITIONS, SHAPES

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


