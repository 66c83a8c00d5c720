"""bench/gcompris_photos.py: photos are found by signature inside a resource bundle's bytes,
small images, false signatures and exact duplicates left out, and written as PNG in order."""

import io
import json
import os

import numpy as np
from PIL import Image

from script_modules import load_bench

gcompris = load_bench("gcompris_photos")


def _encoded(seed, size, fmt):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, fmt, quality=95)
    return buf.getvalue()


def _bundle(parts):
    return b"qres\x00\x00\x00\x03" + b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def test_images_are_found_by_signature_and_small_or_false_ones_left_out():
    blob = _bundle([_encoded(0, (320, 400), "JPEG"), b"\xff\xd8\xff not an image",
                    _encoded(1, (120, 90), "JPEG"), b"RIFF1234WEBP junk",
                    _encoded(2, (400, 300), "WEBP")])
    found = gcompris.images_in(blob, min_side=300)
    assert [im.size for im in found] == [(320, 400), (400, 300)]
    assert all(im.mode == "RGB" for im in found)
    assert [im.size for im in gcompris.images_in(blob, min_side=64)] == \
        [(320, 400), (120, 90), (400, 300)]


def test_extract_writes_each_bundles_photos_in_order_without_duplicates(tmp_path):
    rcc = tmp_path / "rcc"
    os.makedirs(rcc)
    a, b = _encoded(0, (320, 320), "WEBP"), _encoded(1, (350, 300), "WEBP")
    (rcc / "one.rcc").write_bytes(_bundle([a, b]))
    (rcc / "two.rcc").write_bytes(_bundle([b, _encoded(2, (300, 500), "JPEG")]))  # b again
    line = gcompris.extract(str(rcc), str(tmp_path / "out"), ("one", "two"), 300)
    assert line["per_bundle"] == {"one": 2, "two": 1} and line["photos"] == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["one_000.png", "one_001.png", "two_000.png"]
    assert Image.open(tmp_path / "out" / "two_000.png").size == (300, 500)
    again = gcompris.extract(str(rcc), str(tmp_path / "out2"), ("one", "two"), 300)
    assert again["digest"] == line["digest"]
    json.dumps(line)
