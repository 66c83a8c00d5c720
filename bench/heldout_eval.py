"""Benchmark: instance retrieval on photos and a view generator that training never uses.

`remap eval` scores view families drawn by `remap_core/data/views.py`, the same generator
`remap train` learns from. This script draws its own families with a *second* generator, written
here and used nowhere else, with harder and different nuisances (clutter and occlusion made of
real photos instead of synthetic shapes, stronger crops and warps, colour and noise changes, and
chains of them), on any folder of photos. It is how a model is checked for what it learned: the
invariances, or one view generator.

    python bench/heldout_eval.py --photos 'photos/**/*.jpg' --backgrounds 'bg/*.webp' \
        --model gem --model path/to/model.pt --model path/to/model.pt@512 --rerank qe --rerank dba
    python bench/heldout_eval.py --standard ~/.cache/remap --views 1 --model remap --model gem \
        --rerank qe --rerank qe+dba --cache desc/

--standard CACHE: the collection bench/RESULTS.md reports (the benchmark's eval photos and
Debian's tuxpaint photo stamps, gnome-backgrounds), fetched into CACHE once with apt-get.

--model: a checkpoint path or a model name ("gem": the Lite0 GeM baseline at 512 px, the
former default; "remap": the shipped default model); "@N" sets the network input's long side. Every view is a query; the rest of its
family (the original and its other views) are the positives; the query itself is junk; every
other image, and the background photos themselves, are distractors. revisitop mAP per nuisance;
intervals: 95 % paired bootstrap over photos against the first model. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_output import run_facts, write_json  # noqa: E402
from scoring import paired_report, ranked_aps  # noqa: E402

NUISANCES = ("illumination", "scale", "perspective", "occlusion", "clutter", "combined")


# --------------------------------------------------------------------------- the second generator

def _rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def _bg_crop(backgrounds, size, rng):
    """A random crop of a random background photo, resized to `size`."""
    bg = backgrounds[rng.randint(len(backgrounds))]
    w, h = bg.size
    f = rng.uniform(0.4, 1.0)
    cw, ch = max(8, int(w * f)), max(8, int(h * f))
    x0, y0 = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
    return bg.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BILINEAR)


def illumination(img, rng, backgrounds):
    img = _rgb(img)
    x = np.asarray(img, np.float64) / 255.0
    x = x ** np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
    x = x * rng.uniform(0.5, 1.5) * rng.uniform(0.7, 1.3, 3)
    x = x + rng.normal(0, rng.uniform(0, 0.03), x.shape)
    out = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.2, 1.7))
    if rng.rand() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.randint(25, 90)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def scale(img, rng, backgrounds):
    img = _rgb(img)
    w, h = img.size
    f = rng.uniform(0.25, 0.6)
    cw, ch = max(16, int(w * f * rng.uniform(0.85, 1.15))), max(16, int(h * f * rng.uniform(0.85, 1.15)))
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
    s = rng.uniform(0.5, 1.0) * max(w, h) / max(cw, ch)
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((max(16, int(cw * s)), max(16, int(ch * s))),
                                                       Image.Resampling.LANCZOS)


def perspective(img, rng, backgrounds):
    from remap_core.data.views import homography_coefficients

    img = _rgb(img)
    w, h = img.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    moved = corners + rng.uniform(-0.25, 0.25, (4, 2)) * [w, h]
    t = np.deg2rad(rng.uniform(-25, 25))
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.array([w / 2, h / 2])
    moved = (moved - c) @ rot.T + c
    lo, hi = moved.min(0), moved.max(0)
    moved = (moved - (lo + hi) / 2) * min(1.0, w / (hi[0] - lo[0]), h / (hi[1] - lo[1])) + c
    warped = img.convert("RGBA").transform((w, h), Image.Transform.PERSPECTIVE,
                                           homography_coefficients(corners, moved),
                                           Image.Resampling.BILINEAR)
    out = _bg_crop(backgrounds, (w, h), rng)
    out.paste(warped, (0, 0), warped)
    return out


def occlusion(img, rng, backgrounds):
    img = _rgb(img).copy()
    w, h = img.size
    n = rng.randint(1, 5)
    total = rng.uniform(0.25, 0.5) * w * h
    for _ in range(n):
        a = np.exp(rng.uniform(np.log(0.4), np.log(2.5)))
        ow = int(min(w, max(8, np.sqrt(total / n * a))))
        oh = int(min(h, max(8, total / n / ow)))
        img.paste(_bg_crop(backgrounds, (ow, oh), rng),
                  (rng.randint(0, w - ow + 1), rng.randint(0, h - oh + 1)))
    return img


CLUTTER_SCALE = (0.25, 0.5)     # the pasted photo's side, as a fraction of the view's


def clutter(img, rng, backgrounds, clutter_scale=CLUTTER_SCALE):
    img = _rgb(img)
    w, h = img.size
    out = _bg_crop(backgrounds, (w, h), rng)
    s = rng.uniform(*clutter_scale)
    sw, sh = max(8, int(w * s)), max(8, int(h * s))
    out.paste(img.resize((sw, sh), Image.Resampling.LANCZOS),
              (rng.randint(0, w - sw + 1), rng.randint(0, h - sh + 1)))
    return out


SINGLE = {"illumination": illumination, "scale": scale, "perspective": perspective,
          "occlusion": occlusion, "clutter": clutter}


def combined(img, rng, backgrounds, single=SINGLE):
    names = list(single)
    for i in rng.permutation(len(names))[:rng.randint(2, 4)]:
        img = single[names[i]](img, rng, backgrounds)
    return img


def generators(clutter_scale=CLUTTER_SCALE):
    """The view generator of each nuisance (SINGLE and combined), clutter views (also inside
    combined views) pasting the photo at `clutter_scale` of the view's side."""
    single = dict(SINGLE, clutter=functools.partial(clutter, clutter_scale=clutter_scale))
    return dict(single, combined=functools.partial(combined, single=single))


# --------------------------------------------------------------------------- the collection

def _fit(img, side):
    img = _rgb(img)
    s = side / max(img.size)
    return img.resize((max(16, round(img.width * s)), max(16, round(img.height * s))),
                      Image.Resampling.LANCZOS) if s < 1 else img


def read_photos(patterns, min_side, side):
    photos = {}
    for pat in patterns:
        for f in sorted(glob.glob(pat, recursive=True)):
            try:
                im = Image.open(f)
                if im.mode in ("RGBA", "LA", "P"):
                    im = im.convert("RGBA")
                    flat = Image.new("RGB", im.size, (255, 255, 255))
                    flat.paste(im, (0, 0), im)
                    im = flat
                if min(im.size) < min_side:
                    continue
                photos[f] = _fit(im, side)
            except OSError as e:
                print(f"skipping {f}: {e}", file=sys.stderr)
    return photos


# The standard collection (bench/RESULTS.md, "A second view generator"): the benchmark's eval-split
# photos and Debian's tuxpaint photo stamps as families, gnome-backgrounds as backgrounds. Keys
# and order are those of the files the earlier runs globbed (evalsplit/<name>.png, tp/<stamp>),
# so the families and their seeded views are the same as theirs on the same packages.
BACKGROUND_PACKAGE, BACKGROUND_ROOT = "gnome-backgrounds", "./usr/share/backgrounds/gnome"


def standard_collection(cache_dir, min_side=300, side=768):
    """-> (photos {key: RGB image}, backgrounds [RGB image]) of the standard collection, fetched
    into `cache_dir` once (`apt-get download`, as `remap train` fetches its photos)."""
    from remap_core.evaluation.benchmark import (CATEGORY_PACKAGE, CATEGORY_ROOT,
                                                 benchmark_photos, fetch_debian_package)

    roots = [fetch_debian_package(cache_dir, pkg, (root,))       # stamps: the category benchmark's
             for pkg, root in ((CATEGORY_PACKAGE, CATEGORY_ROOT),
                               (BACKGROUND_PACKAGE, BACKGROUND_ROOT))]
    if None in roots:
        raise SystemExit("--standard needs Debian's tuxpaint-stamps-default and gnome-backgrounds "
                         "(apt-get download); pass --photos and --backgrounds instead")
    stamps = os.path.join(roots[0], CATEGORY_ROOT)
    gnome = os.path.join(roots[1], BACKGROUND_ROOT)
    photos = {}
    for name, img in benchmark_photos("eval", cache_dir, max_side=1 << 30).items():
        if min(img.size) >= min_side:
            photos["evalsplit/" + name.replace("/", "_") + ".png"] = _fit(img, side)
    for key, img in read_photos([os.path.join(stamps, "**", "*.png")], min_side, side).items():
        photos["tp/" + os.path.relpath(key, stamps)] = img
    backgrounds = list(read_photos([os.path.join(gnome, "*.webp"), os.path.join(gnome, "*.jpg")],
                                   64, side).values())
    return photos, backgrounds


def collection_given(standard, photo_globs, background_globs) -> bool:
    """Whether a script's arguments name one whole collection: the standard one and no globs, or
    both globs."""
    return not (photo_globs or background_globs) if standard else bool(photo_globs and
                                                                          background_globs)


def read_collection(standard_cache, photo_globs, background_globs, min_side, side):
    """-> (photos, backgrounds): the standard collection fetched into `standard_cache`, or else
    the photos and backgrounds the globs find."""
    if standard_cache:
        return standard_collection(standard_cache, side=side)
    return (read_photos(photo_globs, min_side, side),
            list(read_photos(background_globs, 64, side).values()))


def build_collection(photos, backgrounds, views, seed, clutter_scale=CLUTTER_SCALE,
                     views_of=None):
    """-> images, family id per image (-1: distractor), nuisance per image (None: original).
    `clutter_scale`: the range of the pasted photo's side in clutter views (also inside
    combined views), as a fraction of the view's side. `views_of`: {nuisance: generator}
    instead of this script's own (`generators(clutter_scale)`), in the order to draw them."""
    views_of = generators(clutter_scale) if views_of is None else views_of
    images, family, kind = [], [], []
    for fi, (name, img) in enumerate(sorted(photos.items())):
        images.append(img), family.append(fi), kind.append(None)
        for ni, nuisance in enumerate(views_of):
            for k in range(views):
                rng = np.random.RandomState((seed * 1_000_003 + fi * 101 + ni * 7 + k) % 2**31)
                images.append(views_of[nuisance](img, rng, backgrounds))
                family.append(fi), kind.append(nuisance)
    for bg in backgrounds:
        images.append(bg), family.append(-1), kind.append(None)
    return images, np.asarray(family), kind


def collection_digest(images):
    """A short hash of the collection's pixels: descriptor caches are keyed by it, so another
    collection of the same size never reads this one's descriptors."""
    h = hashlib.sha1()
    for im in images:
        a = np.ascontiguousarray(np.asarray(im))
        h.update(repr(a.shape).encode()), h.update(a.tobytes())
    return h.hexdigest()[:12]


def half_mask(query_family, half):
    """Which queries belong to `half` of the photos: "even" or "odd" family number, or "all"."""
    query_family = np.asarray(query_family)
    if half == "all":
        return np.ones(len(query_family), bool)
    return query_family % 2 == (0 if half == "even" else 1)


def ground_truth(family, kind):
    queries = [i for i, k in enumerate(kind) if k is not None]
    gnd = [{"ok": np.flatnonzero((family == family[q]) & (np.arange(len(family)) != q)),
            "junk": [q]} for q in queries]
    return queries, gnd


# --------------------------------------------------------------------------- models and scoring

def load(spec):
    from remap_core.descriptor.checkpoint import load_model

    path, _, side = spec.partition("@")
    model = load_model(path, device="cpu")       # a checkpoint, or a name: "gem", "remap", ...
    if side:
        model.config["max_side"] = int(side)
    return model


def embed(model, images, batch_size=16):
    from remap_core.data.preprocess import resize_for_model

    arrays = [resize_for_model(im, model.config["max_side"], model.config["multiple"])
              for im in images]
    return model.embed_arrays(arrays, batch_size)


def cached_embed(model, images, cache_dir=None, digest=None):
    """`embed`, read from (or saved to) `cache_dir` when given: one file per model fingerprint,
    input side and collection digest (`collection_digest(images)`)."""
    if not cache_dir:
        return embed(model, images)
    path = os.path.join(cache_dir, f"{model.fingerprint}.{model.config['max_side']}.{digest}.npy")
    if os.path.exists(path):
        return np.load(path)
    desc = embed(model, images)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, desc)
    return desc


def score(desc, family, kind, rerank=()):
    """Average precision of every query of the collection, searching all of it."""
    queries, gnd = ground_truth(family, kind)
    return ranked_aps(desc[queries], desc, gnd, rerank)


def score_models(specs, reranks, images, family, kind, cache_dir=None, digest=None):
    """-> {row name: {"aps", "fingerprint", "seconds"}}: each model of `specs` (see `load`)
    embeds the collection (read from `cache_dir` when there) and is scored plain and with each
    re-ranking of `reranks` ("qe", "dba", "qe+dba"), as row "<spec>" and "<spec> +<rerank>"."""
    rows = {}
    for spec in specs:
        t = time.time()
        model = load(spec)
        desc = cached_embed(model, images, cache_dir, digest)
        for v in [()] + [tuple(r.split("+")) for r in reranks]:
            rows[spec + ("" if not v else " +" + "+".join(v))] = {
                "aps": score(desc, family, kind, v), "fingerprint": model.fingerprint,
                "seconds": round(time.time() - t, 1)}
        print(f"{spec}: {time.time() - t:.0f} s", file=sys.stderr)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", action="append", help="glob of family photos")
    ap.add_argument("--backgrounds", action="append",
                    help="glob of background photos (clutter, occluders, warp fill, distractors)")
    ap.add_argument("--standard", metavar="CACHE",
                    help="the collection of bench/RESULTS.md instead of --photos/--backgrounds: "
                         "the benchmark's eval photos and tuxpaint photo stamps (min side 300), "
                         "gnome-backgrounds; fetched into CACHE once (--min-side does not apply)")
    ap.add_argument("--min-side", type=int, default=256)
    ap.add_argument("--side", type=int, default=768, help="long side of the stored photos")
    ap.add_argument("--views", type=int, default=2, help="views per nuisance and photo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clutter-scale", type=float, nargs=2, default=CLUTTER_SCALE,
                    metavar=("LO", "HI"),
                    help="side of the photo pasted into a clutter view, as a fraction of the "
                         "view's (default 0.25 0.5; smaller: harder)")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rerank", action="append", default=[], choices=["qe", "dba", "qe+dba"])
    ap.add_argument("--output")
    ap.add_argument("--cache", help="folder for descriptors, keyed by model and collection")
    ap.add_argument("--half", choices=("all", "even", "odd"), default="all",
                    help="score only the queries of the photos with an even (odd) family number "
                         "(the database is unchanged): a choice made on one half is checked on "
                         "the other")
    args = ap.parse_args(argv)
    if not collection_given(args.standard, args.photos, args.backgrounds):
        ap.error("give --standard CACHE, or both --photos and --backgrounds")

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    photos, backgrounds = read_collection(args.standard, args.photos, args.backgrounds,
                                          args.min_side, args.side)
    images, family, kind = build_collection(photos, backgrounds, args.views, args.seed,
                                            tuple(args.clutter_scale))
    digest = collection_digest(images) if args.cache else None
    queries, _ = ground_truth(family, kind)
    keep = half_mask(family[queries], args.half)
    qkind = np.asarray([kind[q] for q in queries])[keep]
    groups = family[queries][keep]
    print(f"{len(photos)} photos, {len(backgrounds)} backgrounds, {len(images)} images, "
          f"{len(queries)} queries ({time.time() - t0:.0f} s)", file=sys.stderr)

    rows = score_models(args.model, args.rerank, images, family, kind, args.cache, digest)
    for r in rows.values():
        r["aps"] = r["aps"][keep]

    ref = next(iter(rows))
    header = f"{'model':44s}" + "".join(f"{n[:8]:>9s}" for n in ("overall",) + NUISANCES) + \
        "   overall - ref [95% CI]"
    print(header)
    report = {}
    for name, r in rows.items():
        p = paired_report(r["aps"], rows[ref]["aps"], qkind, groups, NUISANCES)
        per, (d, lo, hi) = p["per_nuisance"], p["minus_ref"]
        report[name] = {"overall": p["map"], **per, "vs_ref": p["minus_ref"],
                        "vs_ref_per_nuisance": p["minus_ref_per_nuisance"],
                        "fingerprint": r["fingerprint"]}
        print(f"{name[-44:]:44s}{p['map']:9.1f}" + "".join(f"{per[n]:9.1f}" for n in NUISANCES) +
              f"   {d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    line = {"bench": "heldout_eval", "photos": len(photos), "backgrounds": len(backgrounds),
            "images": len(images), "queries": int(keep.sum()), "half": args.half,
            "views": args.views, "clutter_scale": list(args.clutter_scale),
            "seed": args.seed, "reference": ref, "results": report,
            **run_facts(t0)}
    print(json.dumps(line))
    if args.output:
        write_json(args.output, line)


if __name__ == "__main__":
    main()
