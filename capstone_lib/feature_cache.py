"""Frozen-encoder features computed once and kept on disk, so training never runs CLIP per step.

A cache directory holds::

    features.npy   (rows, N_patches, D) array, read back memory-mapped (np.load mmap_mode="r")
    index.json     {"ids": [image ids], "rows": [row of each id], "skipped": ...}
    meta.json      encoder fingerprint (config + weights + image processor), layer, drop_cls,
                   dtype, shape, requested ids hash. Written last: no meta.json, no cache.

Building again with the same encoder, layer and ids reuses the cache; a different encoder
(any weight, config or preprocessing change) or layer rebuilds it, with a printed message.
Under ``torchrun`` every rank builds a shard and rank 0 merges them in the one-process row
order (``build_feature_cache_sharded``): the cache is the same, byte for byte, whatever the
number of ranks, and every rank reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .profiles import Profile
from .fileio import read_json_or_none, write_json_atomic
from .validation import DataError, SkipCounter, load_json

FORMAT_VERSION = 1


def _canonical(d: dict) -> dict:
    """A config dict without keys that do not change the computation (versions, private names)."""
    return {k: _canonical(v) if isinstance(v, dict) else v for k, v in sorted(d.items())
            if not str(k).startswith("_") and k not in ("transformers_version", "name_or_path")}


def encoder_fingerprint(vision_model, image_processor=None) -> str:
    """sha256 of the encoder's config, every weight (name, dtype, shape, bytes) and processor config."""
    h = hashlib.sha256()
    h.update(json.dumps(_canonical(vision_model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision_model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    if image_processor is not None:
        h.update(json.dumps(_canonical(image_processor.to_dict()), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _ids_hash(ids: Sequence[int]) -> str:
    """sha256 of the requested image ids, in order."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


class FeatureCache:
    """Read side of a cache: ``cache[image_id] -> (N, D)`` memory-mapped rows, ``get_batch``."""

    def __init__(self, cache_dir: Path, meta: dict[str, Any], index: dict[str, Any], array: np.ndarray):
        self.cache_dir, self.meta, self.array = Path(cache_dir), meta, array
        self._row = {int(i): int(r) for i, r in zip(index["ids"], index["rows"])}
        self.skipped = index.get("skipped", {})

    @classmethod
    def open(cls, cache_dir: str | Path) -> "FeatureCache":
        """Open a finished cache (``meta.json`` present); raise ``DataError`` if it is not one."""
        cache_dir = Path(cache_dir)
        meta_path = cache_dir / "meta.json"
        if not meta_path.is_file():
            raise DataError("no finished feature cache here (meta.json missing)", path=cache_dir)
        meta, index = load_json(meta_path), load_json(cache_dir / "index.json")
        _check_meta(meta, meta_path)
        try:
            array = np.load(cache_dir / "features.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"unreadable features array: {err}", path=cache_dir / "features.npy") from None
        _check_index(index, len(array), cache_dir / "index.json")
        if list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]:
            raise DataError(f"features.npy is {array.shape} {array.dtype}, meta.json says "
                            f"{meta['shape']} {meta['dtype']}", path=cache_dir / "features.npy")
        return cls(cache_dir, meta, index, array)

    @property
    def fingerprint(self) -> str:
        """The encoder fingerprint the features were computed with."""
        return self.meta["fingerprint"]

    @property
    def layer(self) -> int:
        """The hidden-state layer that was cached (``-2``: second to last)."""
        return self.meta["layer"]

    @property
    def feature_shape(self) -> tuple[int, int]:
        """``(N_tokens, D)`` of one image's features."""
        return tuple(self.meta["shape"][1:])

    @property
    def ids(self) -> list[int]:
        """Image ids in the cache (skipped images are absent)."""
        return list(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._row

    def __getitem__(self, image_id: int) -> np.ndarray:
        """The ``(N, D)`` features of one image (a read-only memory-mapped view)."""
        try:
            return self.array[self._row[int(image_id)]]
        except KeyError:
            raise KeyError(f"image id {image_id} not in feature cache {self.cache_dir}") from None

    def get_batch(self, ids: Sequence[int], dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """``(B, N, D)`` tensor of the images ``ids`` (in that order), cast to ``dtype`` (None: as stored)."""
        try:
            rows = [self._row[int(i)] for i in ids]
        except KeyError as err:
            raise KeyError(f"image id {err.args[0]} not in feature cache {self.cache_dir}") from None
        batch = torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(rows, dtype=np.int64)]))
        return batch if dtype is None else batch.to(dtype)

    def __repr__(self) -> str:
        return (f"FeatureCache({self.cache_dir}, {len(self)} images x {self.feature_shape}, "
                f"layer {self.layer}, {self.meta['dtype']}, encoder {self.fingerprint[:12]})")


def _wanted_meta(fingerprint: str, layer: int, drop_cls: bool, dtype: str, ids: Sequence[int]) -> dict:
    """The meta keys that decide whether an existing cache can be reused."""
    return {"format": FORMAT_VERSION, "fingerprint": fingerprint, "layer": int(layer),
            "drop_cls": bool(drop_cls), "dtype": str(np.dtype(dtype)), "ids_hash": _ids_hash(ids)}


def _check_meta(meta: Any, path: Path) -> None:
    """``meta.json`` must be an object with an integer ``shape`` (N, tokens, dim) and a ``dtype`` string."""
    if not isinstance(meta, dict):
        raise DataError(f"must be an object, got {type(meta).__name__}", path=path)
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise DataError(f"'shape' must be three non-negative integers, got {shape!r}", path=path)
    for key in ("dtype", "fingerprint"):
        if not isinstance(meta.get(key), str):
            raise DataError(f"{key!r} must be a string, got {meta.get(key)!r}", path=path)


def _check_index(index: Any, n_rows: int, path: Path) -> None:
    """``index.json`` must map image ids to rows of the array: two equal-length integer lists, rows in range."""
    if not isinstance(index, dict) or not isinstance(index.get("ids"), list) or not isinstance(index.get("rows"), list):
        raise DataError("must be an object with the lists 'ids' and 'rows'", path=path)
    ids, rows = index["ids"], index["rows"]
    if len(ids) != len(rows):
        raise DataError(f"{len(ids)} ids but {len(rows)} rows", path=path)
    for i, (image_id, row) in enumerate(zip(ids, rows)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (image_id, row)) or not 0 <= row < n_rows:
            raise DataError(f"entry {i}: id {image_id!r} -> row {row!r} is not an integer id and a row of "
                            f"the {n_rows}-row array", path=path)
    skipped = index.get("skipped", 0)
    if skipped is not None and (not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0):
        raise DataError(f"'skipped' must be a count of images, got {skipped!r}", path=path)


def _why_stale(cache_dir: Path, wanted: dict) -> str | None:
    """None if the cache in ``cache_dir`` matches ``wanted``, else a reason it must be rebuilt."""
    meta_path = cache_dir / "meta.json"
    if not meta_path.is_file():
        return "no cache yet" if not cache_dir.exists() or not any(cache_dir.iterdir()) else \
            "unfinished cache (meta.json missing)"
    meta = read_json_or_none(meta_path)
    if not isinstance(meta, dict):
        return "unreadable meta.json"
    names = {"fingerprint": "encoder changed", "layer": "layer changed", "drop_cls": "drop_cls changed",
             "dtype": "dtype changed", "ids_hash": "image ids changed", "format": "cache format changed"}
    for key, why in names.items():
        if meta.get(key) != wanted[key]:
            old, new = meta.get(key), wanted[key]
            if key == "fingerprint":
                old, new = str(old)[:12], new[:12]
            return f"{why} ({old} -> {new})" if key != "ids_hash" else why
    return None


def build_feature_cache(vision_model, image_processor, items: Sequence[tuple[int, str | Path]],
                        cache_dir: str | Path, layer: int = -2, drop_cls: bool = True,
                        batch_size: int = 64, dtype: str = "float32", skips: SkipCounter | None = None,
                        rank: int = 0, world_size: int = 1) -> FeatureCache:
    """Compute ``hidden_states[layer]`` (CLS dropped) of every ``(image_id, path)`` once, on disk.

    Reuses a matching cache in ``cache_dir``; rebuilds (saying why) when the encoder, layer,
    dtype or ids differ. Unreadable images raise ``DataError`` naming the file, or are counted
    in ``skips`` when given. ``rank``/``world_size`` build only the shard ``items[rank::world_size]``
    (merge the shards with ``merge_feature_shards``).
    """
    from tqdm.auto import tqdm

    from .images import load_image
    from .vision import preprocess, vision_features

    items = list(items)[rank::world_size]
    ids = [int(i) for i, _ in items]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate image ids in the items to cache", path=cache_dir)
    cache_dir = Path(cache_dir)
    wanted = _wanted_meta(encoder_fingerprint(vision_model, image_processor), layer, drop_cls, dtype, ids)
    why = _why_stale(cache_dir, wanted)
    if why is None:
        try:
            cache = FeatureCache.open(cache_dir)
            print(f"feature cache reused: {cache}")
            return cache
        except DataError as err:        # a damaged cache is rebuilt, like a stale one
            why = f"damaged ({err})"
    if why != "no cache yet":
        print(f"feature cache {cache_dir}: rebuilding, {why}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "meta.json").unlink(missing_ok=True)          # invalid until finished

    tmp_path = cache_dir / "features.tmp.npy"
    array = None
    rows: dict[int, int] = {}
    skipped_before = skips.count if skips is not None else 0
    bar = tqdm(total=len(items), desc=f"features -> {cache_dir.name}", unit="img")
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images, kept = [], []
        for offset, (image_id, path) in enumerate(chunk):
            try:
                images.append(load_image(path))
                kept.append((int(image_id), start + offset))
            except DataError as err:
                if skips is None:
                    raise
                skips.skip(f"unreadable image ({err.message.split(':')[0]})", path=path, record=image_id)
        if images:
            with torch.no_grad():
                feats = vision_features(vision_model, preprocess(image_processor, images), layer, drop_cls)
            feats = feats.float().cpu().numpy().astype(dtype, copy=False)
            if array is None:
                array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype,
                                                  shape=(len(items),) + feats.shape[1:])
            for (image_id, row), f in zip(kept, feats):
                array[row] = f
                rows[image_id] = row
        bar.update(len(chunk))
    bar.close()
    if array is None:
        raise DataError(f"no readable image among {len(items)} to cache"
                        + (f" ({skips.report()})" if skips is not None else ""), path=cache_dir)
    array.flush()
    shape = list(array.shape)
    del array
    os.replace(tmp_path, cache_dir / "features.npy")
    n_skipped = (skips.count - skipped_before) if skips is not None else 0
    write_json_atomic(cache_dir / "index.json", {"ids": list(rows), "rows": list(rows.values()),
                                                 "skipped": n_skipped})
    meta = dict(wanted, shape=shape, n_images=len(rows), encoder=getattr(vision_model.config,
                                                                         "_name_or_path", ""))
    write_json_atomic(cache_dir / "meta.json", meta)
    if n_skipped:
        print(f"feature cache {cache_dir}: {n_skipped} images skipped\n{skips.report()}")
    return FeatureCache.open(cache_dir)


def shard_dir(cache_dir: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` builds its shard of ``cache_dir``."""
    return Path(cache_dir) / "shards" / f"rank-{rank:03d}-of-{world_size:03d}"


def merge_feature_shards(cache_dir: str | Path, world_size: int) -> FeatureCache:
    """Concatenate the ``world_size`` shard caches under ``cache_dir/shards/`` into ``cache_dir``."""
    cache_dir = Path(cache_dir)
    shards = [FeatureCache.open(shard_dir(cache_dir, r, world_size)) for r in range(world_size)]
    keys = ("fingerprint", "layer", "drop_cls", "dtype", "format")
    for s in shards[1:]:
        if any(s.meta[k] != shards[0].meta[k] for k in keys):
            raise DataError("shards were built with different encoders or settings", path=s.cache_dir)
    ids = [i for s in shards for i in s.ids]
    (cache_dir / "meta.json").unlink(missing_ok=True)
    tmp_path = cache_dir / "features.tmp.npy"
    shape = [len(ids)] + list(shards[0].feature_shape)
    out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=shards[0].meta["dtype"], shape=tuple(shape))
    row = 0
    for s in shards:
        for i in s.ids:
            out[row] = s[i]
            row += 1
    out.flush()
    del out
    os.replace(tmp_path, cache_dir / "features.npy")
    write_json_atomic(cache_dir / "index.json", {"ids": ids, "rows": list(range(len(ids))),
                                                 "skipped": sum(s.skipped or 0 for s in shards)})
    meta = {k: shards[0].meta[k] for k in keys}
    meta.update(shape=shape, n_images=len(ids), ids_hash=_ids_hash(ids), merged_from=world_size)
    write_json_atomic(cache_dir / "meta.json", meta)
    return FeatureCache.open(cache_dir)


def feature_cache_dir(profile: Profile, split: str) -> Path:
    """``runs/<profile>/features/<split>/``."""
    return profile.run_dir / "features" / split


def build_feature_cache_sharded(vision_model, image_processor, items: Sequence[tuple[int, str | Path]],
                                cache_dir: str | Path, rank: int, world_size: int, layer: int = -2,
                                drop_cls: bool = True, batch_size: int = 64, dtype: str = "float32",
                                skips: SkipCounter | None = None) -> FeatureCache:
    """``build_feature_cache`` by all ranks of a process group: same files as one process would write.

    Collective (every rank calls it). Rank 0 decides whether the cache in ``cache_dir`` can be
    reused; if not, the batches of ``batch_size`` images are dealt round-robin to the ranks
    (each image is encoded in the same batch as a one-process build), each rank writes its
    shard under ``shard_dir``, rank 0 puts the rows back in the order of ``items`` and removes
    the shards, and every rank opens the merged cache. ``features.npy``, ``index.json`` and
    ``meta.json`` equal a one-process build's byte for byte (on the same hardware), so either
    reuses the other's cache. An error on one rank is raised on every rank (nobody hangs).
    """
    import torch.distributed as dist

    items = [(int(i), p) for i, p in items]
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        raise DataError("duplicate image ids in the items to cache", path=cache_dir)
    cache_dir = Path(cache_dir)
    wanted = _wanted_meta(encoder_fingerprint(vision_model, image_processor), layer, drop_cls, dtype, ids)
    why = [_why_stale(cache_dir, wanted) if rank == 0 else None]
    dist.broadcast_object_list(why, src=0)
    if why[0] is None:
        cache = FeatureCache.open(cache_dir)
        if rank == 0:
            print(f"feature cache reused: {cache}")
        return cache
    if rank == 0 and why[0] != "no cache yet":
        print(f"feature cache {cache_dir}: rebuilding on {world_size} ranks, {why[0]}")
    chunks = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    mine = [item for chunk in chunks[rank::world_size] for item in chunk]

    def collective(step: str, work) -> Any:
        """Run ``work`` here, then raise on every rank if it failed on any."""
        result, error = None, None
        try:
            result = work()
        except Exception as err:   # noqa: BLE001 - re-raised below, after the others know
            error = err
        errors: list[Any] = [None] * world_size
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise DataError(f"feature cache {step} failed on rank {failed[0][0]}: {failed[0][1]}",
                            path=cache_dir)
        return result

    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "meta.json").unlink(missing_ok=True)      # invalid until merged
    collective("shard build", lambda: mine and build_feature_cache(
        vision_model, image_processor, mine, shard_dir(cache_dir, rank, world_size), layer=layer,
        drop_cls=drop_cls, batch_size=batch_size, dtype=dtype, skips=skips))
    encoder = getattr(vision_model.config, "_name_or_path", "")
    collective("merge", lambda: rank == 0 and merge_shards_in_order(
        cache_dir, items, min(world_size, len(chunks)), world_size, dict(wanted), encoder))
    return FeatureCache.open(cache_dir)


def merge_shards_in_order(cache_dir: str | Path, items: Sequence[tuple[int, str | Path]], n_shards: int,
                          world_size: int, wanted: dict[str, Any], encoder: str = "") -> FeatureCache:
    """Merge the shards of ranks ``0..n_shards-1`` into ``cache_dir`` in the row order of ``items``.

    Row ``k`` holds ``items[k]`` (zeros for a skipped image), exactly as ``build_feature_cache``
    lays out a one-process cache; the shards are removed afterwards.
    """
    cache_dir = Path(cache_dir)
    position = {int(i): k for k, (i, _) in enumerate(items)}
    shards = [FeatureCache.open(shard_dir(cache_dir, r, world_size)) for r in range(n_shards)]
    keys = ("format", "fingerprint", "layer", "drop_cls", "dtype")
    for s in shards:
        if any(s.meta[k] != wanted[k] for k in keys):
            raise DataError("a shard was built with another encoder or settings", path=s.cache_dir)
    (cache_dir / "meta.json").unlink(missing_ok=True)
    tmp_path = cache_dir / "features.tmp.npy"
    shape = [len(items)] + list(shards[0].feature_shape)
    out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=wanted["dtype"], shape=tuple(shape))
    kept: set[int] = set()
    for s in shards:
        src = np.asarray([s._row[i] for i in s.ids], dtype=np.int64)
        dst = np.asarray([position[i] for i in s.ids], dtype=np.int64)
        for a in range(0, len(src), 1024):          # bounded memory on large caches
            out[dst[a:a + 1024]] = s.array[src[a:a + 1024]]
        kept.update(s.ids)
    out.flush()
    del out
    os.replace(tmp_path, cache_dir / "features.npy")
    order = [int(i) for i, _ in items if int(i) in kept]
    write_json_atomic(cache_dir / "index.json", {"ids": order, "rows": [position[i] for i in order],
                                                 "skipped": sum(int(s.skipped or 0) for s in shards)})
    write_json_atomic(cache_dir / "meta.json", dict(wanted, shape=shape, n_images=len(order), encoder=encoder))
    del shards
    shutil.rmtree(cache_dir / "shards", ignore_errors=True)
    return FeatureCache.open(cache_dir)


def ensure_feature_cache(profile: Profile, split: str, vision=None) -> FeatureCache:
    """The feature cache of ShapesWorld (or COCO) ``split`` ("train"/"val") for ``profile``, built if needed.

    ``vision`` may pass an already loaded ``(vision_model, image_processor)``. Under ``torchrun``
    (``WORLD_SIZE`` > 1, or a process group already initialised) every rank must call it: the
    ranks build shards and share one merged cache (``build_feature_cache_sharded``).
    """
    from .coco import load_coco_captions
    from .data_sources import dataset_paths
    from .distributed import init_distributed, rank_zero_first
    from .vision import load_vision_tower

    rank, world = init_distributed(profile.runtime.device)
    coco_root = dataset_paths(profile).coco_root
    skips = SkipCounter() if profile.runtime.allow_skips else None
    # The whole split is cached (not ``data.subset``): stage 2 may use images stage 1 does not.
    records = load_coco_captions(coco_root, split, skips=skips)
    with rank_zero_first():          # rank 0 alone trains the tiny CLIP if it is missing
        model, processor = vision or load_vision_tower(profile)
    v = profile.vision
    items = [(r.image_id, r.path) for r in records]
    kwargs = dict(layer=v.feature_layer, drop_cls=v.drop_cls, batch_size=v.cache_batch_size,
                  dtype=getattr(v, "cache_dtype", "float32"), skips=skips)
    if rank == 0 and not (feature_cache_dir(profile, split) / "meta.json").is_file():
        from .plan import plan_features
        print(plan_features(profile, len(items), model.config))
    if world > 1:
        return build_feature_cache_sharded(model, processor, items, feature_cache_dir(profile, split),
                                           rank, world, **kwargs)
    return build_feature_cache(model, processor, items, feature_cache_dir(profile, split), **kwargs)
