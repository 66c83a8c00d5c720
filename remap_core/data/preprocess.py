"""Image decoding and resizing: bytes in, uint8 (H, W, 3) numpy arrays out.

The same functions serve the pipeline and the query library, so a query is prepared exactly like
the collection: `image_for_model` (bytes -> the model's input pixels + the full image's size) is
that one path. Every failure raises `ImageDecodeError` with a reason a person can act on.

Decoding at the size needed: a JPEG is decoded at the smallest DCT scale (1/1, 1/2, 1/4 or 1/8,
Pillow's `draft`) that still covers twice the model's input size (DRAFT_MARGIN) in both
directions, so a 12 MP photo headed for 512 px decodes a quarter of its pixels; the final resize
then shrinks by `reduce` (integer box steps) before its bicubic pass (`reducing_gap`). Other
formats decode in full and take the same resize.

Limits on hostile input, each a dead-letter reason: `max_bytes` (too_large), `max_pixels`
(too_large, checked from the header before any pixel is decoded) and `seconds` (timeout: checked
each time the decoder asks for more bytes, so a decoder fed a crafted file stops soon after).
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# Pillow's own bomb guard is a warning at 89 Mpx and an error at twice that; we make it an error.
MAX_PIXELS = 89_478_485
MAX_BYTES = 256 * 2**20        # an image file larger than this is refused before decoding
DECODE_SECONDS = 30.0          # wall-clock budget of one decode (a 89 Mpx JPEG takes ~1-2 s)
# A JPEG is decoded at the smallest DCT scale covering DRAFT_MARGIN x the model's input size:
# 2 keeps descriptors within cosine 0.997 of a full decode on the sample photos (1: 0.991, at
# about half the cost again; tests/remap_core/data/test_preprocess.py, bench/decode_resize.py)
DRAFT_MARGIN = 2
ORIENTATION_TAG = 0x0112       # EXIF orientation; 5-8 swap width and height
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class ImageDecodeError(ValueError):
    """Bytes that cannot become an image. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class ModelInput(NamedTuple):
    """An image prepared for the network."""

    pixels: np.ndarray   # uint8 (h, w, 3) at the model's input size
    width: int           # the upright image's full size (before any downscaling)
    height: int


class _TimedBytes(io.BytesIO):
    """The file Pillow decodes from: refuses to hand out more bytes once `deadline` passed
    (every decoder reads its input in blocks through `read`, so a slow decode stops there)."""

    def __init__(self, data: bytes, deadline: float, seconds: float):
        super().__init__(data)
        self.deadline, self.seconds = deadline, seconds

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise ImageDecodeError("timeout", f"decoding took longer than {self.seconds:g} s")
        return super().read(size)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block: exif_transpose will skip it as well
        return 1


def _decode(data: bytes, max_pixels: int, max_bytes: int, seconds: float,
            draft_for: tuple[int, int, float] | None) -> tuple[Image.Image, tuple[int, int]]:
    """-> (upright RGB image, possibly DCT-downscaled; the upright full (width, height)).
    `draft_for`: (max_side, multiple, margin): a JPEG is decoded at the smallest DCT scale
    covering `margin` x that model input size."""
    if not data:
        raise ImageDecodeError("empty", "zero-byte file")
    if len(data) > max_bytes:
        raise ImageDecodeError("too_large", f"{len(data)} bytes exceeds the limit of "
                                            f"{max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_TimedBytes(data, time.monotonic() + seconds, seconds))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit "
                                                    f"of {max_pixels}")
            if w < 1 or h < 1:
                raise ImageDecodeError("bad_size", f"image size {w}x{h}")
            swap = _orientation(img) in _SWAPPING_ORIENTATIONS
            full = (h, w) if swap else (w, h)
            img.seek(0)
            if draft_for is not None and img.format in ("JPEG", "MPO"):
                max_side, multiple, margin = draft_for
                tw, th = target_size(*full, max_side, multiple)
                tw, th = max(1, int(tw * margin)), max(1, int(th * margin))
                # draft in the stored orientation: the transpose comes after decoding
                img.draft(None, (th, tw) if swap else (tw, th))
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not_an_image", "bytes are not a known image format") from e
    except MemoryError as e:
        raise ImageDecodeError("too_large", f"out of memory while decoding: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError, OverflowError, AttributeError) as e:
        # Pillow's plugins raise these on malformed headers and streams
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from e
    return to_rgb(img), full


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
                 seconds: float = DECODE_SECONDS) -> Image.Image:
    """Decode bytes into an RGB PIL image at full size, upright per EXIF, first frame of an
    animation.

    Alpha and palette transparency are composited on white; CMYK, 16-bit and greyscale become RGB.
    """
    return _decode(data, max_pixels, max_bytes, seconds, None)[0]


def image_for_model(data: bytes, max_side: int, multiple: int = 32, *,
                    enhance: Callable[[Image.Image], Image.Image] | None = None,
                    draft: float | None = DRAFT_MARGIN, max_pixels: int = MAX_PIXELS,
                    max_bytes: int = MAX_BYTES, seconds: float = DECODE_SECONDS) -> ModelInput:
    """Bytes -> the model's input pixels (long side `max_side`, short side snapped to
    `multiple`) and the full image's upright size: what the pipeline embeds and a query is.

    `draft`: a JPEG decodes at the smallest DCT scale covering `draft` x the input size (see the
    module doc); None decodes it in full first (same shape, pixels within a few grey levels).
    `enhance`: applied to the decoded RGB image before the resize (query clean-up)."""
    img, (width, height) = _decode(data, max_pixels, max_bytes, seconds,
                                   None if draft is None else (max_side, multiple, draft))
    if enhance is not None:
        img = enhance(img)
    size = target_size(width, height, max_side, multiple)   # from the full size: same shape
    return ModelInput(_resize(img, size), width, height)


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
    return _resize(img, target_size(img.width, img.height, max_side, multiple))


def _resize(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB PIL image -> uint8 (size[1], size[0], 3): shrinking by `reduce` (box steps of an
    integer factor) while the image is over 3x the target, then bicubic."""
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
