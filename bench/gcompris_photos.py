"""A second held-out photo collection: the real photographs Debian's `gcompris-qt-data` ships.

The standard held-out collection of `bench/heldout_eval.py` is the benchmark's eval photos and
tuxpaint stamps: wallpapers, documentation photos and objects cut out on white. The issue's own
held-out collection found REMAP weakest on *ordinary photographs* (animals, people, scenes).
GCompris, an educational suite, ships such photographs inside its Qt resource bundles:
monuments and buildings, wild and farm animals, musicians playing, animals and landscapes in
full HD. No training, benchmark or held-out code of this project reads that package.

    python bench/gcompris_photos.py --cache ~/.cache/remap --out gcompris/
    python bench/heldout_eval.py --photos 'gcompris/*.png' \
        --backgrounds '~/.cache/remap/debian/gnome-backgrounds/usr/share/backgrounds/gnome/*.webp' ...

Each JPEG or WebP image of at least `--min-side` px inside the chosen bundles (`BUNDLES`) is
written as `<bundle>_<n>.png`, numbered in the bundle's order. The images are found by their
signatures in the bundle's bytes (a Qt resource bundle stores them uncompressed); an exact
duplicate of one already written is skipped. Prints one JSON line: the photos per bundle and a
digest of all their pixels, so a run can be checked against another.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGE = "gcompris-qt-data"
RCC_ROOT = "./usr/share/gcompris-qt/rcc"
# Bundles of real photographs. Left out: cartoons and drawings (lang, babyshapes), paintings and
# cut-outs (details, paintings), mixed objects on white (categorization), small icons.
BUNDLES = ("explore_monuments", "explore_world_animals", "explore_farm_animals",
           "explore_world_music", "erase")
SIGNATURES = (rb"\xff\xd8\xff", rb"RIFF....WEBP")


def images_in(blob: bytes, min_side: int):
    """-> RGB images found in `blob` by their JPEG/WebP signatures, in the order they are stored,
    each at least `min_side` px on its short side."""
    starts = sorted(m.start() for sig in SIGNATURES for m in re.finditer(sig, blob, re.S))
    found = []
    for s in starts:
        try:
            im = Image.open(io.BytesIO(blob[s:]))
            im.load()
        except Exception:       # a signature inside other data, or a thumbnail inside an image
            continue
        if min(im.size) >= min_side:
            found.append(im.convert("RGB"))
    return found


def extract(rcc_dir: str, out_dir: str, bundles=BUNDLES, min_side: int = 300) -> dict:
    """Write the photos of `bundles` (files `<name>.rcc` in `rcc_dir`) to `out_dir` as PNG;
    -> {"per_bundle": {name: count}, "photos": n, "digest": sha1 of all pixels (12 hex)}."""
    os.makedirs(out_dir, exist_ok=True)
    seen, per, h = set(), {}, hashlib.sha1()
    for name in bundles:
        with open(os.path.join(rcc_dir, name + ".rcc"), "rb") as f:
            blob = f.read()
        n = 0
        for im in images_in(blob, min_side):
            key = hashlib.sha1(im.tobytes()).hexdigest()
            if key in seen:
                continue
            seen.add(key)
            h.update(repr(im.size).encode()), h.update(im.tobytes())
            im.save(os.path.join(out_dir, f"{name}_{n:03d}.png"))
            n += 1
        per[name] = n
    return {"per_bundle": per, "photos": sum(per.values()), "digest": h.hexdigest()[:12]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="package cache (apt-get download, once)")
    ap.add_argument("--out", required=True, help="folder for the photos (PNG)")
    ap.add_argument("--min-side", type=int, default=300)
    args = ap.parse_args(argv)
    from remap_core.evaluation.benchmark import fetch_debian_package

    root = fetch_debian_package(args.cache, PACKAGE, tuple(f"{RCC_ROOT}/{b}.rcc" for b in BUNDLES))
    if root is None:
        raise SystemExit(f"could not fetch Debian's {PACKAGE} (apt-get download)")
    line = {"bench": "gcompris_photos", "package": PACKAGE,
            **extract(os.path.join(root, RCC_ROOT), args.out, BUNDLES, args.min_side)}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
