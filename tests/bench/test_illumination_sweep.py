"""bench/illumination_sweep.py: each kind of light changes what it says and nothing else (size,
mode, seeded draw), the collection holds one view of each kind per photo, and the script runs end
to end on a tiny collection with a real model."""

import json

import numpy as np
import pytest
from PIL import Image

from script_modules import load_bench

sweep = load_bench("illumination_sweep")
heldout_eval = sweep.H


def _photo(seed=0, size=(160, 120)):
    """A photo-like image: smooth colour gradients with edges, mid-grey on average."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    rgb = np.stack([0.5 + 0.3 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0, 1, 2)], -1)
    rgb += 0.1 * (rng.random(rgb.shape[:2]) > 0.97)[..., None]
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def _mean(img):
    return float(np.asarray(img, np.float64).mean())


@pytest.mark.parametrize("kind", list(sweep.KINDS))
def test_each_kind_keeps_size_and_mode_and_is_seeded(kind):
    img = _photo()
    make = sweep.KINDS[kind]
    a = make(img, np.random.RandomState(3), [img])
    b = make(img, np.random.RandomState(3), [img])
    c = make(img, np.random.RandomState(4), [img])
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(img))


def test_the_kinds_do_what_they_say():
    img = _photo()
    rng = np.random.RandomState
    base = _mean(img)
    assert _mean(sweep.dark(img, rng(0), [])) < 0.6 * base
    assert _mean(sweep.night(img, rng(0), [])) < 0.6 * base
    assert _mean(sweep.bright(img, rng(0), [])) > 1.2 * base
    assert np.asarray(sweep.haze(img, rng(0), []), np.float64).std() < \
        0.7 * np.asarray(img, np.float64).std()
    mono = np.asarray(sweep.monochrome(img, rng(0), []), np.int16)
    assert np.abs(mono[..., 0] - mono[..., 2]).max() <= 3          # grey, up to JPEG's rounding
    cast = np.asarray(sweep.colour_cast(img, rng(0), []), np.float64).mean((0, 1))
    orig = np.asarray(img, np.float64).mean((0, 1))
    assert abs((cast[0] - cast[2]) - (orig[0] - orig[2])) > 20       # red against blue moved
    dim = np.asarray(sweep.shadow(img, rng(0), []), np.float64).mean(2) / \
        np.maximum(1, np.asarray(img, np.float64).mean(2))
    assert (dim < 0.75).mean() > 0.25 and (dim > 0.85).mean() > 0.25  # part in shadow, part not


def test_the_collection_has_one_view_of_each_kind_per_photo():
    photos = {f"p{i}.png": _photo(i) for i in range(3)}
    bgs = [_photo(9, (90, 60))]
    images, family, kind = heldout_eval.build_collection(photos, bgs, 1, 0, views_of=sweep.KINDS)
    assert len(images) == 3 * (1 + len(sweep.KINDS)) + 1
    assert kind[:1 + len(sweep.KINDS)] == [None, *sweep.KINDS]
    assert list(family) == [f for f in range(3) for _ in range(1 + len(sweep.KINDS))] + [-1]


def test_heldout_eval_draws_the_same_collection_through_views_of():
    photos = {f"p{i}.png": _photo(i) for i in range(2)}
    bgs = [_photo(9, (90, 60))]
    a, _, ka = heldout_eval.build_collection(photos, bgs, 1, 0)
    b, _, kb = heldout_eval.build_collection(photos, bgs, 1, 0,
                                             views_of=heldout_eval.generators())
    assert ka == kb and heldout_eval.collection_digest(a) == heldout_eval.collection_digest(b)


def test_the_script_scores_every_kind_end_to_end(tmp_path):
    for i in range(3):
        _photo(i, (200, 150)).save(tmp_path / f"p{i}.png")
    _photo(7, (120, 90)).save(tmp_path / "bg.png")
    out = tmp_path / "sweep.json"
    sweep.main(["--photos", str(tmp_path / "p*.png"), "--backgrounds", str(tmp_path / "bg.png"),
                "--min-side", "64", "--side", "128", "--model", "gem@128", "--rerank", "qe",
                "--output", str(out)])
    line = json.loads(out.read_text())
    assert line["images"] == 3 * (1 + len(sweep.KINDS)) + 1
    assert line["queries"] == 3 * len(sweep.KINDS) and line["kinds"] == list(sweep.KINDS)
    plain, qe = line["results"]["gem@128"], line["results"]["gem@128 +qe"]
    for row in (plain, qe):
        assert all(0 <= row[k] <= 100 for k in ("overall", *sweep.KINDS))
    assert plain["vs_ref"] == [0.0, 0.0, 0.0]


def test_the_script_refuses_a_half_given_collection():
    with pytest.raises(SystemExit):
        sweep.main(["--photos", "x/*.png", "--model", "gem"])


def test_with_nuisances_the_families_hold_heldout_evals_views_first():
    photos = {f"p{i}.png": _photo(i) for i in range(2)}
    bgs = [_photo(9, (90, 60))]
    both = dict(heldout_eval.generators(), **sweep.KINDS)
    a, _, ka = heldout_eval.build_collection(photos, bgs, 1, 0, views_of=both)
    b, _, kb = heldout_eval.build_collection(photos, bgs, 1, 0)
    n = 1 + len(heldout_eval.NUISANCES)
    assert ka[:n] == kb[:n] and ka[n:n + len(sweep.KINDS)] == list(sweep.KINDS)
    for x, y in zip(a[:n], b[:n]):                        # the same six views, from the same seeds
        assert np.array_equal(np.asarray(x), np.asarray(y))
