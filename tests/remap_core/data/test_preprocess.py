"""Decoding at the size needed (remap_core/data/preprocess.py): a JPEG decoded at a DCT scale
gives the model the same input shape, upright per EXIF, and descriptors within a stated cosine of
a full decode on real photos; the decode limits (bytes, pixels, time) refuse with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import image_cases
from remap_core.data import preprocess
from remap_core.data.preprocess import (DRAFT_MARGIN, ImageDecodeError, decode_image,
                                        image_for_model, target_size)

# Upright 4:3 test card: four quadrants of distinct colours, which every orientation moves.
QUADRANTS = {"top_left": (220, 30, 30), "top_right": (30, 200, 30),
             "bottom_left": (30, 30, 220), "bottom_right": (230, 220, 40)}


def upright_card(width: int = 1600, height: int = 1200) -> np.ndarray:
    card = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    card[:h2, :w2] = QUADRANTS["top_left"]
    card[:h2, w2:] = QUADRANTS["top_right"]
    card[h2:, :w2] = QUADRANTS["bottom_left"]
    card[h2:, w2:] = QUADRANTS["bottom_right"]
    return card


# How a camera stores an upright picture under each EXIF orientation (the EXIF 2.3 table: the
# viewer applies the inverse), written with numpy, independently of Pillow's exif_transpose.
STORED = {1: lambda u: u, 2: np.fliplr, 3: lambda u: np.rot90(u, 2), 4: np.flipud,
          5: lambda u: u.transpose(1, 0, 2), 6: lambda u: np.rot90(u, 1),
          7: lambda u: np.rot90(u, 2).transpose(1, 0, 2), 8: lambda u: np.rot90(u, -1)}


def jpeg_with_orientation(upright: np.ndarray, orientation: int) -> bytes:
    img = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[preprocess.ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


def quadrant_colours(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Mean colour of the middle of each quadrant (away from the seams)."""
    h, w, _ = pixels.shape
    ys = {"top": slice(h // 8, 3 * h // 8), "bottom": slice(5 * h // 8, 7 * h // 8)}
    xs = {"left": slice(w // 8, 3 * w // 8), "right": slice(5 * w // 8, 7 * w // 8)}
    return {f"{y}_{x}": pixels[ys[y], xs[x]].reshape(-1, 3).mean(0)
            for y in ys for x in xs}


@pytest.mark.parametrize("draft", [DRAFT_MARGIN, 1, None], ids=["draft2", "draft1", "full"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_when_decoding_at_reduced_size(orientation, draft):
    data = jpeg_with_orientation(upright_card(), orientation)
    out = image_for_model(data, 256, 32, draft=draft)
    assert (out.width, out.height) == (1600, 1200)           # the upright full size
    assert out.pixels.shape == (192, 256, 3)                 # 256 x (1200 * 256/1600 = 192)
    for quadrant, colour in quadrant_colours(out.pixels).items():
        np.testing.assert_allclose(colour, QUADRANTS[quadrant], atol=6, err_msg=quadrant)


def test_large_jpeg_is_decoded_at_a_dct_scale_covering_twice_the_input():
    data = image_cases.jpeg(4000, 3000, seed=3, quality=85)
    img, full = preprocess._decode(data, preprocess.MAX_PIXELS, preprocess.MAX_BYTES, 30.0,
                                   (512, 32, 2))
    # target 512 x 384, covered twice: 1024 x 768 -> scale 1/2 (4000 // 1024 = 3 < 4)
    assert full == (4000, 3000) and img.size == (2000, 1500)
    img, _ = preprocess._decode(data, preprocess.MAX_PIXELS, preprocess.MAX_BYTES, 30.0,
                                (512, 32, 1))
    assert img.size == (1000, 750)                            # 4000 // 512 = 7 -> scale 1/4
    assert decode_image(data).size == (4000, 3000)            # no model size: full decode


def test_draft_never_decodes_below_the_input_size():
    for w, h in [(1030, 770), (513, 4000), (4000, 33), (2047, 1535), (8000, 6000)]:
        data = image_cases.jpeg(w, h, seed=w, quality=80)
        tw, th = target_size(w, h, 512, 32)
        img, _ = preprocess._decode(data, preprocess.MAX_PIXELS, preprocess.MAX_BYTES, 30.0,
                                    (512, 32, 1))
        assert img.width >= tw and img.height >= th, (w, h, img.size)
        assert image_for_model(data, 512, 32, draft=1).pixels.shape == (th, tw, 3)


def test_non_jpeg_formats_take_the_full_decode_with_the_same_result():
    card = upright_card(1200, 900)
    for fmt in ("PNG", "WEBP", "TIFF", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(card).save(buf, fmt)
        fast = image_for_model(buf.getvalue(), 128, 32)
        full = image_for_model(buf.getvalue(), 128, 32, draft=None)
        np.testing.assert_array_equal(fast.pixels, full.pixels, err_msg=fmt)


def _sample_jpegs():
    """The bundled sample photos (scikit-image, scikit-learn) as 1, 4 and 12 MP JPEGs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from decode_resize import photo_jpeg

    from remap_core.data.samples import sample_photos

    photos = sample_photos()
    return {name: photo_jpeg(photos[name], [1, 4, 12][i % 3])
            for i, name in enumerate(sorted(photos))}


# Measured on the 21 sample photos with the bundled default model at 512 px: worst cosine 0.9976
# at DRAFT_MARGIN 2 (0.9912 at 1); re-encoding the same photos at JPEG quality 85 instead of 90
# moves them by as much (worst 0.9968), so 0.995 is "no change a JPEG re-encode would not make".
DESCRIPTOR_COSINE_BOUND = 0.995


def test_descriptors_of_the_fast_decode_match_the_full_decode_on_real_photos():
    from remap_core.descriptor.checkpoint import load_model

    model = load_model(None, device="cpu")                   # what `remap embed` uses
    side, multiple = model.config["max_side"], model.config["multiple"]
    jpegs = _sample_jpegs()
    full = model.embed_arrays([image_for_model(d, side, multiple, draft=None).pixels
                               for d in jpegs.values()])
    fast = model.embed_arrays([image_for_model(d, side, multiple).pixels
                               for d in jpegs.values()])
    cosine = np.einsum("nd,nd->n", full.astype(np.float64), fast.astype(np.float64)) / (
        np.linalg.norm(full, axis=1) * np.linalg.norm(fast, axis=1))
    worst = dict(zip(jpegs, cosine.round(4)))
    assert cosine.min() > DESCRIPTOR_COSINE_BOUND, worst
    # and every fast descriptor still finds its own photo first among the full decodes
    assert (np.argmax(fast @ full.T, axis=1) == np.arange(len(jpegs))).all()


def test_file_over_the_byte_limit_is_refused_before_decoding():
    data = image_cases.jpeg(64, 48)
    with pytest.raises(ImageDecodeError) as e:
        image_for_model(data, 64, 32, max_bytes=len(data) - 1)
    assert e.value.reason == "too_large" and f"{len(data)} bytes" in e.value.message


def test_image_over_the_pixel_limit_is_refused_from_its_header():
    with pytest.raises(ImageDecodeError) as e:
        image_for_model(image_cases.jpeg(300, 200), 64, 32, max_pixels=300 * 200 - 1)
    assert e.value.reason == "too_large" and "60000 pixels" in e.value.message


def test_decode_past_its_time_limit_stops_with_a_timeout():
    data = image_cases.jpeg(3000, 2000, seed=9)
    with pytest.raises(ImageDecodeError) as e:
        image_for_model(data, 512, 32, draft=None, seconds=0.0)
    assert e.value.reason == "timeout" and "longer than 0 s" in e.value.message
    assert image_for_model(data, 512, 32, seconds=30.0).pixels.shape == (352, 512, 3)
