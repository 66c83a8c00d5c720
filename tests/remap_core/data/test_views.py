"""Nuisance transforms: deterministic per seed, and each does what it says."""

import numpy as np
import pytest
from PIL import Image

from remap_core.data.views import (NUISANCES, clutter, homography_coefficients, make_view, occlusion,
                              perspective, random_view, scale_crop)


@pytest.fixture(scope="module")
def photo():
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((160, 120))


@pytest.mark.parametrize("nuisance", NUISANCES)
def test_same_seed_same_view_other_seed_other_view(photo, nuisance):
    a = np.asarray(make_view(photo, nuisance, np.random.RandomState(7)))
    b = np.asarray(make_view(photo, nuisance, 7))
    c = np.asarray(make_view(photo, nuisance, np.random.RandomState(8)))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert a.shape != c.shape or np.abs(a.astype(int) - c).mean() > 1
    if nuisance != "scale_crop":
        assert a.shape == (120, 160, 3)
        assert np.abs(a.astype(int) - np.asarray(photo)).mean() > 2   # the view differs


def test_unknown_nuisance_is_a_clear_error(photo):
    with pytest.raises(ValueError, match="choose from"):
        make_view(photo, "blur", 0)


def test_homography_coefficients_map_output_corners_to_input_corners():
    src = np.array([[0, 0], [100, 0], [100, 80], [0, 80]], float)
    dst = np.array([[10, 5], [90, 12], [95, 70], [3, 78]], float)
    a, b, c, d, e, f, g, h = homography_coefficients(src, dst)
    for (x, y), (u, v) in zip(dst, src):
        den = g * x + h * y + 1
        assert (a * x + b * y + c) / den == pytest.approx(u)
        assert (d * x + e * y + f) / den == pytest.approx(v)


def test_perspective_keeps_the_whole_photo_in_frame():
    white = Image.new("RGB", (100, 80), (255, 255, 255))
    for seed in range(5):
        v = np.asarray(perspective(white, np.random.RandomState(seed)))
        # the warped photo covers a large part of the frame, the rest is a flat fill
        assert 0.45 < (v.min(axis=2) > 250).mean() <= 1.0


def test_scale_crop_keeps_35_to_75_percent_of_each_side_then_rescales():
    ramp = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1))).convert("RGB")
    for seed in range(5):
        v = np.asarray(scale_crop(ramp, np.random.RandomState(seed)))
        assert 0.6 * 200 * 0.95 <= max(v.shape[:2]) <= 200 * 1.01
        lo, hi = int(v[:, 0, 0].mean()), int(v[:, -1, 0].mean())
        assert 0.3 * 200 <= hi - lo <= 0.8 * 200    # the crop's width on the ramp


def test_occlusion_hides_up_to_a_third_of_the_image():
    grey = Image.new("RGB", (120, 90), (128, 128, 128))
    for seed in range(8):
        v = np.asarray(occlusion(grey, np.random.RandomState(seed))).astype(int)
        hidden = (np.abs(v - 128).sum(axis=2) > 0).mean()
        assert 0.05 < hidden <= 0.36


def test_occlusion_cuts_shapes_from_given_photos_and_leaves_the_default_draw_alone():
    grey = Image.new("RGB", (120, 90), (128, 128, 128))
    green = Image.new("RGB", (200, 150), (0, 255, 0))
    with_photo = 0
    for seed in range(16):
        plain = np.asarray(occlusion(grey, np.random.RandomState(seed)))
        assert np.array_equal(plain, np.asarray(occlusion(grey, np.random.RandomState(seed),
                                                          occluders=None)))
        v = np.asarray(occlusion(grey, np.random.RandomState(seed), occluders=[green]))
        assert v.shape == plain.shape
        assert np.array_equal(v, np.asarray(occlusion(grey, seed, occluders=[green])))
        hidden = (np.abs(v.astype(int) - 128).sum(axis=2) > 0).mean()
        assert 0.05 < hidden <= 0.36
        with_photo += bool(((v == (0, 255, 0)).all(axis=2)).sum() > 20)
    assert 4 <= with_photo <= 15          # about half the shapes come from the photo


def test_clutter_pastes_the_shrunk_photo_whole_onto_a_background():
    red = Image.new("RGB", (100, 80), (255, 0, 0))
    for seed in range(5):
        v = np.asarray(clutter(red, np.random.RandomState(seed))).astype(int)
        is_red = (v[..., 0] == 255) & (v[..., 1] == 0) & (v[..., 2] == 0)
        ys, xs = np.nonzero(is_red)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert 0.4 ** 2 * 0.95 <= box / (100 * 80) <= 0.65 ** 2 * 1.05 + 0.02
    bg = Image.new("RGB", (10, 10), (0, 0, 255))
    v = np.asarray(clutter(red, 0, background=bg))
    assert (v[..., 2] == 255).mean() > 0.5      # a given background is used


def test_random_view_is_a_deterministic_photo_seed_function(photo):
    np.testing.assert_array_equal(np.asarray(random_view(photo, 3)), np.asarray(random_view(photo, 3)))
