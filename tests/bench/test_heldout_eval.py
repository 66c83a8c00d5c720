"""bench/heldout_eval.py --standard: the held-out collection is rebuilt from the package cache
with the keys, order and filters of the files earlier runs globbed, so its families and seeded
views are the same; and the script refuses a half-given collection."""

import os

import numpy as np
import pytest
from PIL import Image

from script_modules import load_bench

heldout_eval = load_bench("heldout_eval")


def _cache_with_packages(root):
    """A package cache whose Debian packages are already fetched (.complete): every benchmark
    wallpaper package empty (so the eval split is the scikit-image/scikit-learn photos), and
    tuxpaint stamps and gnome backgrounds with a few files."""
    from remap_core.evaluation.benchmark import DEBIAN_PHOTOS

    for pkg in [*DEBIAN_PHOTOS, "tuxpaint-stamps-default", "gnome-backgrounds"]:
        os.makedirs(root / "debian" / pkg, exist_ok=True)
        (root / "debian" / pkg / ".complete").touch()
    stamps = root / "debian/tuxpaint-stamps-default/usr/share/tuxpaint/stamps"
    rng = np.random.default_rng(0)
    for rel, size in [("animals/cats/cat.png", (400, 320)), ("food/apple.png", (320, 360)),
                      ("food/pea.png", (200, 500))]:        # pea: short side < 300, left out
        os.makedirs((stamps / rel).parent, exist_ok=True)
        rgba = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
        rgba[:20, :, 3] = 0                                  # transparent band: composited on white
        Image.fromarray(rgba, "RGBA").save(stamps / rel)
    gnome = root / "debian/gnome-backgrounds/usr/share/backgrounds/gnome"
    os.makedirs(gnome)
    for name in ("b.webp", "a.jpg", "c.png"):               # png: not one of the backgrounds
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(gnome / name)
    return stamps, gnome


def test_the_standard_collection_is_the_globbed_files_collection(tmp_path):
    from remap_core.evaluation.benchmark import benchmark_photos

    cache = tmp_path / "cache"
    stamps, gnome = _cache_with_packages(cache)
    photos, backgrounds = heldout_eval.standard_collection(str(cache))

    # the same collection as globbing files laid out as the earlier runs had them
    files = tmp_path / "heldout"
    os.makedirs(files / "evalsplit")
    for name, img in benchmark_photos("eval", str(cache), max_side=1 << 30).items():
        img.save(files / "evalsplit" / (name.replace("/", "_") + ".png"))
    os.symlink(stamps, files / "tp")
    globbed = heldout_eval.read_photos([str(files / "evalsplit/*.png"), str(files / "tp/**/*.png")],
                                       300, 768)
    assert sorted(photos) == sorted(k.replace(str(files) + "/", "") for k in globbed)
    assert "tp/animals/cats/cat.png" in photos and "tp/food/pea.png" not in photos
    assert any(k.startswith("evalsplit/") for k in photos)
    assert len(backgrounds) == 2                             # the webp and the jpg
    want_bg = heldout_eval.read_photos([str(gnome / "*.webp"), str(gnome / "*.jpg")], 64, 768)
    a, fa, ka = heldout_eval.build_collection(photos, backgrounds, 1, 0)
    b, fb, kb = heldout_eval.build_collection(globbed, list(want_bg.values()), 1, 0)
    assert ka == kb and np.array_equal(fa, fb)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    cat = np.asarray(photos["tp/animals/cats/cat.png"])
    assert cat.shape == (320, 400, 3) and (cat[:20] == 255).all()    # RGBA on white


def test_a_collection_must_be_given_whole(tmp_path):
    with pytest.raises(SystemExit):
        heldout_eval.main(["--photos", "x/*.png", "--model", "gem"])      # no backgrounds
    for extra in (["--photos", "x/*.png"], ["--backgrounds", "y/*.jpg"]):
        with pytest.raises(SystemExit):                       # --standard, and globs besides
            heldout_eval.main(["--standard", str(tmp_path), *extra, "--model", "gem"])


def test_the_descriptor_cache_key_follows_the_pixels_not_the_count():
    rng = np.random.default_rng(0)
    a = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(3)]
    b = a[:2] + [Image.fromarray(np.asarray(a[2])[::-1].copy())]     # same size, other pixels
    assert heldout_eval.collection_digest(a) == heldout_eval.collection_digest(list(a))
    assert heldout_eval.collection_digest(a) != heldout_eval.collection_digest(b)


def test_clutter_scale_changes_only_the_views_with_clutter_in_them():
    rng = np.random.default_rng(1)
    photos = {f"p{i}.png": Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
              for i in range(3)}
    bgs = [Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)) for _ in range(2)]
    a, fa, ka = heldout_eval.build_collection(photos, bgs, 1, 0)
    d, _, _ = heldout_eval.build_collection(photos, bgs, 1, 0, heldout_eval.CLUTTER_SCALE)
    b, fb, kb = heldout_eval.build_collection(photos, bgs, 1, 0, (0.1, 0.12))
    assert ka == kb and np.array_equal(fa, fb)
    assert heldout_eval.collection_digest(a) == heldout_eval.collection_digest(d)
    for x, y, k in zip(a, b, ka):
        same = np.array_equal(np.asarray(x), np.asarray(y))
        if k == "clutter":
            assert not same
        elif k != "combined":
            assert same
