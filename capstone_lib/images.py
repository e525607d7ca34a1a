"""Load any image file as 8-bit RGB, or fail with a ``DataError`` that names the file.

Real data sets hold greyscale, palette, transparent, CMYK and 16-bit images, truncated
downloads, HTML error pages saved as ``.jpg`` and the odd decompression bomb. ``load_image``
turns the first kind into RGB and rejects the second kind before it can crash a training run.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .validation import DataError

DEFAULT_MAX_PIXELS = 50_000_000     # a 7000 x 7000 photo; COCO images are about 640 x 480
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale -> 8-bit ``L``."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0   # 16-bit range -> 0..255
    else:                                                          # "F": 0..1 or 0..255
        arr = arr.astype(np.float64)
        if np.isfinite(arr).all() and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: str | tuple[int, int, int] = "white") -> Image.Image:
    """Convert an opened image of any common mode to 8-bit RGB (alpha composited on ``background``)."""
    bg = _BACKGROUNDS.get(background, background) if isinstance(background, str) else background
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(bg) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, min_size: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS,
               background: str | tuple[int, int, int] = "white",
               exif_transpose: bool = True, max_side: int | None = None) -> Image.Image:
    """Open ``path`` as 8-bit RGB; ``DataError`` for missing, corrupt, truncated, tiny or huge images.

    The size is checked from the header before any pixel is decoded, and Pillow's
    decompression-bomb warning is treated as an error. The file extension is ignored:
    the format is read from the content. With ``max_side`` the image is shrunk while it is
    read (a JPEG decodes straight at 1/2-1/8 scale) so that no side exceeds it: a large photo
    never sits in memory at full size more than once.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DataError(f"image is {width}x{height} = {width * height} pixels, more than "
                                    f"max_pixels={max_pixels} (decompression bomb?)", path=path)
                if min(width, height) < min_size:
                    raise DataError(f"image is {width}x{height}, smaller than min_size={min_size}",
                                    path=path)
                if max_side and max(width, height) > max_side:
                    img.draft("RGB", (max_side, max_side))      # JPEG: decode at a reduced scale
                    img.load()
                    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img)
                return to_rgb(img, background)
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(f"decompression bomb: {err}", path=path) from None
        except UnidentifiedImageError:
            raise DataError("not an image Pillow can read (wrong content for its extension?)",
                            path=path) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
            raise DataError(f"corrupt or truncated image: {type(err).__name__}: {err}", path=path) from None
