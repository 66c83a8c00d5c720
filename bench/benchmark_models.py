"""Benchmark: checkpoints (or model names) on the `remap eval` benchmark's eval split, embedded
as the product embeds, with and without re-ranking (alpha-QE, DBA), paired intervals against
the first model, overall and per nuisance. Lighter than `remap eval` (no baseline table, no KLW/whitening fitting).

    python bench/benchmark_models.py --cache ~/.cache/remap --model gem --model remap

With `--jpeg MIN MAX` every benchmark image is first upscaled to a seeded random size of MIN-MAX
megapixels and saved as a JPEG (quality 90), then decoded as the product decodes (`image_for_model`),
once per `--decode` variant: `draft` (the DCT-domain downscale the pipeline uses) and `full`
(decode in full, then resize). This measures what the fast decode does to retrieval:

    python bench/benchmark_models.py --model remap --jpeg 1 12 --decode full --decode draft

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scoring import paired_report, ranked_aps  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rerank", action="append", default=[], choices=["qe", "dba", "qe+dba"])
    ap.add_argument("--jpeg", type=float, nargs=2, metavar=("MIN_MP", "MAX_MP"),
                    help="embed real-sized JPEGs of the benchmark images (see above)")
    ap.add_argument("--decode", action="append", choices=["draft", "full"],
                    help="with --jpeg: decode variants to compare (default: draft)")
    ap.add_argument("--output")
    args = ap.parse_args(argv)

    from PIL import Image

    from remap_core.data.preprocess import DRAFT_MARGIN, image_for_model, resize_for_model
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.evaluation.benchmark import build_benchmark, default_cache_dir

    t0 = time.time()
    bench = build_benchmark("eval", cache_dir=args.cache or default_cache_dir(), seed=args.seed)
    q = bench.queries
    gnd = bench.ground_truth(q)
    nuis = np.asarray([bench.nuisance[i] for i in q])
    groups = bench.family[q]
    jpegs = None
    if args.jpeg:
        from decode_resize import photo_jpeg

        rng = np.random.default_rng(args.seed)
        jpegs = [photo_jpeg(Image.fromarray(im), float(rng.uniform(*args.jpeg)))
                 for im in bench.images]
    variants = [None] if jpegs is None else (args.decode or ["draft"])
    rows = {}
    for spec, variant in [(m, v) for m in args.model for v in variants]:
        path, _, side = spec.partition("@")
        model = load_model(path, device="cpu")
        if side:
            model.config["max_side"] = int(side)
        side, multiple = model.config["max_side"], model.config["multiple"]
        if jpegs is None:
            ims = [resize_for_model(Image.fromarray(im), side, multiple) for im in bench.images]
        else:
            margin = DRAFT_MARGIN if variant == "draft" else None
            ims = [image_for_model(j, side, multiple, draft=margin).pixels for j in jpegs]
        desc = model.embed_arrays(ims)
        label = spec if variant is None else f"{spec} [{variant} decode]"
        for rr in [()] + [tuple(r.split("+")) for r in args.rerank]:
            aps = ranked_aps(desc[q], desc, gnd, rr)
            rows[label + (" +" + "+".join(rr) if rr else "")] = (aps, model.fingerprint)
    ref = next(iter(rows))
    names = sorted(set(nuis.tolist()))
    print(f"{'model':40s}{'mAP':>7s}" + "".join(f"{n[:8]:>9s}" for n in names) + "   vs first [95% CI]")
    report = {}
    for name, (aps, fp) in rows.items():
        r = paired_report(aps, rows[ref][0], nuis, groups, names)
        per, d = r["per_nuisance"], r["minus_ref"]
        report[name] = {"map": r["map"], **per, "vs_first": d,
                        "vs_first_per_nuisance": r["minus_ref_per_nuisance"], "fingerprint": fp}
        print(f"{name[-40:]:40s}{r['map']:7.1f}" + "".join(f"{per[n]:9.1f}" for n in names)
              + f"   {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]")
    print(f"\nper nuisance against {ref} (paired over photos, 95% CI):")
    for name, r in report.items():
        if name != ref:
            print(f"{name[-40:]:40s}" + "".join(
                f"  {n[:8]} {v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]"
                for n, v in r["vs_first_per_nuisance"].items()))
    line = {"bench": "benchmark_models", "benchmark": bench.summary(), "seed": args.seed,
            "jpeg_megapixels": args.jpeg,
            "mean_jpeg_kb": None if jpegs is None else round(np.mean([len(j) for j in jpegs]) / 1024, 1),
            "results": report, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "load_avg_1m": round(os.getloadavg()[0], 2), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(line))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(line, f, indent=1)


if __name__ == "__main__":
    main()
