"""The vision encoder: Llava's feature selection, the ViT-B/32 shapes, the caption tokenizer,
the tiny CLIP's contrastive training, its reuse, and ``load_vision_tower`` from a saved dir."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_N_PATCHES, make_tiny_vision

from capstone_lib import get_profile
from capstone_lib.images import load_image
from capstone_lib.shapesworld_scenes import render_scene, sample_scene
from capstone_lib.vision import (attribute_probe, caption_retrieval_accuracy, describe_objects, load_clip,
                                 load_vision_tower, patch_token_probe, preprocess, sample_photos,
                                 vision_features)
from capstone_lib.tiny_clip import (caption_negatives, contrastive_loss, fit_tiny_clip,
                                    scale_position_embeddings, tiny_clip_config, tiny_image_processor,
                                    train_caption_tokenizer, train_tiny_clip)

CAPTIONS = ["A red circle at the top left.", "Two shapes: a blue square in the center and a "
            "white triangle on the right.", "We see a green triangle at the bottom."]


def test_vision_features_is_llavas_default_selection(tiny_images):
    model, proc = make_tiny_vision()
    px = preprocess(proc, tiny_images)
    with torch.no_grad():
        hidden = model(px, output_hidden_states=True).hidden_states
        feats = vision_features(model, px)
        with_cls = vision_features(model, px, layer=-1, drop_cls=False)
    assert len(hidden) == model.config.num_hidden_layers + 1           # embeddings + each layer
    assert feats.shape == (2, TINY_N_PATCHES, model.config.hidden_size)
    assert torch.equal(feats, hidden[-2][:, 1:])
    assert torch.equal(with_cls, hidden[-1]) and with_cls.shape[1] == TINY_N_PATCHES + 1


def test_vit_b32_is_cls_plus_49_patches_of_768():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig()              # the ViT-B/32 shape of openai/clip-vit-base-patch32
    assert (config.image_size, config.patch_size, config.hidden_size) == (224, 32, 768)
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224), output_hidden_states=True)
        feats = vision_features(model, torch.randn(1, 3, 224, 224))
    assert out.last_hidden_state.shape == (1, 1 + (224 // 32) ** 2, 768) == (1, 50, 768)
    assert len(out.hidden_states) == 13 and feats.shape == (1, 49, 768)


def test_caption_tokenizer_wraps_bos_eos_and_round_trips(tmp_path):
    tok = train_caption_tokenizer(CAPTIONS)
    ids = tok("A red circle at the top left.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.eos_token_id != 2
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle at the top left ."
    assert tok("a purple hexagon")["input_ids"][2:4] == [tok.unk_token_id] * 2
    batch = tok(["a red circle", CAPTIONS[1]], padding=True)["input_ids"]
    assert batch[0][-1] == tok.pad_token_id and len(batch[0]) == len(batch[1])
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path)(CAPTIONS[1])["input_ids"] == tok(CAPTIONS[1])["input_ids"]


def test_text_tower_pools_at_eos_so_padding_does_not_matter():
    from transformers import CLIPModel

    tok = train_caption_tokenizer(CAPTIONS)
    tiny = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, projection_dim=16, text_layers=1, text_max_len=40)
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(tiny, tok)).eval()
    one = tok(["a red circle"], return_tensors="pt")
    padded = tok(["a red circle"], padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        a = model.get_text_features(**one).pooler_output
        b = model.get_text_features(**padded).pooler_output
    torch.testing.assert_close(a, b)


def test_contrastive_loss_matches_clip_and_forgives_duplicate_captions():
    from transformers.models.clip.modeling_clip import clip_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    distinct = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(contrastive_loss(logits, distinct), clip_loss(logits.t()))
    same = distinct.clone()
    same[0, 1] = same[1, 0] = True          # images 0 and 1 have word-for-word the same caption
    swapped = logits[:, [1, 0, 2, 3, 4, 5]]  # giving image 0 caption 1 (same words) costs nothing
    torch.testing.assert_close(contrastive_loss(logits, same), contrastive_loss(swapped, same))
    assert contrastive_loss(logits, same) != contrastive_loss(logits, distinct)


def test_caption_negatives_change_exactly_one_fact():
    from capstone_lib.shapesworld_text import parse_caption

    rng = random.Random(0)
    caption = "There are two shapes: a yellow square at the top and a red circle on the left."
    for _ in range(20):
        negatives = caption_negatives(caption, rng)
        assert len(negatives) == 3
        truth = parse_caption(caption)
        for kind, neg in zip(("color", "shape", "position"), negatives):
            assert neg.startswith("There are two shapes: a ") and neg != caption
            changed = parse_caption(neg) - truth
            assert len(changed) == 1 and len(truth - parse_caption(neg)) == 1, neg
            assert " on the center" not in neg and " on the top" not in neg     # natural wording
            if kind == "position":
                assert next(iter(changed))[2] not in {"top", "left"}          # a free place
    assert caption_negatives("Describe the image.", rng) == []
    assert len(caption_negatives(caption, rng, kinds=("shape",))) == 1


def shapes_data(n: int, seed: int = 0):
    """``n`` one-object ShapesWorld scenes at 32 px with their plain captions."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, 32, 1) for _ in range(n)]
    images = [render_scene(s, 32) for s in scenes]
    return images, [[describe_objects([o.to_dict() for o in s])] for s in scenes]


def test_tiny_clip_training_reduces_contrastive_loss():
    from transformers import CLIPModel

    images, captions = shapes_data(48)
    tok = train_caption_tokenizer([c for caps in captions for c in caps])
    tiny = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=32, text_layers=1, text_max_len=24)
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(tiny, tok))
    px = preprocess(tiny_image_processor(32), images)
    firsts = [c[0] for c in captions]
    before = caption_retrieval_accuracy(model, tok, px, firsts, group=16)
    losses = fit_tiny_clip(model, tok, px, captions, steps=150, batch_size=16, lr=3e-3, seed=0)
    after = caption_retrieval_accuracy(model, tok, px, firsts, group=16)
    assert len(losses) == 150 and not model.training
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    assert after >= 0.4 > before, (before, after)      # chance is 1/16; measured 0.06 -> 0.81


def test_hard_negatives_teach_position():
    """Two- or three-object scenes where only a hard negative forces CLIP to learn where things are."""
    from transformers import CLIPModel

    rng = np.random.default_rng(1)
    scenes = [[o.to_dict() for o in sample_scene(rng, 32, 3)] for _ in range(64)]
    px = preprocess(tiny_image_processor(32), [render_scene(s, 32) for s in scenes])
    captions = [[describe_objects(s)] for s in scenes]
    tok = train_caption_tokenizer([c[0] for c in captions])
    tiny = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, projection_dim=32, text_layers=1, text_max_len=40)
    accuracy = {}
    for kinds in ((), ("position",)):
        torch.manual_seed(0)
        model = CLIPModel(tiny_clip_config(tiny, tok))
        fit_tiny_clip(model, tok, px, captions, steps=150, batch_size=32, lr=3e-3, hard_negatives=kinds)
        accuracy[kinds] = attribute_probe(model, tok, px, scenes)["position"]["accuracy"]
    assert accuracy[("position",)] >= 0.7 and accuracy[("position",)] > accuracy[()] + 0.1, accuracy


def test_loud_position_embeddings_let_a_patch_token_say_where_it_is():
    """With CLIP's 0.02 init a patch token barely knows its cell; at the patch embeddings' scale it does."""
    from transformers import CLIPModel

    rng = np.random.default_rng(2)
    scenes = [[o.to_dict() for o in sample_scene(rng, 36, 3)] for _ in range(120)]
    px = preprocess(tiny_image_processor(36), [render_scene(s, 36) for s in scenes])
    tok = train_caption_tokenizer(CAPTIONS)
    tiny = dict(image_size=36, patch_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=16, text_layers=1, text_max_len=16)
    place = {}
    for std in (None, 1.0):
        torch.manual_seed(0)
        model = CLIPModel(tiny_clip_config(tiny, tok)).eval()
        scale_position_embeddings(model, std)
        with torch.no_grad():
            feats = vision_features(model.vision_model, px)
        place[std] = patch_token_probe(feats, scenes, 36, 36, 12)["place"]
    assert place[1.0] >= 0.95 and place[1.0] > place[None] + 0.2, place


@pytest.fixture(scope="module")
def smoke_clip(tmp_path_factory):
    """The smoke profile's tiny CLIP, trained once into a temporary runs/ folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPSTONE_RUNS", str(tmp_path_factory.mktemp("runs")))
    profile = get_profile("smoke")
    path = train_tiny_clip(profile)
    yield profile, path
    mp.undo()


def test_train_tiny_clip_saves_and_is_reused(smoke_clip, capsys):
    profile, path = smoke_clip
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json",
            "settings.json", "metrics.json"} <= names
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["steps"] == profile.vision.clip_train_steps and len(metrics["losses"]) == metrics["steps"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert train_tiny_clip(profile) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime        # reused, not retrained
    changed = get_profile("smoke", vision={"clip_train_steps": 3})
    train_tiny_clip(changed)
    assert "settings changed" in capsys.readouterr().out
    assert json.loads((path / "metrics.json").read_text())["steps"] == 3
    train_tiny_clip(profile)                                               # back to the profile's
    assert not list(path.parent.glob("clip.*"))                            # no tmp/old dirs left


def test_load_vision_tower_is_frozen_standard_and_matches_clip(smoke_clip):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

    profile, path = smoke_clip
    tower, proc = load_vision_tower(profile)
    assert type(tower) is CLIPVisionModel and type(proc) is CLIPImageProcessor
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    size = profile.vision.tiny_config["image_size"]
    assert proc.crop_size == {"height": size, "width": size} and proc.size == {"shortest_edge": size}
    full = CLIPModel.from_pretrained(path).eval()
    px = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = full.vision_model(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(vision_features(tower, px), expected)


def test_load_vision_tower_from_a_saved_dir_like_the_hub(smoke_clip, tmp_path):
    profile, path = smoke_clip
    hub_like = tmp_path / "some-org--clip"
    shutil.copytree(path, hub_like, ignore=shutil.ignore_patterns("settings.json", "metrics.json"))
    gpu_style = get_profile("smoke", vision={"encoder": str(hub_like)})
    tower, proc = load_vision_tower(gpu_style)
    reference, _ = load_vision_tower(profile)
    for (name, a), (_, b) in zip(tower.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    model, tok, _ = load_clip(gpu_style)
    assert tok("a red circle")["input_ids"][-1] == model.config.text_config.eos_token_id


def test_zero_shot_metrics_are_fractions_with_the_right_chance(smoke_clip):
    from capstone_lib.coco import load_coco_captions
    from capstone_lib.shapesworld import ensure_shapesworld, load_scenes

    profile, _ = smoke_clip
    model, tok, proc = load_clip(profile)
    paths = ensure_shapesworld(profile)
    val = load_coco_captions(paths.coco_root, "val")
    px = preprocess(proc, [load_image(r.path) for r in val])
    scenes = load_scenes(paths)
    probe = attribute_probe(model, tok, px, [scenes[r.image_id] for r in val])
    assert set(probe) == {"color", "shape", "position"}
    assert probe["color"]["chance"] == pytest.approx(1 / 6) and probe["shape"]["chance"] == pytest.approx(1 / 3)
    assert all(0 <= v["accuracy"] <= 1 for v in probe.values())
    acc = caption_retrieval_accuracy(model, tok, px, [r.captions[0] for r in val], group=8)
    assert 0 <= acc <= 1


def test_sample_photos_are_real_images():
    photos = sample_photos()
    assert "grace hopper" in photos
    img = load_image(photos["grace hopper"])
    assert img.mode == "RGB" and min(img.size) > 200
    random.seed(0)
