"""Benchmark: retrieval under many kinds of lighting change, one column each.

`bench/heldout_eval.py` draws one illumination view per photo from a single mix (gamma, exposure,
colour cast, saturation, blur, JPEG). A descriptor can pass that mix and still fail one kind of
light a user meets: an under-exposed phone photo, a blown-out one, haze, a tungsten cast, a hard
shadow across the object, a spotlight, a night shot, a black-and-white scan. This script draws one
view of each kind per photo (the kinds are modelled in linear light and written only here), on
the held-out photos of `bench/heldout_eval.py`, and scores each kind as its own column, so a
model's weak kind of light shows instead of averaging away.

    python bench/illumination_sweep.py --standard ~/.cache/remap --model gem --model remap \
        --rerank qe+dba --cache desc/ --output bench/illumination_sweep.json

--with-nuisances also draws `bench/heldout_eval.py`'s six nuisance views (the same views, from
its seeds) into every family, so that a view under each kind of light must also find its family's
crops, warps, occluded and cluttered views, as in a collection with every nuisance; those six
get columns too.

Every view is a query; the rest of its family (the original and its other views) are the
positives; every other image and the background photos are distractors. revisitop mAP per kind
of light; intervals: 95 % paired bootstrap over photos against the first model. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import heldout_eval as H  # noqa: E402
from bench_output import run_facts, write_json  # noqa: E402
from scoring import paired_report  # noqa: E402


# --------------------------------------------------------------------------- kinds of light
# Each: (RGB image, RandomState, backgrounds) -> RGB image of the same size. Light is changed in
# linear light (sRGB decoded with gamma 2.2), then encoded again and saved as a JPEG, as a camera
# would.

def _linear(img):
    return (np.asarray(H._rgb(img), np.float64) / 255.0) ** 2.2


def _encode(lin, rng, quality=(70, 95), noise=0.0):
    x = np.clip(lin, 0, 1) ** (1 / 2.2)
    if noise:
        x = x + rng.normal(0, noise, x.shape)
    out = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.randint(*quality)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _grid(img):
    h, w = img.size[1], img.size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    return xx / max(1, w - 1), yy / max(1, h - 1)


def dark(img, rng, backgrounds):
    """Under-exposed by 2-4 stops, with sensor noise."""
    lin = _linear(img) * 2.0 ** -rng.uniform(2, 4)
    return _encode(lin, rng, noise=rng.uniform(0.01, 0.03))


def bright(img, rng, backgrounds):
    """Over-exposed by 1-2 stops: highlights blow out to white."""
    return _encode(_linear(img) * 2.0 ** rng.uniform(1, 2), rng)


def haze(img, rng, backgrounds):
    """Low contrast: 40-65 % of a light veil of one colour over the image."""
    a = rng.uniform(0.4, 0.65)
    veil = rng.uniform(0.55, 0.9) * rng.uniform(0.9, 1.1, 3)
    return _encode((1 - a) * _linear(img) + a * veil, rng)


def colour_cast(img, rng, backgrounds):
    """White balance off: a warm (tungsten) or cool (shade) cast with a green-magenta tint."""
    t = rng.choice([-1, 1]) * rng.uniform(0.4, 0.8)
    gains = np.array([1 + t, 1 + rng.uniform(-0.2, 0.2), 1 - t])
    gains = gains / gains.max() * rng.uniform(0.8, 1.1)
    return _encode(_linear(img) * gains, rng)


def shadow(img, rng, backgrounds):
    """A hard-edged shadow (a half plane at a random angle, 30-70 % of the image) at 15-40 % of
    the light, its edge a little soft."""
    x, y = _grid(img)
    t = rng.uniform(0, 2 * np.pi)
    d = (x - 0.5) * np.cos(t) + (y - 0.5) * np.sin(t)
    cut = np.quantile(d, rng.uniform(0.3, 0.7))
    inside = 1 / (1 + np.exp(-(d - cut) / 0.01))
    gain = 1 - inside * (1 - rng.uniform(0.15, 0.4))
    return _encode(_linear(img) * gain[..., None], rng)


def spotlight(img, rng, backgrounds):
    """Light falling off from a random point: 15-40 % of it at the far side."""
    x, y = _grid(img)
    cx, cy, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.5)
    lo = rng.uniform(0.15, 0.4)
    gain = lo + (1 - lo) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return _encode(_linear(img) * (gain / gain.max() * 1.3)[..., None], rng)


def night(img, rng, backgrounds):
    """A night shot under sodium light: 3-5 stops down, orange, noisy, soft, strongly compressed."""
    lin = _linear(img) * 2.0 ** -rng.uniform(3, 5) * np.array([1.0, 0.7, 0.35])
    out = _encode(lin * 4.0, rng, quality=(35, 70), noise=rng.uniform(0.03, 0.06))
    return out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))


def monochrome(img, rng, backgrounds):
    """Black and white, with its contrast changed by a gamma of 0.7-1.4."""
    g = np.asarray(H._rgb(img).convert("L"), np.float64) / 255.0
    g = g ** rng.uniform(0.7, 1.4)
    return _encode(np.repeat(g[..., None], 3, 2) ** 2.2, rng)


KINDS = {"dark": dark, "bright": bright, "haze": haze, "colour_cast": colour_cast,
         "shadow": shadow, "spotlight": spotlight, "night": night, "monochrome": monochrome,
         "heldout_mix": H.illumination}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", action="append", help="glob of family photos")
    ap.add_argument("--backgrounds", action="append", help="glob of distractor photos")
    ap.add_argument("--standard", metavar="CACHE",
                    help="bench/heldout_eval.py's standard collection, fetched into CACHE once")
    ap.add_argument("--min-side", type=int, default=256)
    ap.add_argument("--side", type=int, default=768, help="long side of the stored photos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", required=True,
                    help="a checkpoint or model name, as for bench/heldout_eval.py; the first is "
                         "the reference of the intervals")
    ap.add_argument("--rerank", action="append", default=[], choices=["qe", "dba", "qe+dba"])
    ap.add_argument("--with-nuisances", action="store_true",
                    help="also draw bench/heldout_eval.py's six nuisance views in every family "
                         "(first, with that script's seeds), so that a view under each kind of "
                         "light must also find the family's cropped, warped, occluded and "
                         "cluttered views, as in a collection with every nuisance")
    ap.add_argument("--cache", help="folder for descriptors, keyed by model and collection")
    ap.add_argument("--output")
    args = ap.parse_args(argv)
    if not H.collection_given(args.standard, args.photos, args.backgrounds):
        ap.error("give --standard CACHE, or both --photos and --backgrounds")

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    photos, backgrounds = H.read_collection(args.standard, args.photos, args.backgrounds,
                                            args.min_side, args.side)
    views_of = dict(H.generators(), **KINDS) if args.with_nuisances else KINDS
    names = tuple(views_of)
    images, family, kind = H.build_collection(photos, backgrounds, 1, args.seed,
                                              views_of=views_of)
    digest = H.collection_digest(images) if args.cache else None
    queries, _ = H.ground_truth(family, kind)
    qkind = np.asarray([kind[q] for q in queries])
    groups = family[queries]
    print(f"{len(photos)} photos, {len(backgrounds)} backgrounds, {len(images)} images, "
          f"{len(queries)} queries, collection {digest} ({time.time() - t0:.0f} s)",
          file=sys.stderr)

    rows = H.score_models(args.model, args.rerank, images, family, kind, args.cache, digest)

    ref = next(iter(rows))
    print(f"{'model':40s}" + "".join(f"{n[:8]:>9s}" for n in ("overall",) + names))
    report = {}
    for name, r in rows.items():
        p = paired_report(r["aps"], rows[ref]["aps"], qkind, groups, names)
        report[name] = {"overall": p["map"], **p["per_nuisance"], "vs_ref": p["minus_ref"],
                        "vs_ref_per_kind": p["minus_ref_per_nuisance"],
                        "fingerprint": r["fingerprint"]}
        print(f"{name[-40:]:40s}{p['map']:9.1f}" +
              "".join(f"{p['per_nuisance'][n]:9.1f}" for n in names))
        if name != ref:
            d, lo, hi = p["minus_ref"]
            print(f"{'  minus ' + ref[-32:]:40s}{d:+9.1f}" + "".join(
                f"{p['minus_ref_per_nuisance'][n][0]:+9.1f}" for n in names) +
                f"   overall [{lo:+.1f}, {hi:+.1f}]")
    line = {"bench": "illumination_sweep", "photos": len(photos), "backgrounds": len(backgrounds),
            "images": len(images), "queries": len(queries), "collection": digest,
            "seed": args.seed, "kinds": list(names), "with_nuisances": args.with_nuisances,
            "reference": ref, "results": report,
            **run_facts(t0)}
    print(json.dumps(line))
    if args.output:
        write_json(args.output, line)


if __name__ == "__main__":
    main()
