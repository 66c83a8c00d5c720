"""The bundled sample collection and altered query copies.

The photos are the sample images that scikit-image and scikit-learn ship (public domain / CC0 /
BSD, see their READMEs), copied out at set-up time; each gets four altered copies used as
queries: crop, brightness, rotation, partial occlusion. Deterministic.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg",
                  "text.png", "cell.png", "microaneurysms.png", "clock_motion.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
ALTERATIONS = ("crop", "bright", "rotate", "occlude")


def sample_photos() -> dict[str, Image.Image]:
    """name -> RGB PIL image of every bundled sample photo."""
    import skimage
    import sklearn.datasets

    from remap_core.data.preprocess import to_rgb

    photos = {}
    folder = Path(skimage.__file__).parent / "data"
    for fname in SKIMAGE_PHOTOS:
        with Image.open(folder / fname) as im:
            photos[fname.rsplit(".", 1)[0]] = to_rgb(im)
    folder = Path(sklearn.datasets.__file__).parent / "images"
    for fname in SKLEARN_PHOTOS:
        photos[fname.rsplit(".", 1)[0]] = Image.open(folder / fname).convert("RGB")
    return photos


def alter(img: Image.Image, how: str) -> Image.Image:
    """One altered copy of a photo, as a query would see it."""
    w, h = img.size
    if how == "crop":          # 70 % central-left crop: scale change + partial view
        return img.crop((int(0.08 * w), int(0.12 * h), int(0.78 * w), int(0.82 * h)))
    if how == "bright":        # illumination: brighter and lower contrast
        return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(1.5)).enhance(0.8)
    if how == "rotate":        # small in-plane rotation, cropped to avoid black corners
        r = img.rotate(12, resample=Image.Resampling.BICUBIC, expand=False)
        return r.crop((int(0.1 * w), int(0.1 * h), int(0.9 * w), int(0.9 * h)))
    if how == "occlude":       # a grey block over a fifth of the image
        out = img.copy()
        ImageDraw.Draw(out).rectangle((int(0.55 * w), int(0.5 * h), int(0.95 * w),
                                       int(0.95 * h)), fill=(128, 128, 128))
        return out
    raise ValueError(f"unknown alteration {how!r}; known: {ALTERATIONS}")


def write_samples(out_dir: str) -> tuple[list[str], list[str]]:
    """Write images/<name>.jpg and queries/<name>__<alteration>.jpg; returns both path lists.
    An `out_dir` that is a file, or lies under one, is refused before anything is written."""
    check_output_folder(out_dir)
    images_dir, queries_dir = Path(out_dir) / "images", Path(out_dir) / "queries"
    images_dir.mkdir(parents=True, exist_ok=True)
    queries_dir.mkdir(parents=True, exist_ok=True)
    images, queries = [], []
    for name, img in sorted(sample_photos().items()):
        p = images_dir / f"{name}.jpg"
        img.save(p, quality=92)
        images.append(str(p))
        for how in ALTERATIONS:
            q = queries_dir / f"{name}__{how}.jpg"
            alter(img, how).save(q, quality=90)
            queries.append(str(q))
    return images, queries


def check_output_folder(out_dir: str) -> None:
    """Refuse an --output that is a file or lies under one (ValueError), before writing."""
    path = Path(out_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under {p}, which is a file"
                raise ValueError(f"--output {out_dir} {where}; pass a folder to write the "
                                 f"samples into")
            return
