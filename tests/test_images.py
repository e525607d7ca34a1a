"""load_image: every common mode becomes 8-bit RGB; hostile files raise DataError naming the file."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capstone_lib.images import load_image
from capstone_lib.validation import DataError


def noise_rgb(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def expect_error(path: Path, match: str, **kwargs) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        load_image(path, **kwargs)
    assert str(path) in str(info.value) and info.value.path == str(path)
    return info.value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny file whose header claims a huge 1-bit greyscale image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------ modes that must load
def test_rgb_png_and_jpeg_roundtrip(tmp_path):
    src = noise_rgb()
    src.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (48, 40)
    assert np.array_equal(np.asarray(out), np.asarray(src))
    src.save(tmp_path / "a.jpg", quality=95)
    assert load_image(tmp_path / "a.jpg").size == (48, 40)


def test_wrong_extension_but_valid_content_loads(tmp_path):
    noise_rgb().save(tmp_path / "really_png.jpg", format="PNG")
    noise_rgb().save(tmp_path / "really_jpeg.png", format="JPEG")
    assert load_image(tmp_path / "really_png.jpg").mode == "RGB"
    assert load_image(tmp_path / "really_jpeg.png").mode == "RGB"


def test_greyscale_and_palette(tmp_path):
    Image.new("L", (16, 16), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((3, 3)) == (77, 77, 77)
    Image.new("1", (16, 16), 1).save(tmp_path / "bw.png")
    assert load_image(tmp_path / "bw.png").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("RGB", (16, 16), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "pal.gif")
    assert load_image(tmp_path / "pal.gif").getpixel((5, 5)) == (10, 200, 30)


@pytest.mark.parametrize("background, expected", [("white", (255, 255, 255)), ("black", (0, 0, 0))])
def test_transparency_is_composited(tmp_path, background, expected):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png", background=background)
    assert out.getpixel((2, 2)) == (0, 0, 255) and out.getpixel((12, 2)) == expected
    la = Image.new("LA", (16, 16), (200, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png", background=background).getpixel((1, 1)) == expected
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([9, 9, 9, 50, 60, 70] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))
    pal.save(tmp_path / "ptrans.png", transparency=0)
    out = load_image(tmp_path / "ptrans.png", background=background)
    assert out.getpixel((2, 2)) == (50, 60, 70) and out.getpixel((12, 2)) == expected


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((8, 8))
    assert r > 230 and g < 25 and b < 25


def test_16_bit_greyscale_scales_to_8_bit(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 1000] * 4] * 16, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert list(out[0, :4, 0]) == [0, 128, 255, 4]
    Image.fromarray(arr.astype(np.int32)).save(tmp_path / "int32.tif")
    assert list(np.asarray(load_image(tmp_path / "int32.tif"))[0, :4, 1]) == [0, 128, 255, 4]


def test_exif_orientation_is_applied(tmp_path):
    img = noise_rgb((30, 12))
    exif = Image.Exif()
    exif[0x0112] = 6                       # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (12, 30)
    assert load_image(tmp_path / "rot.jpg", exif_transpose=False).size == (30, 12)


# ------------------------------------------------------------------ files that must fail
def test_truncated_jpeg_and_png(tmp_path):
    img = noise_rgb((64, 64))
    for fmt, name in (("JPEG", "cut.jpg"), ("PNG", "cut.png")):
        full = tmp_path / f"full_{name}"
        img.save(full, format=fmt)
        cut = tmp_path / name
        cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
        expect_error(cut, "corrupt or truncated")


def test_corrupt_png_body(tmp_path):
    noise_rgb((64, 64)).save(tmp_path / "ok.png")
    data = bytearray((tmp_path / "ok.png").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 40] = bytes(40)
    (tmp_path / "bad.png").write_bytes(bytes(data))
    expect_error(tmp_path / "bad.png", "corrupt or truncated")


@pytest.mark.parametrize("content", [b"<html><body>404 Not Found</body></html>", b"", b"\xff\xd8\xff" + b"x" * 50])
def test_not_an_image_with_an_image_extension(tmp_path, content):
    (tmp_path / "photo.jpg").write_bytes(content)
    expect_error(tmp_path / "photo.jpg", "not an image|corrupt")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.png", "not found")


@pytest.mark.parametrize("size", [(1, 1), (7, 100)])
def test_too_small(tmp_path, size):
    Image.new("RGB", size, (1, 2, 3)).save(tmp_path / "tiny.png")
    expect_error(tmp_path / "tiny.png", "smaller than min_size")
    assert load_image(tmp_path / "tiny.png", min_size=1).size == size


def test_decompression_bombs_are_rejected_before_decoding(tmp_path):
    # A 100k x 100k RGB image would need 30 GB decoded: reaching these errors at all shows the
    # size was checked from the header, before any pixel was decoded.
    expect_error(bomb_png(tmp_path / "huge.png", 100_000, 100_000), "bomb")        # Pillow's own error
    expect_error(bomb_png(tmp_path / "big.png", 10_000, 10_000), "bomb")           # Pillow's warning
    expect_error(bomb_png(tmp_path / "mid.png", 8_000, 8_000), "max_pixels")       # our limit
    noise_rgb((100, 100)).save(tmp_path / "ok.png")
    expect_error(tmp_path / "ok.png", "max_pixels", max_pixels=5_000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_upload_is_shrunk_while_it_is_read(tmp_path, fmt):
    """A 3000 x 2000 photo comes back at most max_side a side, its content (left red, right blue) kept."""
    from capstone_lib.assistant import MAX_IMAGE_SIDE, as_image

    arr = np.zeros((2000, 3000, 3), np.uint8)
    arr[:, :1500] = (220, 30, 30)
    arr[:, 1500:] = (30, 30, 220)
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(arr).save(path, fmt)
    img = load_image(path, max_side=600)
    assert max(img.size) == 600 and abs(img.size[0] / img.size[1] - 1.5) < 0.01
    small = np.asarray(img)
    assert small[:, :250, 0].mean() > 180 and small[:, -250:, 2].mean() > 180
    assert load_image(path).size == (3000, 2000)                    # without max_side: full size
    assert max(as_image(path).size) == MAX_IMAGE_SIDE               # what the demo does with an upload
    assert max(as_image(path.read_bytes(), name=path.name).size) == MAX_IMAGE_SIDE
