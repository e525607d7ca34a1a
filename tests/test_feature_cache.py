"""The on-disk feature cache: equal to the features computed in a loop, memory-mapped, reused,
invalidated by a new encoder or layer, and strict (or counting) about bad images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_N_PATCHES, make_tiny_vision
from PIL import Image, ImageDraw

from capstone_lib.feature_cache import (FeatureCache, build_feature_cache, encoder_fingerprint,
                                        merge_feature_shards, shard_dir)
from capstone_lib.images import load_image
from capstone_lib.validation import DataError, SkipCounter
from capstone_lib.vision import preprocess, vision_features

COLOURS = ("red", "blue", "green", "yellow", "purple", "white", "orange")


def draw(i: int, size: int = 40) -> Image.Image:
    """A different small scene for every ``i``: one coloured box on grey at a moving place."""
    img = Image.new("RGB", (size, size), (60 + 9 * i, 60, 70))
    x, y = 3 + (5 * i) % 20, 4 + (7 * i) % 20
    ImageDraw.Draw(img).rectangle((x, y, x + 14, y + 12), fill=COLOURS[i % len(COLOURS)])
    return img


@pytest.fixture
def images(tmp_path):
    """Nine ``(image_id, path)`` items of PNG files (ids are not row numbers)."""
    folder = tmp_path / "img"
    folder.mkdir()
    items = []
    for i in range(9):
        path = folder / f"{1000 + 7 * i:012d}.png"
        draw(i).save(path)
        items.append((1000 + 7 * i, path))
    return items


def loop_features(model, processor, path, layer=-2, drop_cls=True) -> np.ndarray:
    """The features of one image computed directly (what training would do without a cache)."""
    with torch.no_grad():
        return vision_features(model, preprocess(processor, [load_image(path)]), layer, drop_cls)[0].numpy()


class ForwardCounter:
    """Counts how many images the vision tower really encodes (a forward hook, not a mock)."""

    def __init__(self, model):
        self.images = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_out, *rest):
        self.images += args[0].shape[0] if args else 0


def test_cached_features_equal_loop_and_are_memory_mapped(tmp_path, images):
    model, proc = make_tiny_vision()
    cache = build_feature_cache(model, proc, images, tmp_path / "cache", batch_size=4)
    assert len(cache) == len(images) and cache.ids == [i for i, _ in images]
    assert cache.feature_shape == (TINY_N_PATCHES, model.config.hidden_size)
    reopened = FeatureCache.open(tmp_path / "cache")
    assert isinstance(reopened.array, np.memmap) and reopened.array.mode == "r"
    for image_id, path in images:
        np.testing.assert_allclose(reopened[image_id], loop_features(model, proc, path), atol=1e-5)
    ids = [images[5][0], images[0][0], images[5][0]]
    batch = reopened.get_batch(ids)
    assert batch.shape == (3, TINY_N_PATCHES, model.config.hidden_size) and batch.dtype == torch.float32
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    np.testing.assert_allclose(batch[1].numpy(), loop_features(model, proc, images[0][1]), atol=1e-5)
    with pytest.raises(KeyError, match="not in feature cache"):
        reopened.get_batch([123456])
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["fingerprint"] == encoder_fingerprint(model, proc) and meta["layer"] == -2


def test_reuse_without_recompute(tmp_path, images, capsys):
    model, proc = make_tiny_vision()
    counter = ForwardCounter(model)
    first = build_feature_cache(model, proc, images, tmp_path / "c")
    assert counter.images == len(images)
    mtime = (tmp_path / "c" / "features.npy").stat().st_mtime_ns
    second = build_feature_cache(model, proc, images, tmp_path / "c")
    assert counter.images == len(images), "a matching cache must not run the encoder again"
    assert "reused" in capsys.readouterr().out
    assert (tmp_path / "c" / "features.npy").stat().st_mtime_ns == mtime
    assert second.fingerprint == first.fingerprint
    # the same encoder loaded again (a different Python object) has the same fingerprint
    same_model, same_proc = make_tiny_vision()
    assert encoder_fingerprint(same_model, same_proc) == first.fingerprint


def test_encoder_change_invalidates(tmp_path, images, capsys):
    model, proc = make_tiny_vision()
    old = build_feature_cache(model, proc, images, tmp_path / "c")
    old_first = np.array(old[images[0][0]])
    with torch.no_grad():
        model.vision_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 0.5     # one weight changed
    new = build_feature_cache(model, proc, images, tmp_path / "c")
    assert "rebuilding, encoder changed" in capsys.readouterr().out
    assert new.fingerprint != old.fingerprint
    assert not np.allclose(new[images[0][0]], old_first)
    np.testing.assert_allclose(new[images[0][0]], loop_features(model, proc, images[0][1]), atol=1e-5)


def test_processor_change_invalidates(tmp_path, images, capsys):
    model, proc = make_tiny_vision()
    build_feature_cache(model, proc, images, tmp_path / "c")
    proc.image_mean = [0.5, 0.5, 0.5]
    build_feature_cache(model, proc, images, tmp_path / "c")
    assert "encoder changed" in capsys.readouterr().out


def test_layer_change_invalidates(tmp_path, images, capsys):
    model, proc = make_tiny_vision()
    build_feature_cache(model, proc, images, tmp_path / "c", layer=-2)
    last = build_feature_cache(model, proc, images, tmp_path / "c", layer=-1)
    assert "rebuilding, layer changed (-2 -> -1)" in capsys.readouterr().out
    assert last.layer == -1
    np.testing.assert_allclose(last[images[3][0]], loop_features(model, proc, images[3][1], layer=-1),
                               atol=1e-5)
    with_cls = build_feature_cache(model, proc, images, tmp_path / "c", layer=-1, drop_cls=False)
    assert with_cls.feature_shape == (TINY_N_PATCHES + 1, model.config.hidden_size)


def test_new_ids_and_unfinished_cache_rebuild(tmp_path, images, capsys):
    model, proc = make_tiny_vision()
    build_feature_cache(model, proc, images[:4], tmp_path / "c")
    grown = build_feature_cache(model, proc, images, tmp_path / "c")
    assert "image ids changed" in capsys.readouterr().out and len(grown) == len(images)
    (tmp_path / "c" / "meta.json").unlink()                  # as if killed before the end
    with pytest.raises(DataError, match="meta.json missing"):
        FeatureCache.open(tmp_path / "c")
    build_feature_cache(model, proc, images, tmp_path / "c")
    assert "unfinished cache" in capsys.readouterr().out
    assert not list((tmp_path / "c").glob("*.tmp*"))


def test_float16_cache(tmp_path, images):
    model, proc = make_tiny_vision()
    cache = build_feature_cache(model, proc, images, tmp_path / "c", dtype="float16")
    assert cache.array.dtype == np.float16
    assert cache.get_batch([images[0][0]], dtype=None).dtype == torch.float16
    np.testing.assert_allclose(cache[images[0][0]].astype(np.float32),
                               loop_features(model, proc, images[0][1]), atol=2e-3, rtol=2e-3)


def test_image_modes_are_converted(tmp_path):
    model, proc = make_tiny_vision()
    base = draw(2)
    variants = {"L": base.convert("L"), "P": base.convert("P"), "RGBA": base.convert("RGBA"),
                "CMYK": base.convert("CMYK")}
    items = []
    for k, (mode, img) in enumerate(variants.items()):
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(path)
        items.append((k, path))
    cache = build_feature_cache(model, proc, items, tmp_path / "c")
    assert len(cache) == 4 and np.isfinite(cache.array).all()


def bad_files(tmp_path):
    """A truncated PNG, a text file named .jpg, and a missing file."""
    good = tmp_path / "good.png"
    draw(1).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    html = tmp_path / "error_page.jpg"
    html.write_text("<html>404 not found</html>")
    return [truncated, html, tmp_path / "missing.png"]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_bad_image_error_names_the_file(tmp_path, images, which):
    model, proc = make_tiny_vision()
    bad = bad_files(tmp_path)[which]
    with pytest.raises(DataError) as info:
        build_feature_cache(model, proc, images[:3] + [(99, bad)], tmp_path / "c")
    assert str(bad) in str(info.value)
    assert not (tmp_path / "c" / "meta.json").exists()


def test_bad_images_counted_as_skips(tmp_path, images, capsys):
    model, proc = make_tiny_vision()
    bad = bad_files(tmp_path)
    items = images[:4] + [(90 + k, p) for k, p in enumerate(bad)]
    skips = SkipCounter()
    cache = build_feature_cache(model, proc, items, tmp_path / "c", batch_size=3, skips=skips)
    assert skips.count == 3 and len(cache) == 4
    assert sorted(cache.ids) == sorted(i for i, _ in images[:4])
    assert "3 images skipped" in capsys.readouterr().out
    assert all(str(p) in skips.report() or p.name in skips.report() for p in bad[:1])
    for i, path in images[:4]:
        np.testing.assert_allclose(cache[i], loop_features(model, proc, path), atol=1e-5)
    with pytest.raises(DataError, match="no readable image"):
        build_feature_cache(model, proc, [(90, bad[0])], tmp_path / "d", skips=SkipCounter())


def test_shards_merge_to_the_same_cache(tmp_path, images):
    model, proc = make_tiny_vision()
    whole = build_feature_cache(model, proc, images, tmp_path / "whole")
    for rank in range(3):
        build_feature_cache(model, proc, images, shard_dir(tmp_path / "sharded", rank, 3),
                            rank=rank, world_size=3)
    merged = merge_feature_shards(tmp_path / "sharded", 3)
    assert sorted(merged.ids) == sorted(whole.ids) and merged.fingerprint == whole.fingerprint
    np.testing.assert_allclose(merged.get_batch(whole.ids).numpy(), whole.get_batch(whole.ids).numpy(),
                               atol=1e-6)
