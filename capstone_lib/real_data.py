"""Real data for the GPU profiles: COCO 2017 captions + images and LLaVA-Instruct-150K, fetched once.

``ensure_real_data(profile)`` downloads what the profile needs (resumable HTTP downloads with a
``.part`` file and Range requests, checked against the known MD5 and size, extracted once with a
marker file), then writes a *view* in exactly the layout of ShapesWorld (``RealDataPaths`` has
the attribute names of ``ShapesWorldPaths``), so stages 1-2 and the feature cache run unchanged::

    <base>/coco2017/     annotations/ train2017/ val2017/     the store (or data.coco_root)
    <base>/llava/        llava_instruct_150k.json             (or data.llava_json)
    <base>/view-<hash>/  coco/annotations/captions_{train,val}2017.json, instances_val2017.json
                         coco/train2017 -> store, coco/val2017/ (links), llava/*.json, manifest.json

The LLaVA validation split is held out *by image*: a deterministic slice of the LLaVA images
(ranked by a hash of the file name) whose conversations go to ``llava_instruct_val.json`` and
whose images go to the view's val split, never to train (captions included). With
``data.subset`` only the images needed are fetched one by one (a thread pool) instead of the
18 GB zip: a first run takes minutes.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .fileio import read_json_or_none
from .shapesworld import ShapesWorldPaths
from .validation import DataError, SkipCounter, load_json, raise_or_skip

VIEW_VERSION = 2      # bump whenever the view's files change for the same settings (2: held-out images hard-linked)
USER_AGENT = "capstone-lib/1 (+course data download)"


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Remote:
    """A file to download: its URL and, when known, its MD5 and size in bytes."""

    url: str
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class RealDataSources:
    """Where the real data comes from (change the URLs for a mirror, or a local server in tests)."""

    annotations: Remote = Remote("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                                 "f4bbac642086de4f52a3fdda2de5fa2c", 252_907_541)
    train_zip: Remote = Remote("http://images.cocodataset.org/zips/train2017.zip",
                               "cced6f7f71b7629ddf16f17bbcfab6b2", 19_336_861_798)
    val_zip: Remote = Remote("http://images.cocodataset.org/zips/val2017.zip",
                             "442b8da7639aecaf257c1dceb8ba8c80", 815_585_330)
    image_base_url: str = "http://images.cocodataset.org"      # + /train2017/<file_name>
    llava_repo: str = "liuhaotian/LLaVA-Instruct-150K"          # a hub dataset
    llava_file: str = "llava_instruct_150k.json"
    llava_url: str | None = None                                # plain HTTP instead of the hub

    @classmethod
    def from_env(cls) -> "RealDataSources":
        """The real sources, or a mirror's: ``$CAPSTONE_REAL_SOURCES`` names a JSON file of these fields.

        The file holds ``annotations``/``train_zip``/``val_zip`` as ``{"url", "md5", "size"}`` and
        the other fields as values (``tools/rehearsal.py`` writes one for its loopback mirror).
        """
        path = os.environ.get("CAPSTONE_REAL_SOURCES")
        if not path:
            return cls()
        data = load_json(Path(path))
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise DataError(f"expected an object with keys from {sorted(known)}", path=path)
        remotes = {k: Remote(**v) for k, v in data.items() if k in ("annotations", "train_zip", "val_zip")}
        return cls(**{**data, **remotes})


# ----------------------------------------------------------------------------- download
class DownloadError(OSError):
    """A download that failed after its retries (a re-run resumes from the ``.part`` file)."""


_RETRYABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError)


def file_digest(path: str | Path, algorithm: str = "md5", progress: bool = False) -> str:
    """Hex digest of a file, read in 4 MiB blocks (a progress bar for big files)."""
    from tqdm.auto import tqdm

    path = Path(path)
    h = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"{algorithm} {path.name}",
                                     disable=not progress or size < 256 << 20, leave=False) as bar:
        while block := f.read(4 << 20):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _verify(part: Path, dest: Path, url: str, size: int | None, md5: str | None,
            sha256: str | None, progress: bool) -> None:
    got = part.stat().st_size
    problem = None
    if size is not None and got != size:
        problem = f"size {got} bytes, expected {size}"
    else:
        for algo, want in (("md5", md5), ("sha256", sha256)):
            if want and (have := file_digest(part, algo, progress)) != want.lower():
                problem = f"{algo} {have}, expected {want.lower()}"
                break
    if problem:
        part.unlink(missing_ok=True)
        raise DataError(f"download from {url} is corrupt ({problem}); the partial file was deleted, "
                        "run again to download it afresh", path=dest)


def download_file(url: str, dest: str | Path, *, md5: str | None = None, sha256: str | None = None,
                  size: int | None = None, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
                  chunk_size: int = 1 << 20, progress: bool = True, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` once: resumes ``dest.part`` with a Range request, retries, checks.

    A present ``dest`` is trusted (it is only ever renamed from a verified ``.part``). The
    size and MD5/SHA-256, when given, are checked before the rename; a mismatch deletes the
    partial file and raises ``DataError``. A server that ignores Range restarts from zero.
    Network errors are retried ``retries`` times in a row without progress (``DownloadError``).
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures, last_error = 0, None
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset >= size:
            break                                       # complete (or too long: _verify says so)
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if offset and resp.status != 206:          # Range ignored: start again
                    offset = 0
                elif offset:
                    start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not start or int(start.group(1)) != offset:
                        raise DownloadError(f"{url}: server answered Range {offset}- with "
                                            f"{resp.headers.get('Content-Range')!r}")
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length is not None else size
                with open(part, "ab" if offset else "wb") as f, \
                        tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=desc or dest.name, disable=not progress, leave=False) as bar:
                    while buf := resp.read(chunk_size):
                        f.write(buf)
                        bar.update(len(buf))
            got = part.stat().st_size
            if total is not None and got < total:        # the connection closed early
                raise http.client.IncompleteRead(b"", total - got)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:               # nothing past offset: complete, or too long
                full = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") if err.headers else "")
                if full is None or int(full.group(1)) == offset:
                    break
                part.unlink()
                continue
            if err.code < 500 and err.code != 429:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            last_error = err
        except DownloadError:
            raise
        except _RETRYABLE as err:
            last_error = err
        now = part.stat().st_size if part.exists() else 0
        failures = 0 if now > offset else failures + 1   # progress resets the count
        if failures > retries:
            raise DownloadError(f"{url}: gave up after {retries} retries without progress "
                                f"({now} bytes in {part}; run again to resume): {last_error}")
        time.sleep(min(backoff * 2 ** max(failures - 1, 0), 30.0))
    _verify(part, dest, url, size, md5, sha256, progress)
    os.replace(part, dest)
    return dest


def download_images(base_url: str, names: Iterable[str], dest_dir: str | Path, workers: int = 16,
                    progress: bool = True, desc: str = "images", **kwargs: Any) -> int:
    """Fetch ``<base_url>/<name>`` for each name missing in ``dest_dir`` (thread pool); returns #fetched."""
    from tqdm.auto import tqdm

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    todo = [n for n in dict.fromkeys(names) if not (dest_dir / n).is_file()]
    if not todo:
        return 0
    failed: list[str] = []
    base = base_url.rstrip("/")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
        futures = {pool.submit(download_file, f"{base}/{n}", dest_dir / n, progress=False, **kwargs): n
                   for n in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except (DownloadError, DataError) as err:
                failed.append(f"{futures[fut]} ({err})")
            bar.update(1)
    if failed:
        raise DownloadError(f"{len(failed)} of {len(todo)} images from {base} failed, e.g. "
                            f"{'; '.join(failed[:3])}; the others are kept: run again to retry")
    return len(todo)


def extract_zip(zip_path: str | Path, dest: str | Path, members: Callable[[str], bool] | None = None,
                progress: bool = True) -> Path:
    """Extract (the ``members`` of) a zip into ``dest`` once; a marker file records it is complete."""
    from tqdm.auto import tqdm

    zip_path, dest = Path(zip_path), Path(dest)
    marker = dest / f".extracted-{zip_path.name}"
    if marker.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise DataError(f"not a zip archive ({err}); delete it and run again", path=zip_path) from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and (members is None or members(n))]
        if not names:
            raise DataError("the archive holds none of the expected files", path=zip_path)
        for name in tqdm(names, desc=f"extract {zip_path.name}", unit="file", disable=not progress,
                         leave=False):
            zf.extract(name, dest)        # zipfile drops absolute paths and '..' (no zip-slip)
    marker.write_text(json.dumps({"zip": zip_path.name, "bytes": zip_path.stat().st_size,
                                  "files": len(names)}), encoding="utf-8")
    return dest


def fetch_zip(remote: Remote, download_dir: Path, dest: Path, members: Callable[[str], bool] | None = None,
              keep_zip: bool = False, progress: bool = True) -> Path:
    """Download and extract ``remote`` once into ``dest`` (skipped entirely when already extracted)."""
    name = remote.url.rstrip("/").rsplit("/", 1)[-1]
    if (dest / f".extracted-{name}").is_file():
        return dest
    zip_path = download_file(remote.url, download_dir / name, md5=remote.md5, size=remote.size,
                             progress=progress)
    extract_zip(zip_path, dest, members, progress)
    if not keep_zip:
        zip_path.unlink()
    return dest


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class RealDataPaths(ShapesWorldPaths):
    """A view of the real data with the same layout and attribute names as ``ShapesWorldPaths``.

    ``train_images`` links to the store's ``train2017``; ``val_images`` holds the val2017 slice
    plus the held-out LLaVA images. There is no scene ground truth, eval question file or text
    corpus for real data (those attributes are ``None``).
    """

    @property
    def instances_val(self) -> Path:
        """COCO instances JSON of the val2017 slice (object labels for POPE)."""
        return self.coco_root / "annotations" / "instances_val2017.json"

    scenes_val = eval_questions = corpus_train = corpus_val = property(lambda self: None)

    def heldout_image_ids(self) -> set[int]:
        """Ids of the train2017 images held out for LLaVA validation (in the view's val split)."""
        return set(load_json(self.manifest).get("heldout_image_ids", []))


# ----------------------------------------------------------------------------- view
def _rank(name: str, seed: int) -> str:
    """A deterministic, order-free ranking key for an image file name."""
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _link(src: Path, dst: Path) -> None:
    """Relative symlink ``dst -> src``; hard link or copy where symlinks are not allowed."""
    try:
        os.symlink(os.path.relpath(src, dst.parent), dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _coco_index(path: Path) -> tuple[dict, dict[str, dict], dict[int, list[dict]]]:
    """(data, file_name -> image entry, image id -> annotations) of a COCO JSON file."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError("not a COCO annotation file (needs 'images' and 'annotations' lists)", path=path)
    by_name: dict[str, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or \
                not isinstance(img.get("id"), int):
            raise DataError("image entry without 'file_name' and integer 'id'", path=path, record=f"images[{i}]")
        by_name[img["file_name"]] = img
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict) and "image_id" in a:
            anns.setdefault(a["image_id"], []).append(a)
    return data, by_name, anns


def _coco_subset(data: dict, images: list[dict], anns: dict[int, list[dict]], note: str) -> dict:
    out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    out["info"] = {**(data.get("info") or {}), "description": note}
    out["images"] = images
    out["annotations"] = [a for img in images for a in anns.get(img["id"], [])]
    return out


def _llava_image_name(image: str) -> str:
    """``000000033471.jpg`` or ``coco/train2017/000000033471.jpg`` -> ``000000033471.jpg``."""
    return Path(image).name


@dataclass
class _Plan:
    train: list[str] = field(default_factory=list)      # train2017 file names of the train split
    heldout: list[str] = field(default_factory=list)    # train2017 file names held out (LLaVA val)
    val: list[str] = field(default_factory=list)        # val2017 file names


def plan_split(llava_records: list, train_names: Iterable[str], val_names: Iterable[str],
               subset: int | None, val_subset: int | None, heldout_images: int, seed: int = 0,
               skips: SkipCounter | None = None, llava_path: Path | None = None) -> _Plan:
    """Choose the train/held-out/val images: LLaVA images first (shared by both stages), by hash rank."""
    known = set(train_names)
    llava_names = set()
    for i, rec in enumerate(llava_records):
        image = rec.get("image") if isinstance(rec, dict) else None
        if not isinstance(image, str):
            raise_or_skip(skips, "text-only record", llava_path, f"{i}")
            continue
        name = _llava_image_name(image)
        if name not in known:
            raise_or_skip(skips, "image not in COCO train2017 captions", llava_path, f"{i}", image)
            continue
        llava_names.add(name)
    ranked = sorted(llava_names, key=lambda n: _rank(n, seed))
    if heldout_images >= len(ranked):
        raise DataError(f"cannot hold out {heldout_images} of {len(ranked)} LLaVA images for validation; "
                        "lower data.llava_val_images", path=llava_path)
    heldout = ranked[:heldout_images]
    others = sorted(known - llava_names, key=lambda n: _rank(n, seed))
    pool = ranked[heldout_images:] + others
    val = sorted(val_names, key=lambda n: _rank(n, seed))
    return _Plan(train=pool[:subset] if subset else pool, heldout=heldout,
                 val=val[:val_subset] if val_subset else val)


def _setting(profile: Any, key: str, default: Any) -> Any:
    value = getattr(profile.data, key, None)
    return default if value is None else value


def real_data_base(profile: Any) -> Path:
    """Download folder: ``data.download_dir``, else ``$CAPSTONE_DATA_DIR/real``, else ``data/real``."""
    from .profiles import REPO_ROOT

    explicit = getattr(profile.data, "download_dir", None)
    if explicit:
        return Path(explicit)
    env = os.environ.get("CAPSTONE_DATA_DIR")
    return Path(env) / "real" if env else REPO_ROOT / "data" / "real"


def ensure_real_data(profile: Any, sources: RealDataSources | None = None, base_dir: str | Path | None = None,
                     progress: bool = True) -> RealDataPaths:
    """Download (once) and lay out COCO 2017 + LLaVA-Instruct-150K for ``profile``; reuse a matching view.

    Settings read from ``profile.data``: ``subset`` (train images; None = all), ``val_subset``
    (val2017 images; default ``min(5000, max(500, subset // 10))`` or all), ``llava_val_images``
    (held-out LLaVA images, default 200), ``image_download`` (``auto``: one by one with a subset,
    else the zips; ``files``; ``zip``), ``download_workers`` (16), ``keep_zips`` (False),
    ``coco_root`` / ``llava_json`` (use files already on disk; nothing is downloaded for them),
    ``download_dir`` (where everything goes).
    """
    sources = sources or RealDataSources.from_env()
    base = Path(base_dir) if base_dir else real_data_base(profile)
    with _locked(base / ".lock"):        # several processes (e.g. 8 ranks) fetch once, one at a time
        return _ensure(profile, sources, base, progress)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes (a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:                  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(profile: Any, sources: RealDataSources, base: Path, progress: bool) -> RealDataPaths:
    subset = _setting(profile, "subset", None)
    val_subset = _setting(profile, "val_subset", min(5000, max(500, subset // 10)) if subset else None)
    n_heldout = int(_setting(profile, "llava_val_images", 200))
    mode = _setting(profile, "image_download", "auto")
    if mode == "auto":
        mode = "files" if subset else "zip"
    if mode not in ("files", "zip"):
        raise ValueError(f"data.image_download must be 'auto', 'files' or 'zip', got {mode!r}")
    workers = int(_setting(profile, "download_workers", 16))
    keep_zips = bool(_setting(profile, "keep_zips", False))
    seed = int(getattr(profile.runtime, "seed", 0) or 0)
    skips = SkipCounter() if getattr(profile.runtime, "allow_skips", False) else None

    # 1. captions (+ instances for POPE) and the LLaVA conversations
    given_root = getattr(profile.data, "coco_root", None)
    store = Path(given_root) if given_root else base / "coco2017"
    if not given_root:
        wanted = {"annotations/captions_train2017.json", "annotations/captions_val2017.json",
                  "annotations/instances_val2017.json"}
        fetch_zip(sources.annotations, base / "downloads", store, lambda n: n in wanted, keep_zips, progress)
    llava_json = getattr(profile.data, "llava_json", None)
    if llava_json:
        llava_json = Path(llava_json)
    elif sources.llava_url:
        llava_json = download_file(sources.llava_url, base / "llava" / sources.llava_file, progress=progress)
    else:
        from huggingface_hub import hf_hub_download

        llava_json = Path(hf_hub_download(repo_id=sources.llava_repo, filename=sources.llava_file,
                                          repo_type="dataset", local_dir=str(base / "llava")))
    llava_images_dir = Path(getattr(profile.data, "llava_images", None) or store / "train2017")
    if llava_images_dir.resolve() != (store / "train2017").resolve():
        raise DataError("data.llava_images must be the COCO train2017 folder of data.coco_root "
                        "(LLaVA-Instruct-150K is over COCO train2017)", path=llava_images_dir)

    settings = dict(version=VIEW_VERSION, store=str(store.resolve()), llava_json=str(llava_json.resolve()),
                    llava_bytes=llava_json.stat().st_size, subset=subset, val_subset=val_subset,
                    llava_val_images=n_heldout, seed=seed)
    root = base / f"view-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}"
    paths = RealDataPaths(root)
    manifest = read_json_or_none(paths.manifest)
    if manifest and manifest.get("settings") == settings:
        return paths

    # 2. choose the images, 3. fetch them, 4. write the view
    cap_train, train_by_name, train_anns = _coco_index(store / "annotations" / "captions_train2017.json")
    cap_val, val_by_name, val_anns = _coco_index(store / "annotations" / "captions_val2017.json")
    llava = load_json(llava_json)
    if not isinstance(llava, list):
        raise DataError(f"top level must be a list of records, got {type(llava).__name__}", path=llava_json)
    plan = plan_split(llava, train_by_name, val_by_name, subset, val_subset, n_heldout, seed, skips, llava_json)
    if not given_root:
        if mode == "files":
            url = sources.image_base_url.rstrip("/")
            download_images(f"{url}/train2017", plan.train + plan.heldout, store / "train2017", workers,
                            progress, desc="COCO train2017 images")
            download_images(f"{url}/val2017", plan.val, store / "val2017", workers, progress,
                            desc="COCO val2017 images")
        else:
            for remote, split in ((sources.train_zip, "train2017"), (sources.val_zip, "val2017")):
                fetch_zip(remote, base / "downloads", store, lambda n, s=split: n.startswith(f"{s}/"),
                          keep_zips, progress)
    _write_view(paths, store, plan, settings, (cap_train, train_by_name, train_anns),
                (cap_val, val_by_name, val_anns), llava, llava_json, skips)
    if skips is not None and skips.count:
        print(f"real data: {skips.report()}")
    return paths


def _present(names: list[str], folder: Path, coco_json: Path, skips: SkipCounter | None) -> list[str]:
    out = []
    for n in names:
        if (folder / n).is_file():
            out.append(n)
        else:
            raise_or_skip(skips, "missing image file", coco_json, n, str(folder / n))
    return out


def _write_view(paths: RealDataPaths, store: Path, plan: _Plan, settings: dict, train_idx: tuple,
                val_idx: tuple, llava: list, llava_json: Path, skips: SkipCounter | None) -> None:
    """Write the view into a temporary folder, ``manifest.json`` last, then rename it into place."""
    cap_train, train_by_name, train_anns = train_idx
    cap_val, val_by_name, val_anns = val_idx
    train_json, val_json = store / "annotations" / "captions_train2017.json", \
        store / "annotations" / "captions_val2017.json"
    plan = _Plan(train=_present(plan.train, store / "train2017", train_json, skips),
                 heldout=_present(plan.heldout, store / "train2017", train_json, skips),
                 val=_present(plan.val, store / "val2017", val_json, skips))
    heldout_entries = [dict(train_by_name[n], source="train2017 (held out for LLaVA val)") for n in plan.heldout]
    val_entries = [val_by_name[n] for n in plan.val]
    clash = {e["id"] for e in heldout_entries} & {e["id"] for e in val_entries}
    if clash:
        raise DataError(f"image ids in both train2017 and val2017 captions: {sorted(clash)[:5]}", path=val_json)

    tmp = paths.root.with_name(f"{paths.root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    view = RealDataPaths(tmp)
    _dump(view.captions_train, _coco_subset(cap_train, [train_by_name[n] for n in plan.train], train_anns,
                                            f"COCO 2017 train slice ({len(plan.train)} images)"))
    val_all_anns = {**val_anns, **{e["id"]: train_anns.get(e["id"], []) for e in heldout_entries}}
    _dump(view.captions_val, _coco_subset(cap_val, val_entries + heldout_entries, val_all_anns,
                                          f"COCO 2017 val slice ({len(val_entries)} images) + "
                                          f"{len(heldout_entries)} held-out train2017 images"))
    instances = store / "annotations" / "instances_val2017.json"
    if instances.is_file():
        inst, _, inst_anns = _coco_index(instances)
        ids = {e["id"] for e in val_entries}
        _dump(view.instances_val, _coco_subset(inst, [e for e in inst["images"] if e["id"] in ids], inst_anns,
                                               f"COCO 2017 val instances ({len(ids)} images)"))
    _link((store / "train2017").resolve(), view.train_images)
    view.val_images.mkdir(parents=True, exist_ok=True)
    for folder, names in ((store / "val2017", plan.val), (store / "train2017", plan.heldout)):
        for n in names:
            _link_or_copy((folder / n).resolve(), view.val_images / n)   # not a symlink: see validation.file_in

    train_set, held_set = set(plan.train), set(plan.heldout)
    conv_train, conv_val = [], []
    for rec in llava:
        image = rec.get("image") if isinstance(rec, dict) else None
        if not isinstance(image, str):
            continue                          # counted in plan_split
        name = _llava_image_name(image)
        if name in train_set:
            conv_train.append({**rec, "image": name})
        elif name in held_set:
            conv_val.append({**rec, "image": name})
    if not conv_train or not conv_val:
        raise DataError(f"the split left {len(conv_train)} train and {len(conv_val)} val conversations; "
                        "raise data.subset or data.llava_val_images", path=llava_json)
    _dump(view.llava_train, conv_train)
    _dump(view.llava_val, conv_val)
    counts = dict(train_images=len(plan.train), val_images=len(plan.val), heldout_images=len(plan.heldout),
                  llava_train=len(conv_train), llava_val=len(conv_val))
    _dump(view.manifest, {"settings": settings, "counts": counts,
                          "heldout_image_ids": sorted(e["id"] for e in heldout_entries),
                          "skipped": skips.report() if skips is not None else "0 records skipped"})
    print(f"real data: {paths.root.name}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    shutil.rmtree(paths.root, ignore_errors=True)
    try:
        os.replace(tmp, paths.root)
    except OSError:                           # another process finished the same view first
        if (read_json_or_none(paths.manifest) or {}).get("settings") != settings:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
