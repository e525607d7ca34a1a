"""real_data against a local HTTP server (127.0.0.1) serving ShapesWorld files in the COCO/LLaVA layout.

The server speaks HTTP Range and can cut a transfer short, fail, or ignore Range, so resumed
downloads, retries and checksum errors run for real.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from capstone_lib.coco import load_coco_captions
from capstone_lib.llava_data import load_llava_instruct
from capstone_lib.profiles import get_profile
from capstone_lib.real_data import (DownloadError, RealDataPaths, RealDataSources, Remote, download_file,
                                    download_images, ensure_real_data, extract_zip)
from capstone_lib.data_sources import dataset_paths
from capstone_lib.real_eval import build_pope_items, coco_val_records, shapesworld_instances
from capstone_lib.shapesworld import ShapesWorldPaths, generate
from capstone_lib.stage2 import image_id_of
from capstone_lib.validation import DataError


class FileServer:
    """Serves ``files`` (URL path -> bytes) with Range support and injectable faults; logs requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str | None]] = []
        self.cut_once: dict[str, int] = {}      # path -> bytes sent before the connection drops (once)
        self.fail: set[str] = set()             # paths answered with 503
        self.ignore_range: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):       # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.log.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None or self.path in server.fail:
                    self.send_error(404 if data is None else 503)
                    return
                start = 0
                if rng and self.path not in server.ignore_range:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_once.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.log]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ----------------------------------------------------------------------------- download_file
PAYLOAD = os.urandom(300_000)


def test_download_checks_md5_and_sha256(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    out = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=_md5(PAYLOAD),
                        sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), progress=False)
    assert out.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    n = len(server.log)
    download_file(f"{server.url}/f.bin", out, md5=_md5(PAYLOAD), progress=False)   # present: no request
    assert len(server.log) == n


def test_checksum_mismatch_raises_and_removes_the_partial_file(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match=r"md5 .*expected 0{32}") as err:
        download_file(f"{server.url}/f.bin", dest, md5="0" * 32, progress=False)
    assert "/f.bin" in str(err.value) and str(dest) in str(err.value)
    assert not dest.exists() and not (tmp_path / "f.bin.part").exists()


def test_size_mismatch_after_a_complete_transfer(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD                 # the server has fewer bytes than promised
    with pytest.raises(DataError, match=f"size {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"):
        download_file(f"{server.url}/f.bin", tmp_path / "f.bin", size=len(PAYLOAD) + 1, progress=False,
                      backoff=0.001)
    assert server.log == [("/f.bin", None)]


def test_complete_or_overlong_part_file_answered_416(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    part = tmp_path / "f.bin.part"
    part.write_bytes(PAYLOAD)                  # complete, but the run stopped before the rename
    assert download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=_md5(PAYLOAD),
                         progress=False).read_bytes() == PAYLOAD
    assert server.log == [("/f.bin", f"bytes={len(PAYLOAD)}-")]
    (tmp_path / "h.bin.part").write_bytes(PAYLOAD + b"junk")   # longer than the file: start again
    assert download_file(f"{server.url}/f.bin", tmp_path / "h.bin", md5=_md5(PAYLOAD),
                         progress=False).read_bytes() == PAYLOAD
    assert server.log[1:] == [("/f.bin", f"bytes={len(PAYLOAD) + 4}-"), ("/f.bin", None)]


def test_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:100_000])      # an earlier, interrupted run
    download_file(f"{server.url}/f.bin", dest, md5=_md5(PAYLOAD), progress=False)
    assert server.log == [("/f.bin", "bytes=100000-")]
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_transfer_is_retried_from_where_it_stopped(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.cut_once["/f.bin"] = 123_456                            # the connection drops mid-file
    dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=_md5(PAYLOAD), progress=False,
                         backoff=0.001, chunk_size=16_384)
    assert server.log == [("/f.bin", None), ("/f.bin", "bytes=123456-")]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/f.bin"] = PAYLOAD
    server.ignore_range.add("/f.bin")
    (tmp_path / "f.bin.part").write_bytes(b"x" * 5000)              # would corrupt the file if appended to
    dest = download_file(f"{server.url}/f.bin", tmp_path / "f.bin", md5=_md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_gives_up_after_retries_and_404_is_not_retried(server, tmp_path):
    server.files["/busy"] = PAYLOAD
    server.fail.add("/busy")
    with pytest.raises(DownloadError, match="gave up after 2 retries"):
        download_file(f"{server.url}/busy", tmp_path / "busy", retries=2, backoff=0.001, progress=False)
    assert server.paths().count("/busy") == 3
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/nothing", tmp_path / "nothing", backoff=0.001, progress=False)
    assert server.paths().count("/nothing") == 1


def test_download_images_keeps_the_good_ones(server, tmp_path):
    for i in range(6):
        server.files[f"/img/{i}.jpg"] = bytes([i]) * 1000
    names = [f"{i}.jpg" for i in range(7)]                          # 6.jpg does not exist
    with pytest.raises(DownloadError, match=r"1 of 7 images .*6\.jpg"):
        download_images(f"{server.url}/img", names, tmp_path, workers=3, progress=False, backoff=0.001)
    assert sorted(p.name for p in tmp_path.iterdir()) == names[:6]
    assert download_images(f"{server.url}/img", names[:6], tmp_path, progress=False) == 0   # all present


def test_extract_zip_once_with_marker(tmp_path):
    z = tmp_path / "a.zip"
    z.write_bytes(_zip({"annotations/keep.json": b"{}", "annotations/skip.json": b"{}", "../evil": b"x"}))
    extract_zip(z, tmp_path / "out", lambda n: n.endswith("keep.json") or n == "../evil", progress=False)
    assert (tmp_path / "out" / "annotations" / "keep.json").is_file()
    assert not (tmp_path / "out" / "annotations" / "skip.json").exists() and not (tmp_path / "evil").exists()
    z.unlink()
    extract_zip(z, tmp_path / "out", progress=False)               # marker: no second extraction
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip"):
        extract_zip(tmp_path / "bad.zip", tmp_path / "out2", progress=False)


# ----------------------------------------------------------------------------- ensure_real_data
@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    """ShapesWorld written as the COCO 2017 + LLaVA-Instruct-150K downloads (zips, files, json)."""
    sw = generate(tmp_path_factory.mktemp("sw") / "world", seed=5, n_train=24, n_val=10, captions_per_image=2,
                  questions_per_image=2, corpus_docs=2, progress=False)
    instances = shapesworld_instances(sw)
    ann = sw.coco_root / "annotations"
    files = {"/annotations/annotations_trainval2017.zip": _zip({
        "annotations/captions_train2017.json": (ann / "captions_train2017.json").read_bytes(),
        "annotations/captions_val2017.json": (ann / "captions_val2017.json").read_bytes(),
        "annotations/instances_val2017.json": instances.read_bytes(),
        "annotations/person_keypoints_val2017.json": b"{}"})}
    for split in ("train2017", "val2017"):
        images = {p.name: p.read_bytes() for p in sorted((sw.coco_root / split).iterdir())}
        files[f"/zips/{split}.zip"] = _zip({f"{split}/{n}": b for n, b in images.items()})
        files.update({f"/{split}/{n}": b for n, b in images.items()})
    files["/llava/llava_instruct_150k.json"] = sw.llava_train.read_bytes()
    return sw, files


def _sources(server: FileServer) -> RealDataSources:
    f = server.files
    remote = {k: Remote(f"{server.url}{p}", _md5(f[p]), len(f[p])) for k, p in
              (("annotations", "/annotations/annotations_trainval2017.zip"),
               ("train_zip", "/zips/train2017.zip"), ("val_zip", "/zips/val2017.zip"))}
    return RealDataSources(**remote, image_base_url=server.url,
                           llava_url=f"{server.url}/llava/llava_instruct_150k.json")


def _profile(tmp_path: Path, allow_skips: bool = False, **data):
    return get_profile("t4", runtime={"allow_skips": allow_skips},
                       data=dict(download_dir=str(tmp_path / "real"), **data))


def _check_view(paths: RealDataPaths, n_train: int, n_val: int, n_heldout: int):
    train = load_coco_captions(paths.coco_root, "train")
    val = load_coco_captions(paths.coco_root, "val")
    train_ids, val_ids = {r.image_id for r in train}, {r.image_id for r in val}
    assert (len(train_ids), len(val_ids)) == (n_train, n_val + n_heldout)
    assert not train_ids & val_ids
    conv_train = load_llava_instruct(paths.llava_train, paths.train_images)
    conv_val = load_llava_instruct(paths.llava_val, paths.val_images)
    held = paths.heldout_image_ids()
    assert len(held) == n_heldout and held <= val_ids
    assert {image_id_of(r.image) for r in conv_val} == held            # split by image, never by record
    assert {image_id_of(r.image) for r in conv_train} <= train_ids     # stage 2 finds train features
    assert len(coco_val_records(paths)) == n_val
    for r in train[:3] + val[:3]:
        assert r.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    items = build_pope_items(paths.instances_val, 8)
    assert {i["image_id"] for i in items} <= val_ids - held
    return conv_train, conv_val


def test_subset_fetches_only_the_needed_images_once(server, fake_coco, tmp_path):
    sw, files = fake_coco
    server.files.update(files)
    profile = _profile(tmp_path, subset=12, val_subset=6, llava_val_images=4)
    paths = ensure_real_data(profile, _sources(server), progress=False)
    conv_train, conv_val = _check_view(paths, n_train=12, n_val=6, n_heldout=4)
    assert len(conv_train) == 12 and len(conv_val) == 4                # one conversation per image here
    got = server.paths()
    assert not any(p.startswith("/zips/") for p in got)                # no 18 GB zip for a subset
    assert sum(p.startswith("/train2017/") for p in got) == 16 and sum(p.startswith("/val2017/") for p in got) == 6
    store = tmp_path / "real" / "coco2017"
    assert len(list((store / "train2017").iterdir())) == 16
    assert not (store / "annotations" / "person_keypoints_val2017.json").exists()
    assert not (tmp_path / "real" / "downloads" / "annotations_trainval2017.zip").exists()   # removed
    # a second call (a new session) downloads nothing and returns the same view
    server.log.clear()
    assert ensure_real_data(profile, _sources(server), progress=False) == paths and server.log == []
    # a bigger subset reuses the store and fetches only the new images
    bigger = ensure_real_data(_profile(tmp_path, subset=16, val_subset=6, llava_val_images=4),
                              _sources(server), progress=False)
    assert bigger != paths and sum(p.startswith("/train2017/") for p in server.paths()) == 4
    _check_view(bigger, n_train=16, n_val=6, n_heldout=4)


def test_full_download_uses_the_zips(server, fake_coco, tmp_path):
    sw, files = fake_coco
    server.files.update(files)
    server.cut_once["/zips/train2017.zip"] = 5000                      # and survives a dropped transfer
    paths = ensure_real_data(_profile(tmp_path, subset=None, llava_val_images=3), _sources(server),
                             progress=False)
    _check_view(paths, n_train=21, n_val=10, n_heldout=3)
    assert ("/zips/train2017.zip", "bytes=5000-") in server.log
    assert not any(re.match(r"/(train|val)2017/", p) for p in server.paths())
    store = tmp_path / "real" / "coco2017"
    assert (store / ".extracted-train2017.zip").is_file() and (store / ".extracted-val2017.zip").is_file()


def test_local_files_and_a_corrupt_llava_file(server, fake_coco, tmp_path):
    sw, files = fake_coco
    server.files.update(files)
    profile = _profile(tmp_path, subset=8, val_subset=4, llava_val_images=2, coco_root=str(sw.coco_root),
                       llava_json=str(sw.llava_train))
    paths = ensure_real_data(profile, _sources(server), progress=False)
    _check_view(paths, n_train=8, n_val=4, n_heldout=2)
    assert server.log == []                                            # nothing downloaded
    records = json.loads(sw.llava_train.read_text())
    bad = tmp_path / "llava.json"
    bad.write_text(json.dumps(records + [{"id": "text", "conversations": records[0]["conversations"]}]))
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: record {len(records)}: text-only"):
        ensure_real_data(_profile(tmp_path, subset=8, coco_root=str(sw.coco_root), llava_json=str(bad)),
                         _sources(server), progress=False)
    skipping = get_profile("t4", runtime={"allow_skips": True},
                           data=dict(download_dir=str(tmp_path / "real"), subset=8, llava_val_images=2,
                                     coco_root=str(sw.coco_root), llava_json=str(bad)))
    assert ensure_real_data(skipping, _sources(server), progress=False).manifest.is_file()


def test_dataset_paths_picks_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSTONE_DATA_DIR", str(tmp_path))
    smoke = get_profile("smoke", data={"shapesworld": {"n_train": 4, "n_val": 2, "corpus_docs": 2}})
    assert isinstance(dataset_paths(smoke), ShapesWorldPaths)
    with pytest.raises(ValueError, match="data.source"):
        dataset_paths(get_profile("smoke", data={"source": "imagenet"}))


def test_concurrent_callers_download_once(server, fake_coco, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    server.files.update(fake_coco[1])
    profile = _profile(tmp_path, subset=10, val_subset=4, llava_val_images=2)
    with ThreadPoolExecutor(3) as pool:          # e.g. several ranks starting together
        views = list(pool.map(lambda _: ensure_real_data(profile, _sources(server), progress=False), range(3)))
    assert views[0] == views[1] == views[2]
    got = server.paths()
    assert len(got) == len(set(got)) == 1 + 1 + 12 + 4       # annotations, llava, 12 train + 4 val images
    _check_view(views[0], n_train=10, n_val=4, n_heldout=2)
