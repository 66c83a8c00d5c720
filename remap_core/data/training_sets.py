"""Training images with class labels, from the two sources `remap train` reads.

(a) A labelled layout: a folder per class (landmark), or a Parquet/CSV table with a URI and a
    label column (the Google Landmarks `id,url,landmark_id` shape, or `uri,label`).
(b) Self-supervised view families: each unlabelled photo becomes a class whose members are
    generated views of it under the benchmark's nuisances (illumination, crop/scale,
    perspective, occlusion, clutter), drawn with seeds of their own.

Either way the result is a `TrainingSet`: uint8 (H, W, 3) arrays at the model's input size and
one integer label per image.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from remap_core.data.preprocess import ImageDecodeError, decode_image, resize_for_model

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
TABLE_EXTENSIONS = (".parquet", ".pq", ".csv", ".tsv")
URI_COLUMNS = ("uri", "url", "path", "filename", "file", "image")
LABEL_COLUMNS = ("label", "landmark_id", "landmark", "class", "cluster", "cid")

LAYOUT_HELP = ("expected a folder with one sub-folder of images per class (landmark), or a "
               "Parquet/CSV table with a URI column (uri/url/path) and a label column "
               "(label/landmark_id/class)")


@dataclass
class LabelledUris:
    """Image URIs with integer labels (N,) and the class names they index."""

    uris: list[str]
    labels: np.ndarray
    classes: list[str]


@dataclass
class TrainingSet:
    """Decoded training images (uint8 (H, W, 3)) with integer labels (N,)."""

    images: list[np.ndarray]
    labels: np.ndarray
    classes: list[str]
    sources: list[str] = field(default_factory=list)   # where each image came from
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (uri, reason)
    # (N,) source of each image's class (tiles of one photo share it); None: one per class
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> str:
        counts = np.bincount(self.labels, minlength=len(self.classes)) if len(self.labels) else []
        pairable = int(np.sum(np.asarray(counts) >= 2))
        return (f"{len(self.images)} images in {len(self.classes)} classes "
                f"({pairable} with two or more images), {len(self.skipped)} skipped")


# --------------------------------------------------------------------------- labelled layouts

def _encode_labels(raw: Sequence) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(r) for r in raw})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(r)] for r in raw], dtype=np.int64), names


def read_class_folders(root: str) -> LabelledUris:
    """A folder per class: root/<class>/<image>. Hidden entries and non-images are ignored."""
    uris, raw = [], []
    for cls in sorted(os.listdir(root)):
        sub = os.path.join(root, cls)
        if cls.startswith(".") or not os.path.isdir(sub):
            continue
        for dirpath, dirnames, filenames in os.walk(sub):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                    uris.append(os.path.join(dirpath, fname))
                    raw.append(cls)
    if not uris:
        raise ValueError(f"{root} holds no class sub-folders with images; {LAYOUT_HELP}")
    labels, classes = _encode_labels(raw)
    return LabelledUris(uris, labels, classes)


def _pick_column(names: list[str], wanted: tuple[str, ...], what: str, path: str) -> str:
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise ValueError(f"{path} has no {what} column (looked for {', '.join(wanted)}; found "
                     f"{', '.join(names) or 'none'}); {LAYOUT_HELP}")


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.join(base, uri)


def read_label_table(path: str) -> LabelledUris:
    """A Parquet or CSV/TSV table of (uri, label) rows; relative URIs are taken from the
    table's folder."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            table = pq.read_table(path)
        else:
            delimiter = "\t" if lower.endswith(".tsv") else ","
            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delimiter))
    except (OSError, ValueError) as e:   # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot read {path} as a table: {e}; {LAYOUT_HELP}") from e
    uri_col = _pick_column(table.column_names, URI_COLUMNS, "URI", path)
    label_col = _pick_column(table.column_names, LABEL_COLUMNS, "label", path)
    uris = [str(u) for u in table.column(uri_col).to_pylist()]
    raw = table.column(label_col).to_pylist()
    keep = [i for i, (u, lab) in enumerate(zip(uris, raw)) if u and u != "None" and lab is not None]
    if not keep:
        raise ValueError(f"{path} has no rows with both a URI and a label; {LAYOUT_HELP}")
    base = os.path.dirname(os.path.abspath(path)) if "://" not in path else path.rsplit("/", 1)[0]
    labels, classes = _encode_labels([raw[i] for i in keep])
    return LabelledUris([_resolve(uris[i], base) for i in keep], labels, classes)


def read_labelled_layout(path: str) -> LabelledUris:
    """Dispatch on what `path` is: a folder of class folders, or a label table."""
    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(f"training data not found: {path}")
    if os.path.isdir(path):
        return read_class_folders(path)
    if path.lower().endswith(TABLE_EXTENSIONS):
        return read_label_table(path)
    raise ValueError(f"cannot read training data from {path}: {LAYOUT_HELP}")


# --------------------------------------------------------------------------- decoding

def read_image(uri: str) -> Image.Image:
    """Fetch (any fsspec URL or path) and decode one image to RGB."""
    import fsspec

    with fsspec.open(uri, "rb") as f:
        return decode_image(f.read())


def load_labelled(data: LabelledUris, max_side: int, multiple: int = 32,
                  progress: bool = False) -> TrainingSet:
    """Decode and resize every image; unreadable ones are skipped and listed, not fatal."""
    from tqdm import tqdm

    images, labels, sources, skipped = [], [], [], []
    for uri, label in tqdm(list(zip(data.uris, data.labels)), desc="load", unit="img",
                           disable=not progress, leave=False):
        try:
            img = read_image(uri)
        except (ImageDecodeError, OSError) as e:
            skipped.append((uri, f"{type(e).__name__}: {e}"))
            log.warning("skipping %s: %s", uri, e)
            continue
        images.append(resize_for_model(img, max_side, multiple))
        labels.append(int(label))
        sources.append(uri)
    if not images:
        raise ValueError(f"none of the {len(data.uris)} training images could be read "
                         f"(first failure: {skipped[0][1] if skipped else 'none'})")
    return TrainingSet(images, np.asarray(labels, dtype=np.int64), list(data.classes), sources,
                       skipped)


# --------------------------------------------------------------------------- view families

ViewMaker = Callable[[Image.Image, int], Image.Image]   # (photo, seed) -> one altered view


def view_families(photos: dict[str, Image.Image], views_per_photo: int, seed: int,
                  make_view: ViewMaker, max_side: int, multiple: int = 32,
                  include_original: bool = True, progress: bool = False) -> TrainingSet:
    """Each photo becomes a class of `views_per_photo` generated views (plus the photo itself
    when `include_original`). View seeds derive from `seed`, the photo's position and the view
    number, so the set is reproducible and disjoint from a benchmark drawn with other seeds."""
    from tqdm import tqdm

    if views_per_photo < 1 and not include_original:
        raise ValueError("a view family needs at least two images: raise --views-per-photo")
    images, labels, sources = [], [], []
    names = sorted(photos)
    ss = np.random.SeedSequence(seed)
    photo_seeds = ss.generate_state(len(names), dtype=np.uint32)
    for c, name in enumerate(tqdm(names, desc="views", unit="photo", disable=not progress,
                                  leave=False)):
        photo = photos[name]
        if include_original:
            images.append(resize_for_model(photo, max_side, multiple))
            labels.append(c)
            sources.append(f"{name}#original")
        view_seeds = np.random.SeedSequence(int(photo_seeds[c])).generate_state(
            views_per_photo, dtype=np.uint32)
        for v, vs in enumerate(view_seeds):
            view = make_view(photo, int(vs))
            images.append(resize_for_model(view, max_side, multiple))
            labels.append(c)
            sources.append(f"{name}#view{v}")
    _, groups = np.unique([source_photo(names[c]) for c in labels], return_inverse=True)
    return TrainingSet(images, np.asarray(labels, dtype=np.int64), names, sources,
                       groups=groups.astype(np.int64))


TILE_MARK = "#tile"


def source_photo(name: str) -> str:
    """The photo a class was cut from: "photo#tile01" -> "photo"; any other name unchanged."""
    return name.split(TILE_MARK, 1)[0]


def photo_tiles(photos: dict[str, Image.Image], grid: int) -> dict[str, Image.Image]:
    """Each photo cut into a grid x grid of non-overlapping tiles, each tile a photo (a class)
    of its own: {"name#tile<row><col>": tile}. More, and harder, classes from the same photos:
    tiles of one photo share its colours and light, so telling them apart takes the content.
    grid 1 returns the photos unchanged."""
    if grid < 1:
        raise ValueError(f"tile grid must be 1 or more, got {grid}")
    if grid == 1:
        return dict(photos)
    out: dict[str, Image.Image] = {}
    for name, photo in photos.items():
        w, h = photo.size
        xs = [round(w * k / grid) for k in range(grid + 1)]
        ys = [round(h * k / grid) for k in range(grid + 1)]
        for r in range(grid):
            for c in range(grid):
                out[f"{name}{TILE_MARK}{r}{c}"] = photo.crop((xs[c], ys[r], xs[c + 1], ys[r + 1]))
    return out


def clutter_pool(n: int, seed: int, size: tuple[int, int] = (512, 384)) -> list[Image.Image]:
    """`n` cluttered backgrounds (`views.clutter_background`) drawn from `seed`, to be shared by
    the clutter views of every class (see `compound_view`)."""
    from remap_core.data.views import clutter_background

    seeds = np.random.SeedSequence([seed, 0xC1]).generate_state(n, dtype=np.uint32)
    return [clutter_background(size, int(s)) for s in seeds]


def photo_backgrounds(photos: dict[str, Image.Image], n: int, seed: int,
                      size: tuple[int, int] = (512, 384), salt: int = 0xB6) -> list[Image.Image]:
    """`n` real-photo clutter backgrounds: random crops (30-100 % of each side) of random photos
    of the training set, resized to `size`. Real scenes behind a pasted photo are what clutter
    looks like in a collection; generated shapes alone teach the model to ignore shapes.
    `salt`: another salt draws another set from the same seed (OCCLUDER_SALT: the occluders)."""
    if n <= 0 or not photos:
        return []
    rng = np.random.RandomState(np.random.SeedSequence([seed, salt]).generate_state(1)[0])
    names = sorted(photos)
    out = []
    for _ in range(n):
        img = photos[names[rng.randint(len(names))]].convert("RGB")
        w, h = img.size
        cw, ch = max(8, int(w * rng.uniform(0.3, 1.0))), max(8, int(h * rng.uniform(0.3, 1.0)))
        x0, y0 = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
        out.append(img.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC))
    return out


OCCLUDER_SALT = 0x0C


def compound_view(photo: Image.Image, seed: int, max_nuisances: int = 2,
                  backgrounds: Sequence[Image.Image] | None = None,
                  occluders: Sequence[Image.Image] | None = None) -> Image.Image:
    """A training view: 1..max_nuisances distinct nuisances of `views.py` chained in a random
    order (e.g. a perspective warp of a darker crop), all drawn from `seed`. Harder and more
    varied than the benchmark's single-nuisance views, so training tuples keep a signal.

    `backgrounds`: clutter views paste the photo onto one of these (shared by all classes)
    instead of a background of their own. With a background per view, the background is itself
    a signature of the view, and hard negatives (other classes' clutter views) teach the model
    to tell backgrounds apart; shared backgrounds teach it to look past them.
    `occluders`: occlusion views cut half their shapes from these photos (`views.occlusion`)."""
    from remap_core.data.views import NUISANCES, clutter, make_view, occlusion

    rng = np.random.RandomState(seed % 2 ** 32)
    k = int(rng.randint(1, max_nuisances + 1))
    for nuisance in rng.choice(NUISANCES, size=k, replace=False):
        if nuisance == "clutter" and backgrounds:
            photo = clutter(photo, rng, background=backgrounds[rng.randint(len(backgrounds))])
        elif nuisance == "occlusion" and occluders:
            photo = occlusion(photo, rng, occluders=occluders)
        else:
            photo = make_view(photo, str(nuisance), rng)
    return photo
