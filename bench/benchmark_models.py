"""Benchmark: checkpoints (or model names) on the `remap eval` benchmark's eval split, embedded
as the product embeds, with and without re-ranking (alpha-QE, DBA), paired intervals against
the first model. Lighter than `remap eval` (no baseline table, no KLW/whitening fitting).

    python bench/benchmark_models.py --cache ~/.cache/remap --model gem --model remap

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--rerank", action="append", default=[], choices=["qe", "dba", "qe+dba"])
    ap.add_argument("--output")
    args = ap.parse_args(argv)

    from PIL import Image

    from index_builder.rerank import reranked_similarities
    from remap_core.data.preprocess import resize_for_model
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.evaluation.benchmark import build_benchmark, default_cache_dir
    from remap_core.evaluation.metrics import compute_map, paired_bootstrap

    t0 = time.time()
    bench = build_benchmark("eval", cache_dir=args.cache or default_cache_dir(), seed=args.seed)
    q = bench.queries
    gnd = bench.ground_truth(q)
    nuis = np.asarray([bench.nuisance[i] for i in q])
    groups = bench.family[q]
    rows = {}
    for spec in args.model:
        path, _, side = spec.partition("@")
        model = load_model(path, device="cpu")
        if side:
            model.config["max_side"] = int(side)
        ims = [resize_for_model(Image.fromarray(im), model.config["max_side"],
                                model.config["multiple"]) for im in bench.images]
        desc = model.embed_arrays(ims)
        for rr in [()] + [tuple(r.split("+")) for r in args.rerank]:
            sims = reranked_similarities(desc[q], desc, qe=2 if "qe" in rr else 0,
                                         dba=2 if "dba" in rr else 0)
            _, aps, _, _ = compute_map(np.argsort(-sims, axis=1, kind="stable"), gnd)
            rows[spec + (" +" + "+".join(rr) if rr else "")] = (aps, model.fingerprint)
    ref = next(iter(rows))
    names = sorted(set(nuis.tolist()))
    print(f"{'model':40s}{'mAP':>7s}" + "".join(f"{n[:8]:>9s}" for n in names) + "   vs first [95% CI]")
    report = {}
    for name, (aps, fp) in rows.items():
        d = paired_bootstrap(aps, rows[ref][0], groups)
        per = {n: round(float(np.nanmean(aps[nuis == n])) * 100, 1) for n in names}
        report[name] = {"map": round(float(np.nanmean(aps)) * 100, 1), **per,
                        "vs_first": [round(x * 100, 1) for x in d], "fingerprint": fp}
        print(f"{name[-40:]:40s}{report[name]['map']:7.1f}" + "".join(f"{per[n]:9.1f}" for n in names)
              + f"   {d[0] * 100:+.1f} [{d[1] * 100:+.1f}, {d[2] * 100:+.1f}]")
    line = {"bench": "benchmark_models", "benchmark": bench.summary(), "seed": args.seed,
            "results": report, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "load_avg_1m": round(os.getloadavg()[0], 2), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(line))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(line, f, indent=1)


if __name__ == "__main__":
    main()
