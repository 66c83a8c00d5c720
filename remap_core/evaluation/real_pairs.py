"""Real image pairs: one scene or object photographed twice, a test of invariance on real changes
of viewpoint, light and clutter rather than on generated views.

The pairs are OpenCV's sample data (Debian `opencv-doc`, fetched once like the benchmark's
photos): graf1/graf3 (planar viewpoint change, from the Oxford affine-region sequences),
leuvenA/leuvenB (exposure), box/box_in_scene (the object in a cluttered, occluded scene), and
two real-scene pairs with a moving camera (aero1/aero3, aloeL/aloeR). Every photo of the set
(both sides of every pair, plus unpaired photos as distractors) is in the database; each paired
photo is a query once and its partner is its only positive, so AP = 1 / rank of the partner.

Some pairs share a scene with a benchmark *train*-split photo (leuvenA, aloeL and aero1 are
benchmark photos of the train split, so `remap train --benchmark-views` has seen generated views
of them, never the partner photo): `PairSet.seen_in_training` says which, so results on the
unseen pairs can be read apart. Photos of those scenes are never distractors.

    pairs = load_real_pairs(cache_dir)            # None when opencv-doc cannot be fetched
    desc = model.embed_arrays([resize_for_model(im, side, multiple) for im in pairs.images])
    result = score_real_pairs(desc, pairs)        # ranks, APs, per pair and in all
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

OPENCV_DATA = "./usr/share/doc/opencv-doc/examples/data/"

# (first, second, what changes between them)
REAL_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("graf1.png", "graf3.png", "viewpoint (planar scene, about 40 degrees)"),
    ("leuvenA.jpg", "leuvenB.jpg", "illumination (exposure)"),
    ("box.png", "box_in_scene.png", "clutter, occlusion, scale and viewpoint"),
    ("aero1.jpg", "aero3.jpg", "viewpoint (moving camera)"),
    ("aloeL.jpg", "aloeR.jpg", "viewpoint (stereo baseline)"),
)
# photos of the same package with no partner: database distractors
DISTRACTORS: tuple[str, ...] = (
    "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg",
    "home.jpg", "messi5.jpg", "orange.jpg", "smarties.png", "squirrel_cls.jpg",
    "starry_night.jpg", "stuff.jpg", "chicky_512.png",
)


@dataclass
class PairSet:
    """Images of a pair test: `images` (RGB PIL), `names`, `pairs` [(i, j, change)] indexing
    images, `seen_in_training` [bool] per pair (the scene is a benchmark train-split photo)."""
    images: list
    names: list[str]
    pairs: list[tuple[int, int, str]]
    seen_in_training: list[bool]


def pair_set(files: dict[str, str], extra_distractors: dict | None = None) -> PairSet:
    """A PairSet from {file name: path} (names as in REAL_PAIRS / DISTRACTORS; pairs with a missing
    side are left out) and optional {name: RGB PIL image} distractors."""
    from remap_core.evaluation.benchmark import photo_split

    images, names, pairs, seen = [], [], [], []

    def add(name, img):
        names.append(name)
        images.append(img.convert("RGB"))
        return len(images) - 1

    for a, b, change in REAL_PAIRS:
        if a in files and b in files:
            i = add(a, Image.open(files[a]))
            j = add(b, Image.open(files[b]))
            pairs.append((i, j, change))
            stem = os.path.splitext(a)[0]
            seen.append(photo_split(f"debian/opencv-doc/{stem}") == "train")
    if not pairs:
        raise ValueError(f"no complete pair among {sorted(files)}; expected the files of "
                         f"{[p[:2] for p in REAL_PAIRS]}")
    for name in DISTRACTORS:
        if name in files:
            add(name, Image.open(files[name]))
    for name, img in (extra_distractors or {}).items():
        add(name, img)
    return PairSet(images, names, pairs, seen)


def load_real_pairs(cache_dir: str, extra_distractors: dict | None = None) -> PairSet | None:
    """Fetch `opencv-doc` once into `cache_dir` (see benchmark.fetch_debian_package) and build the
    PairSet; None when the package cannot be fetched."""
    from remap_core.evaluation.benchmark import fetch_debian_package

    wanted = [f for a, b, _ in REAL_PAIRS for f in (a, b)] + list(DISTRACTORS)
    # a folder of its own: the benchmark's opencv-doc folder holds other members of the package
    root = fetch_debian_package(os.path.join(cache_dir, "real-pairs"), "opencv-doc",
                                tuple(OPENCV_DATA + f for f in wanted))
    if root is None:
        return None
    files = {f: os.path.join(root, OPENCV_DATA, f) for f in wanted
             if os.path.exists(os.path.join(root, OPENCV_DATA, f))}
    return pair_set(files, extra_distractors)


def score_real_pairs(desc: np.ndarray, pairs: PairSet) -> dict:
    """Descriptors (N, D) of `pairs.images` (L2-normalised) -> {"queries": [{query, partner,
    change, seen_in_training, rank, ap, gap}], "map", "map_unseen", "recall_at_1", "mean_gap"}.
    Each side of each pair is a query over every other image; rank is the partner's 1-based
    rank, AP = 1 / rank, gap = the partner's similarity minus the best other image's, in
    standard deviations of the query's similarities to the other images (> 0 when the partner
    is first; a margin that still tells models apart when every rank is 1, and comparable
    across descriptors whose similarities spread differently)."""
    desc = np.asarray(desc, np.float64)
    if desc.shape[0] != len(pairs.images):
        raise ValueError(f"{desc.shape[0]} descriptors for {len(pairs.images)} images")
    sims = desc @ desc.T
    rows = []
    for (i, j, change), seen in zip(pairs.pairs, pairs.seen_in_training):
        for q, p in ((i, j), (j, i)):
            s = sims[q]
            others = s[(np.arange(len(s)) != p) & (np.arange(len(s)) != q)]   # not the query
            # ties count against the partner: rank = 1 + images scoring at least as high
            rank = 1 + int(np.sum(others >= s[p]))
            rows.append({"query": pairs.names[q], "partner": pairs.names[p], "change": change,
                         "seen_in_training": seen, "rank": rank, "ap": 1.0 / rank,
                         "gap": float((s[p] - others.max()) / max(others.std(), 1e-12))})
    aps = np.array([r["ap"] for r in rows])
    unseen = np.array([not r["seen_in_training"] for r in rows])
    return {"queries": rows, "map": float(aps.mean()),
            "map_unseen": float(aps[unseen].mean()) if unseen.any() else float("nan"),
            "recall_at_1": float(np.mean([r["rank"] == 1 for r in rows])),
            "mean_gap": float(np.mean([r["gap"] for r in rows]))}
