"""Nuisance transforms that turn one photo into a family of views (DESIGN.md section 6).

Pure functions of (PIL image, numpy RandomState) -> new RGB PIL image; the same image and the
same seed give the same view. Used by the benchmark (`benchmark.py`) and, on disjoint photos, to
generate self-supervised training families (`train_data.py`).

    from remap_core.data.views import NUISANCES, make_view
    rng = np.random.RandomState(seed)
    view = make_view(photo, "perspective", rng)

Nuisances:
- "illumination": gamma, exposure, contrast, per-channel colour cast and a soft shadow gradient.
- "scale_crop": a crop keeping 35-75 % of each side (aspect changes), resized by 0.6-1.0.
- "perspective": the four corners moved by up to 18 % of the sides (a homography) plus a small
  rotation; uncovered area filled with a flat colour.
- "occlusion": one to three opaque shapes (rectangles/ellipses, flat or noisy, or cut from given
  photos) hiding 15-35 % of the image.
- "clutter": the photo shrunk to 40-65 % and pasted onto a cluttered background (random shapes
  and texture), optionally a given background photo.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RandomLike = np.random.RandomState | int


def _rng(rng: RandomLike) -> np.random.RandomState:
    if isinstance(rng, np.random.RandomState):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.RandomState(int(rng) % 2 ** 32)
    raise TypeError(f"rng must be a numpy RandomState or an int seed, got {type(rng).__name__}")


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _random_colour(rng: np.random.RandomState) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.randint(0, 256, 3))


# --------------------------------------------------------------------------- the nuisances

def illumination(img: Image.Image, rng: RandomLike) -> Image.Image:
    """Gamma 0.5-2, exposure 0.6-1.4, contrast 0.6-1.3, colour cast 0.75-1.25 per channel, and
    a linear shadow across the image down to 45-100 % brightness. Same size."""
    rng = _rng(rng)
    x = np.asarray(_rgb(img), dtype=np.float64) / 255.0
    h, w = x.shape[:2]
    gamma = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    x = x ** gamma
    x = (x - 0.5) * rng.uniform(0.6, 1.3) + 0.5
    x = x * rng.uniform(0.6, 1.4) * rng.uniform(0.75, 1.25, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    x = x * (1.0 - (1.0 - rng.uniform(0.45, 1.0)) * t)[..., None]
    return Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def scale_crop(img: Image.Image, rng: RandomLike) -> Image.Image:
    """A random crop keeping 35-75 % of each side (independently: aspect changes), resized to
    0.6-1.0 of the original long side."""
    rng = _rng(rng)
    img = _rgb(img)
    w, h = img.size
    cw = max(8, int(round(w * rng.uniform(0.35, 0.75))))
    ch = max(8, int(round(h * rng.uniform(0.35, 0.75))))
    x0 = int(rng.randint(0, w - cw + 1))
    y0 = int(rng.randint(0, h - ch + 1))
    crop = img.crop((x0, y0, x0 + cw, y0 + ch))
    s = rng.uniform(0.6, 1.0) * max(w, h) / max(cw, ch)
    size = (max(8, int(round(cw * s))), max(8, int(round(ch * s))))
    return crop.resize(size, Image.Resampling.BICUBIC)


def homography_coefficients(src: np.ndarray, dst: np.ndarray) -> tuple[float, ...]:
    """The 8 coefficients PIL's PERSPECTIVE transform needs to map output points `dst` (4, 2)
    back to input points `src` (4, 2)."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coeffs = np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(src, np.float64).ravel())
    return tuple(float(c) for c in coeffs)


def perspective(img: Image.Image, rng: RandomLike, strength: float = 0.18) -> Image.Image:
    """A homography moving each corner by up to `strength` of the sides, combined with a
    rotation of up to 10 degrees; uncovered area filled with a flat random colour. Same size."""
    rng = _rng(rng)
    img = _rgb(img)
    w, h = img.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    moved = corners + rng.uniform(-strength, strength, (4, 2)) * [w, h]
    theta = np.deg2rad(rng.uniform(-10, 10))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = np.array([w / 2, h / 2])
    moved = (moved - centre) @ rot.T + centre
    # keep the warped photo inside the frame: shrink about the centre if needed
    lo, hi = moved.min(0), moved.max(0)
    fit = min(1.0, w / (hi[0] - lo[0]), h / (hi[1] - lo[1]))
    moved = (moved - (lo + hi) / 2) * fit + centre
    coeffs = homography_coefficients(corners, moved)
    return img.transform((w, h), Image.Transform.PERSPECTIVE, coeffs,
                         Image.Resampling.BICUBIC, fillcolor=_random_colour(rng))


def _noise_patch(size: tuple[int, int], rng: np.random.RandomState) -> Image.Image:
    """A coloured noise texture, blurred to blobs: (w, h) -> RGB image."""
    w, h = size
    small = rng.randint(0, 256, (max(1, h // 8), max(1, w // 8), 3)).astype(np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)


def _photo_patch(src: Image.Image, size: tuple[int, int], rng: np.random.RandomState
                 ) -> Image.Image:
    """A crop of `src` with the aspect of `size` = (w, h), 25-100 % of the largest such crop,
    resized to `size`: an occluder cut from a real photo."""
    w, h = size
    sw, sh = src.size
    fit = min(sw / w, sh / h) * rng.uniform(0.25, 1.0)
    cw, ch = max(1, min(sw, int(round(w * fit)))), max(1, min(sh, int(round(h * fit))))
    x0, y0 = int(rng.randint(0, sw - cw + 1)), int(rng.randint(0, sh - ch + 1))
    return _rgb(src).crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)


def occlusion(img: Image.Image, rng: RandomLike,
              occluders: Sequence[Image.Image] | None = None) -> Image.Image:
    """One to three opaque shapes (rectangle or ellipse; flat colour or noise texture) hiding
    15-35 % of the image in total. Same size.

    `occluders`: photos; each shape is then, half the time, cut from one of them (what hides an
    object in a real photo is another object). None draws exactly the shapes it drew before."""
    rng = _rng(rng)
    img = _rgb(img).copy()
    w, h = img.size
    n = int(rng.randint(1, 4))
    total = rng.uniform(0.15, 0.35) * w * h
    for _ in range(n):
        area = total / n
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        ow = int(min(w, max(4, np.sqrt(area * aspect))))
        oh = int(min(h, max(4, area / max(ow, 1))))
        x0, y0 = int(rng.randint(0, w - ow + 1)), int(rng.randint(0, h - oh + 1))
        mask = Image.new("L", (ow, oh), 0)
        draw = ImageDraw.Draw(mask)
        if rng.rand() < 0.5:
            draw.rectangle((0, 0, ow - 1, oh - 1), fill=255)
        else:
            draw.ellipse((0, 0, ow - 1, oh - 1), fill=255)
        if occluders and rng.rand() < 0.5:
            patch = _photo_patch(occluders[rng.randint(len(occluders))], (ow, oh), rng)
        else:
            patch = (_noise_patch((ow, oh), rng) if rng.rand() < 0.5
                     else Image.new("RGB", (ow, oh), _random_colour(rng)))
        img.paste(patch, (x0, y0), mask)
    return img


def clutter_background(size: tuple[int, int], rng: RandomLike) -> Image.Image:
    """A cluttered synthetic background (w, h): texture plus 30-60 random shapes and lines."""
    rng = _rng(rng)
    w, h = size
    bg = _noise_patch((w, h), rng)
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.randint(30, 61))):
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        sw, sh = rng.randint(4, max(5, w // 4)), rng.randint(4, max(5, h // 4))
        box = (int(x0), int(y0), int(x0 + sw), int(y0 + sh))
        kind = rng.randint(0, 3)
        colour = _random_colour(rng)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.randint(1, 5)))
    return bg.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))


def clutter(img: Image.Image, rng: RandomLike, background: Image.Image | None = None
            ) -> Image.Image:
    """The photo shrunk to 40-65 % of its long side and pasted at a random place onto a
    cluttered background of the photo's size (`clutter_background`, or `background` resized)."""
    rng = _rng(rng)
    img = _rgb(img)
    w, h = img.size
    bg = (_rgb(background).resize((w, h), Image.Resampling.BICUBIC) if background is not None
          else clutter_background((w, h), rng))
    s = rng.uniform(0.4, 0.65)
    sw, sh = max(4, int(round(w * s))), max(4, int(round(h * s)))
    obj = img.resize((sw, sh), Image.Resampling.BICUBIC)
    bg.paste(obj, (int(rng.randint(0, w - sw + 1)), int(rng.randint(0, h - sh + 1))))
    return bg


# --------------------------------------------------------------------------- registry

NUISANCE_FUNCTIONS: dict[str, Callable[[Image.Image, np.random.RandomState], Image.Image]] = {
    "illumination": illumination,
    "scale_crop": scale_crop,
    "perspective": perspective,
    "occlusion": occlusion,
    "clutter": clutter,
}
NUISANCES: tuple[str, ...] = tuple(NUISANCE_FUNCTIONS)


def make_view(img: Image.Image, nuisance: str, rng: RandomLike) -> Image.Image:
    """One view of `img` under `nuisance` (one of NUISANCES), drawn with `rng` (a RandomState or
    an int seed) -> RGB PIL image."""
    if nuisance not in NUISANCE_FUNCTIONS:
        raise ValueError(f"unknown nuisance {nuisance!r}; choose from {', '.join(NUISANCES)}")
    return NUISANCE_FUNCTIONS[nuisance](img, _rng(rng))


def random_view(img: Image.Image, seed: int, nuisances: tuple[str, ...] = NUISANCES
                ) -> Image.Image:
    """A view under a nuisance chosen by `seed` from `nuisances`: (photo, seed) -> view, the
    signature training-family generators take."""
    rng = _rng(seed)
    return make_view(img, nuisances[int(rng.randint(len(nuisances)))], rng)
