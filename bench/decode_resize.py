"""Decode + resize cost per image at 1, 4 and 12 megapixels: the old full decode against the
new one at the size needed (JPEG DCT scaling through Pillow's `draft`, then `reduce` and the
bicubic resize), both through `remap_core.data.preprocess.image_for_model`, the path the
pipeline and the query library share. Prints one JSON line:

    python bench/decode_resize.py [--megapixels 1 4 12] [--repeat 20] [--model PATH] [--draft 2]

The JPEGs are real photos (scikit-image's and scikit-learn's samples) upscaled to each size and
saved at quality 90, 4:2:0 (what cameras write); `--max_side` defaults to the input size of the
product's default model (`remap embed` without --model) or of `--model`. Each figure is the
median of `--repeat` timed calls per photo, averaged over the photos; `max_abs_diff` and
`mean_abs_diff` compare the two paths' model inputs (grey levels, 0..255).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "china", "motorcycle_left", "rocket")


def photo_jpeg(photo: Image.Image, megapixels: float, quality: int = 90) -> bytes:
    """`photo` upscaled (bicubic, aspect kept) to about `megapixels` Mpx, as JPEG bytes."""
    scale = (megapixels * 1e6 / (photo.width * photo.height)) ** 0.5
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    buf = io.BytesIO()
    photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def model_input_size(model_uri: str | None) -> tuple[int, int]:
    """(max_side, multiple) of the model `remap embed --model model_uri` would use."""
    from remap_core.descriptor.checkpoint import load_model

    cfg = load_model(model_uri, device="cpu").config
    return int(cfg["max_side"]), int(cfg["multiple"])


def time_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--megapixels", type=float, nargs="+", default=[1, 4, 12])
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per photo and path")
    ap.add_argument("--photos", nargs="+", default=list(PHOTOS),
                    help="bundled sample photos to use (remap_core.data.samples)")
    ap.add_argument("--model", default=None,
                    help="checkpoint whose input size to decode for (default: the product's "
                         "default model)")
    ap.add_argument("--max_side", type=int, default=None,
                    help="model input long side (default: the model's)")
    ap.add_argument("--multiple", type=int, default=None)
    ap.add_argument("--draft", type=float, default=None,
                    help="draft margin: decode JPEGs at the smallest DCT scale covering this x "
                         "the input size (default: preprocess.DRAFT_MARGIN, what remap uses)")
    args = ap.parse_args(argv)

    from remap_core.data.preprocess import DRAFT_MARGIN, image_for_model
    from remap_core.data.samples import sample_photos

    args.draft = DRAFT_MARGIN if args.draft is None else args.draft
    max_side, multiple = args.max_side, args.multiple
    if max_side is None or multiple is None:
        m_side, m_mult = model_input_size(args.model)
        max_side, multiple = max_side or m_side, multiple or m_mult
    photos = sample_photos()
    missing = [p for p in args.photos if p not in photos]
    if missing:
        raise SystemExit(f"unknown sample photo(s) {missing}; known: {sorted(photos)}")
    rows = []
    for mp in args.megapixels:
        full_ms, fast_ms, diffs, sizes = [], [], [], []
        for name in args.photos:
            data = photo_jpeg(photos[name], mp)
            full = image_for_model(data, max_side, multiple, draft=None)
            fast = image_for_model(data, max_side, multiple, draft=args.draft)
            assert full.pixels.shape == fast.pixels.shape
            diffs.append(np.abs(full.pixels.astype(np.int16) - fast.pixels.astype(np.int16)))
            sizes.append((full.width, full.height, len(data)))
            full_ms.append(time_ms(lambda: image_for_model(data, max_side, multiple, draft=None),
                                   args.repeat))
            fast_ms.append(time_ms(lambda: image_for_model(data, max_side, multiple,
                                                           draft=args.draft), args.repeat))
        old, new = float(np.mean(full_ms)), float(np.mean(fast_ms))
        rows.append({"megapixels": mp,
                     "mean_size": [round(float(np.mean([s[0] for s in sizes]))),
                                   round(float(np.mean([s[1] for s in sizes])))],
                     "mean_jpeg_kb": round(float(np.mean([s[2] for s in sizes])) / 1024, 1),
                     "full_decode_ms": round(old, 2), "draft_decode_ms": round(new, 2),
                     "speedup": round(old / new, 2),
                     "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 3),
                     "max_abs_diff": int(max(d.max() for d in diffs))})
        print(f"{mp} MP: full {old:.1f} ms, draft {new:.1f} ms", file=sys.stderr, flush=True)
    result = {"bench": "decode_resize", "max_side": max_side, "multiple": multiple,
              "draft_margin": args.draft,
              "photos": args.photos, "repeat": args.repeat, "rows": rows,
              "pillow": Image.__version__, "cpu_count": os.cpu_count(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "python": platform.python_version(),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
