"""Hostile bytes, fuzzed: mutated JPEG, PNG, WebP, GIF and TIFF files go through the function
the pipeline's decode step calls (`prepare_source`: fetch from storage, decode, resize) and
each ends decoded (the model's input shape) or refused with a reason (a dead-letter row); none
crashes the worker, runs past the decode time limit, or takes memory past the pixel and byte
limits. A fixed budget runs in CI; `-m slow` runs a larger one.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.prepare import Failure, PreparedImage, prepare_source
from pipelines.uris import Source
from remap_core.data.preprocess import DECODE_SECONDS, MAX_PIXELS

# Pillow warns about the broken EXIF blocks and truncated reads it meets: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_SIDE, MULTIPLE = 64, 32
# every reason decode can give (preprocess.ImageDecodeError) and the one fetch gives for size
DECODE_REASONS = {"empty", "corrupt", "not_an_image", "too_large", "bad_size", "timeout"}
CI_EXAMPLES = 300         # per format: 1500 mutated files in all, about 10-20 s on 2 cores
SLOW_EXAMPLES = 5000      # per format, `-m slow` (random seed each run)
# Pixels past MAX_PIXELS are refused from the header; what the largest allowed image can take
# (RGBA decode + RGB copy + resize) stays under this much resident memory.
RSS_BOUND_MB = 2 * 1024


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(w: int = 48, h: int = 32, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * 1000 + h)
    arr = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").resize((w, h)).convert(mode)


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_picture(), "JPEG", quality=80, exif=exif)


def _animated_gif() -> bytes:
    frames = [_picture(40, 24).convert("P") for _ in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


# Valid seeds of each format, in the variants a crawl meets; mutations start from these.
SEEDS = {
    "jpeg": [lambda: _save(_picture(), "JPEG", quality=85),
             lambda: _save(_picture(), "JPEG", quality=70, progressive=True),
             _exif_jpeg,
             lambda: _save(_picture(mode="L"), "JPEG"),
             lambda: _save(_picture(mode="CMYK"), "JPEG")],
    "png": [lambda: _save(_picture(), "PNG"),
            lambda: _save(_picture(mode="RGBA"), "PNG"),
            lambda: _save(_picture(mode="P"), "PNG", transparency=0),
            lambda: _save(Image.fromarray(np.arange(48 * 32, dtype=np.uint16).reshape(32, 48)
                                          * 40, "I;16"), "PNG"),
            lambda: _save(_picture(mode="LA"), "PNG")],
    "webp": [lambda: _save(_picture(), "WEBP", quality=80),
             lambda: _save(_picture(), "WEBP", lossless=True),
             lambda: _save(_picture(mode="RGBA"), "WEBP")],
    "gif": [lambda: _save(_picture().convert("P"), "GIF"), _animated_gif],
    "tiff": [lambda: _save(_picture(), "TIFF"),
             lambda: _save(_picture(), "TIFF", compression="tiff_lzw"),
             lambda: _save(_picture(), "TIFF", compression="tiff_adobe_deflate"),
             lambda: _save(_picture(mode="RGBA"), "TIFF", compression="packbits"),
             lambda: _save(_picture(), "TIFF", compression="jpeg")],
}
_SEED_BYTES = {fmt: [make() for make in makers] for fmt, makers in SEEDS.items()}

# Length of each format's signature (SOI + first marker, PNG magic, RIFF....WEBPVP8, GIF89a, II*\0)
MAGIC_BYTES = {"jpeg": 4, "png": 8, "webp": 16, "gif": 6, "tiff": 4}
# Values that break size and length fields: zero, one, the sign bit, all ones.
_EVIL_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
              0xFFFFFFFF]


@st.composite
def mutated(draw, fmt: str) -> bytes:
    """A seed of `fmt` with 1-6 mutations: byte flips, truncation, insertion, deletion,
    duplication of a span, and 16/32-bit fields overwritten with extreme values. Positions
    favour the 64 bytes after the format's signature (width, height and the first chunk
    lengths live there) and spare the signature two times in three (else nearly every file
    would just be "not an image")."""
    data = bytearray(draw(st.sampled_from(_SEED_BYTES[fmt])))
    magic = MAGIC_BYTES[fmt]
    for _ in range(draw(st.integers(1, 6))):
        n = len(data)
        if n <= magic:
            break
        pos = draw(st.one_of(st.integers(magic, min(magic + 63, n - 1)),
                             st.integers(magic, n - 1), st.integers(0, n - 1)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate",
                                   "int16", "int32"]))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "duplicate":
            span = bytes(data[pos:pos + draw(st.integers(1, 256))])
            data[pos:pos] = span * draw(st.integers(1, 8))
        else:
            size = 2 if op == "int16" else 4
            value = draw(st.sampled_from(_EVIL_INTS)) & (0xFFFF if size == 2 else 0xFFFFFFFF)
            order = draw(st.sampled_from([">", "<"]))
            data[pos:pos + size] = struct.pack(order + ("H" if size == 2 else "I"), value)
    return bytes(data)


class _Check:
    """Runs one input through prepare_source from a real file and checks the outcome."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="remap-fuzz-")
        self.outcomes: dict[str, int] = {}

    def __call__(self, data: bytes, name: str):
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        t0 = time.monotonic()
        out = prepare_source(Source(path, len(data), "mtime=1"), MAX_SIDE, MULTIPLE)
        seconds = time.monotonic() - t0
        assert seconds < DECODE_SECONDS + 5, f"{name}: took {seconds:.1f} s"
        if isinstance(out, PreparedImage):
            h, w, c = out.pixels.shape
            assert out.pixels.dtype == np.uint8 and c == 3
            assert max(h, w) == MAX_SIDE and min(h, w) % MULTIPLE == 0
            assert 1 <= out.width * out.height <= MAX_PIXELS
            key = "decoded"
        else:
            assert isinstance(out, Failure), out
            assert out.stage == "decode" and out.error_type in DECODE_REASONS, (
                f"{name}: refused without a known reason: {out.error_type}: {out.message}")
            assert out.message and out.row("r")["message"]
            key = f"refused:{out.error_type}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


def _fuzz(fmt: str, examples: int, derandomize: bool) -> dict[str, int]:
    check = _Check()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(data=mutated(fmt))
    def run(data):
        check(data, f"fuzz.{fmt}")

    run()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert rss_after < rss_before + RSS_BOUND_MB, (rss_before, rss_after)
    return check.outcomes


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_mutated_files_are_decoded_or_refused_with_a_reason(fmt):
    outcomes = _fuzz(fmt, CI_EXAMPLES, derandomize=True)
    assert sum(outcomes.values()) >= CI_EXAMPLES            # every example was checked
    # the mutations reach both ends: some files still decode, some are refused
    assert outcomes.get("decoded", 0) > 0 and len(outcomes) > 1, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_mutated_files_are_decoded_or_refused_with_a_reason_large_budget(fmt):
    outcomes = _fuzz(fmt, SLOW_EXAMPLES, derandomize=False)
    assert sum(outcomes.values()) >= SLOW_EXAMPLES


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_every_seed_decodes(fmt):
    check = _Check()
    for i, data in enumerate(_SEED_BYTES[fmt]):
        check(data, f"seed{i}.{fmt}")
    assert check.outcomes == {"decoded": len(SEEDS[fmt])}


def _png_claiming(width: int, height: int) -> bytes:
    import zlib

    data = bytearray(_SEED_BYTES["png"][0])
    ihdr = bytearray(data[12:29])                      # "IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_SEED_BYTES["gif"][0])
    data[6:10] = struct.pack("<HH", width, height)    # logical screen
    desc = data.index(b"\x2c")                         # first image descriptor
    data[desc + 5:desc + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_SEED_BYTES["jpeg"][0])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _tiff_claiming(width: int, height: int) -> bytes:
    data = bytearray(_SEED_BYTES["tiff"][0])
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[entry:entry + 4])
        if tag in (256, 257):                          # ImageWidth, ImageLength
            value = width if tag == 256 else height
            data[entry + 2:entry + 12] = struct.pack("<HII", 4, 1, value)   # LONG, 1 value
    return bytes(data)


def _webp_claiming(width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    data = bytearray(_save(_picture(), "WEBP", exif=exif))   # with EXIF: an extended file
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


CLAIMING = {"png": _png_claiming, "gif": _gif_claiming, "jpeg": _jpeg_claiming,
            "tiff": _tiff_claiming, "webp": _webp_claiming}


@pytest.mark.parametrize("fmt", sorted(CLAIMING))
def test_header_claiming_more_pixels_than_the_limit_is_refused_without_decoding(fmt):
    """A small file whose header declares 10000 x 10000 (100 Mpx, past MAX_PIXELS): refused as
    too_large, fast, without the 300 MB of pixels being allocated."""
    data = CLAIMING[fmt](10_000, 10_000)
    assert len(data) < 10_000
    check = _Check()
    t0 = time.monotonic()
    check(data, f"claims_100mpx.{fmt}")
    assert time.monotonic() - t0 < 2.0
    assert list(check.outcomes) in (["refused:too_large"], ["refused:corrupt"]), check.outcomes
    if fmt != "webp":   # libwebp itself refuses a canvas its frame does not fill
        assert check.outcomes == {"refused:too_large": 1}
