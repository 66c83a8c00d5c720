"""Image decoding and resizing: bytes in, uint8 (H, W, 3) numpy arrays out.

The same functions serve the pipeline and the query library, so a query is prepared exactly like
the collection. Every failure raises `ImageDecodeError` with a reason a person can act on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# Pillow's own bomb guard is a warning at 89 Mpx and an error at twice that; we make it an error.
MAX_PIXELS = 89_478_485


class ImageDecodeError(ValueError):
    """Bytes that cannot become an image. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image, upright per EXIF, first frame of an animation.

    Alpha and palette transparency are composited on white; CMYK, 16-bit and greyscale become RGB.
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit "
                                                    f"of {max_pixels}")
            if w < 1 or h < 1:
                raise ImageDecodeError("bad_size", f"image size {w}x{h}")
            img.seek(0)
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not_an_image", "bytes are not a known image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB copy of any PIL image (EXIF orientation, alpha on white, 16-bit scaled)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        scale = 255.0 / (65535.0 if hi > 255 else max(hi, 1.0))
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def target_size(width: int, height: int, max_side: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) after scaling the long side to `max_side` and snapping the short side to
    a multiple of `multiple` (so images of similar aspect share a shape and batch together)."""
    if width >= height:
        short = height * max_side / width
        return max_side, max(multiple, int(round(short / multiple)) * multiple)
    short = width * max_side / height
    return max(multiple, int(round(short / multiple)) * multiple), max_side


def resize_for_model(img: Image.Image, max_side: int, multiple: int = 32) -> np.ndarray:
    """RGB PIL image -> uint8 (H, W, 3) at the model's input size (aspect kept up to snapping)."""
    size = target_size(img.width, img.height, max_side, multiple)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def enhance_query(img: Image.Image, denoise: bool = False, autocontrast: bool = False) -> Image.Image:
    """Optional clean-up of a query photo: median denoise and/or contrast stretch."""
    if denoise:
        img = img.filter(ImageFilter.MedianFilter(3))
    if autocontrast:
        img = ImageOps.autocontrast(img, cutoff=1)
    return img
