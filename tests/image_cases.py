"""Image files a production crawl meets, as bytes: good photos of varied sizes, and the broken,
odd and hostile ones the embed pipeline must dead-letter or embed without fuss."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour field with edges (JPEG-friendly, distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3),
                         dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img).copy()
    arr[height // 3: height // 3 + max(1, height // 10), :, :] = rng.integers(0, 256, 3)
    return Image.fromarray(arr, "RGB")


def jpeg(width: int = 96, height: int = 64, seed: int = 0, quality: int = 90) -> bytes:
    return _save(photo(width, height, seed), "JPEG", quality=quality)


def truncated_jpeg() -> bytes:
    data = jpeg(200, 150, seed=7)
    return data[: len(data) // 2]


def not_an_image() -> bytes:
    return b"<html><body>404 Not Found</body></html>\n" * 8


@functools.lru_cache(maxsize=1)
def decompression_bomb() -> bytes:
    """A 10000 x 9000 bilevel PNG: 90 Mpx (past Pillow's 89.5 Mpx limit) in a few kB."""
    return _save(Image.new("1", (10_000, 9_000)), "PNG", optimize=False)


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def png16() -> bytes:
    """16-bit greyscale gradient, 0 .. 65535 left to right."""
    arr = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    return _save(Image.fromarray(arr, "I;16"), "PNG")


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    img.paste(1, (32, 0, 64, 64))
    return _save(img, "PNG", transparency=0)  # left half (index 0) transparent


def rgba_png() -> bytes:
    arr = np.zeros((40, 60, 4), np.uint8)
    arr[..., 1] = 255          # green
    arr[:, :30, 3] = 0         # left half transparent
    arr[:, 30:, 3] = 255
    return _save(Image.fromarray(arr, "RGBA"), "PNG")


def animated_gif() -> bytes:
    """Three frames: red, green, blue."""
    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100,
                 loop=0)


GOOD_ODD = {
    "cmyk.jpg": cmyk_jpeg,
    "gray16.png": png16,
    "palette.png": palette_png_with_transparency,
    "alpha.png": rgba_png,
    "animated.gif": animated_gif,
    "wide.jpg": lambda: jpeg(2000, 10, seed=3),
    "tall.jpg": lambda: jpeg(12, 1500, seed=4),
    "tiny.png": lambda: _save(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
    "large.jpg": lambda: jpeg(2400, 1800, seed=5, quality=70),
}

BAD = {  # name -> (bytes factory, dead-letter reason "stage.error_type")
    "empty.jpg": (lambda: b"", "decode.empty"),
    "truncated.jpg": (truncated_jpeg, "decode.corrupt"),
    "not_image.jpg": (not_an_image, "decode.not_an_image"),
    "bomb.png": (decompression_bomb, "decode.too_large"),
}


def write_collection(folder, n_good: int = 6, odd: bool = True, bad: bool = True) -> dict:
    """Write good JPEGs of varied sizes (+ odd and bad cases) under `folder`; returns
    {"good": [paths], "odd": [paths], "bad": {path: reason}}."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(96, 64), (64, 96), (128, 128), (80, 60), (200, 90), (70, 140)]
    good = []
    for i in range(n_good):
        w, h = sizes[i % len(sizes)]
        p = folder / f"photo_{i:03d}.jpg"
        p.write_bytes(jpeg(w, h, seed=100 + i))
        good.append(str(p))
    odd_paths, bad_paths = [], {}
    if odd:
        for name, make in GOOD_ODD.items():
            (folder / name).write_bytes(make())
            odd_paths.append(str(folder / name))
    if bad:
        for name, (make, reason) in BAD.items():
            (folder / name).write_bytes(make())
            bad_paths[str(folder / name)] = reason
    return {"good": good, "odd": odd_paths, "bad": bad_paths}
