"""Per-element fetch + decode + resize (pipelines/prepare.py), without a pipeline: every odd
image embeds with the right pixels, every broken one becomes a dead-letter row with its reason."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import image_cases
from pipelines.prepare import Failure, PreparedImage, fetch_and_prepare, prepare, prepare_source
from pipelines.uris import Source
from remap_core.data.preprocess import MAX_PIXELS, decode_image
from remap_store.schema import stable_id


@pytest.mark.parametrize("name,reason", [(n, r) for n, (_, r) in image_cases.BAD.items()])
def test_broken_bytes_become_dead_letter_with_reason(name, reason):
    make, _ = image_cases.BAD[name]
    out = prepare(f"gs://b/{name}", make(), 64, 32)
    assert isinstance(out, Failure)
    assert out.reason == reason
    row = out.row("run-1")
    assert row == {"uri": f"gs://b/{name}", "stage": reason.split(".")[0],
                   "error_type": reason.split(".")[1], "message": out.message, "run_id": "run-1"}
    assert row["message"]  # says what went wrong


def test_decompression_bomb_is_refused_before_decoding_pixels():
    data = image_cases.decompression_bomb()
    assert 10_000 * 9_000 > MAX_PIXELS and len(data) < 100_000
    out = prepare("bomb.png", data, 64, 32)
    assert isinstance(out, Failure) and out.error_type == "too_large"
    assert "90000000" in out.message


@pytest.mark.parametrize("name", sorted(image_cases.GOOD_ODD))
def test_odd_but_valid_images_embed(name):
    data = image_cases.GOOD_ODD[name]()
    out = prepare(name, data, 64, 32)
    assert isinstance(out, PreparedImage), out
    h, w, c = out.pixels.shape
    assert c == 3 and out.pixels.dtype == np.uint8
    assert max(h, w) == 64 and min(h, w) % 32 == 0
    assert out.id == stable_id(name)
    assert out.content_sha1 == hashlib.sha1(data).hexdigest() and out.size_bytes == len(data)


def test_cmyk_red_decodes_to_rgb_red():
    rgb = np.asarray(decode_image(image_cases.cmyk_jpeg()))
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), [255, 0, 0], atol=12)


def test_sixteen_bit_gradient_is_scaled_to_eight_bits():
    rgb = np.asarray(decode_image(image_cases.png16()), dtype=np.int64)
    row = rgb[0, :, 0]
    expected = np.linspace(0, 65535, 64) * 255 / 65535
    np.testing.assert_allclose(row, expected, atol=1.01)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_transparency_is_composited_on_white():
    pal = np.asarray(decode_image(image_cases.palette_png_with_transparency()))
    assert (pal[:, :32] == 255).all()                      # transparent -> white
    assert (pal[:, 32:] == [255, 0, 0]).all()              # opaque red kept
    rgba = np.asarray(decode_image(image_cases.rgba_png()))
    assert (rgba[:, :30] == 255).all()
    assert (rgba[:, 30:] == [0, 255, 0]).all()


def test_animated_gif_uses_first_frame():
    rgb = np.asarray(decode_image(image_cases.animated_gif()))
    assert rgb.shape == (32, 48, 3)
    assert (rgb == [255, 0, 0]).all()


def test_extreme_aspect_ratios_keep_long_side_and_snap_short_side():
    wide = prepare("w", image_cases.jpeg(2000, 10, seed=1), 128, 32)
    tall = prepare("t", image_cases.jpeg(12, 1500, seed=2), 128, 32)
    assert wide.pixels.shape == (32, 128, 3) and (wide.width, wide.height) == (2000, 10)
    assert tall.pixels.shape == (128, 32, 3) and (tall.width, tall.height) == (12, 1500)


def test_missing_object_is_a_fetch_failure(tmp_path):
    out = fetch_and_prepare(str(tmp_path / "nope.jpg"), 64, 32)
    assert isinstance(out, Failure)
    assert (out.stage, out.error_type) == ("fetch", "not_found")


def test_folder_given_as_image_is_a_fetch_failure(tmp_path):
    out = fetch_and_prepare(str(tmp_path), 64, 32)
    assert isinstance(out, Failure) and out.stage == "fetch"


def test_prepare_source_carries_listed_size_and_version(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(image_cases.jpeg(50, 40))
    ok = prepare_source(Source(str(p), 123, "mtime=1"), 64, 32)
    assert (ok.listed_size, ok.version, ok.size_bytes) == (123, "mtime=1", p.stat().st_size)
    bad = prepare_source(Source(str(tmp_path / "gone.jpg"), 5, "mtime=2"), 64, 32)
    assert (bad.size, bad.version, bad.reason) == (5, "mtime=2", "fetch.not_found")
