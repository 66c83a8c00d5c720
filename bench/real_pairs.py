"""Benchmark: real image pairs (OpenCV's graf, leuven, box/box_in_scene, aero, aloe; see
`remap_core.evaluation.real_pairs`), every model embedded as the product embeds (its own input
size), the partner's rank for each query and mAP, paired intervals against the first model.

    python bench/real_pairs.py --cache ~/.cache/remap --model remap --model gem

The database is both sides of every pair and, as distractors, OpenCV's unpaired photos, the
benchmark's photos of both splits (`benchmark_photos("all")`, unless --no-benchmark-photos;
the pairs' own scenes and OpenCV's photos, already there, left out) and any `--distractors GLOB` files. Besides ranks it reports the
gap (the partner's similarity minus the best other image's, in standard deviations of the
query's similarities), which still separates models when every partner is first. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_output import run_facts, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--model", action="append", required=True,
                    help="checkpoint path, shipped or baseline name; NAME@SIDE sets the input size")
    ap.add_argument("--no-benchmark-photos", action="store_true",
                    help="no benchmark photos among the distractors")
    ap.add_argument("--distractors", action="append", default=[], metavar="GLOB",
                    help="image files to add as distractors (repeatable)")
    ap.add_argument("--output")
    args = ap.parse_args(argv)

    from remap_core.data.preprocess import resize_for_model
    from remap_core.descriptor.checkpoint import load_model
    import glob

    from PIL import Image

    from remap_core.evaluation.benchmark import benchmark_photos, default_cache_dir
    from remap_core.evaluation.metrics import paired_bootstrap
    from remap_core.evaluation.real_pairs import DISTRACTORS, REAL_PAIRS, load_real_pairs, score_real_pairs

    t0 = time.time()
    cache = args.cache or default_cache_dir()
    # the pairs' scenes are never distractors; OpenCV's unpaired photos are already in the set
    skip = {os.path.splitext(f)[0] for a, b, _ in REAL_PAIRS for f in (a, b)} | \
        {os.path.splitext(f)[0] for f in DISTRACTORS}
    extra = {} if args.no_benchmark_photos else {
        n: im for n, im in benchmark_photos("all", cache, max_side=1024).items()
        if not (n.startswith("debian/opencv-doc/") and n.rsplit("/", 1)[-1] in skip)}
    for pattern in args.distractors:
        for path in sorted(glob.glob(pattern, recursive=True)):
            extra[path] = Image.open(path).convert("RGB")
    pairs = load_real_pairs(cache, extra)
    if pairs is None:
        sys.exit("could not fetch the Debian package opencv-doc (apt-get download opencv-doc)")
    results = {}
    for spec in args.model:
        path, _, side = spec.partition("@")
        model = load_model(path, device="cpu")
        if side:
            model.config["max_side"] = int(side)
        ims = [resize_for_model(im, model.config["max_side"], model.config["multiple"])
               for im in pairs.images]
        res = score_real_pairs(model.embed_arrays(ims), pairs)
        res["fingerprint"] = model.fingerprint
        results[spec] = res
    first = next(iter(results.values()))
    queries = [f"{r['query']}->{r['partner']}" for r in first["queries"]]
    groups = np.repeat(np.arange(len(pairs.pairs)), 2)       # a pair's two queries together
    print(f"database: {len(pairs.images)} images, {len(pairs.pairs)} pairs "
          f"({sum(pairs.seen_in_training)} of them a benchmark train-split scene)")
    print(f"{'query -> partner':36s}" + "".join(f"{s[-14:]:>15s}" for s in results))
    for k, q in enumerate(queries):
        seen = " *" if first["queries"][k]["seen_in_training"] else ""
        print(f"{(q + seen)[:36]:36s}" + "".join(
            f"{r['queries'][k]['rank']:8d} {r['queries'][k]['gap']:+6.2f}" for r in results.values()))
    print(f"{'mAP (1/rank)':36s}" + "".join(f"{r['map'] * 100:15.1f}" for r in results.values()))
    print(f"{'mean gap':36s}" + "".join(f"{r['mean_gap']:15.2f}" for r in results.values()))
    print(f"{'mAP, unseen scenes':36s}" + "".join(f"{r['map_unseen'] * 100:15.1f}"
                                                  for r in results.values()))
    print("* the scene is a benchmark train-split photo (generated views of it were trained on)")
    ref = np.array([r["ap"] for r in first["queries"]])
    for spec, res in results.items():
        aps = np.array([r["ap"] for r in res["queries"]])
        d = paired_bootstrap(aps, ref, groups)
        g = paired_bootstrap(np.array([r["gap"] for r in res["queries"]]),
                             np.array([r["gap"] for r in first["queries"]]), groups)
        res["vs_first"] = [round(x * 100, 1) for x in d]
        res["gap_vs_first"] = [round(x, 3) for x in g]
        print(f"{spec}: mAP {res['map'] * 100:.1f}, recall@1 {res['recall_at_1']:.2f}, "
              f"vs first {d[0] * 100:+.1f} [{d[1] * 100:+.1f}, {d[2] * 100:+.1f}]; mean gap "
              f"{res['mean_gap']:.2f}, vs first {g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]")
    line = {"bench": "real_pairs", "images": len(pairs.images), "pairs": len(pairs.pairs),
            "results": {s: {"map": round(r["map"] * 100, 1),
                            "map_unseen": round(r["map_unseen"] * 100, 1),
                            "recall_at_1": round(r["recall_at_1"], 3),
                            "mean_gap": round(r["mean_gap"], 3),
                            "ranks": {q: x["rank"] for q, x in zip(queries, r["queries"])},
                            "gaps": {q: round(x["gap"], 3) for q, x in zip(queries, r["queries"])},
                            "vs_first": r["vs_first"], "gap_vs_first": r["gap_vs_first"],
                            "fingerprint": r["fingerprint"]}
                        for s, r in results.items()},
            **run_facts(t0)}
    print(json.dumps(line))
    if args.output:
        write_json(args.output, line)


if __name__ == "__main__":
    main()
