"""Benchmark: which test-time scales, for the queries and for the database, on the benchmark's
eval split and on the standard held-out proxy (`heldout_eval.py --standard`).

A model's multi-scale descriptor is the L2-normalised sum of its single-scale descriptors (each
whitened and L2-normalised: `RetrievalNet.forward_multiscale`). So each image is embedded once
per scale, and any set of scales is a sum of those: the model's own scales, a scale added, or
queries embedded at more scales than the database (a change to the query side only, with no
re-embedding). A variant is NAME=SCALES (queries and database) or NAME=QUERY_SCALES/DB_SCALES;
the first variant is each model's reference, and the first model is every variant's reference.

    python bench/inference_scales.py --cache ~/.cache/remap --model remap --model gem \
        --variant shipped=1,0.7071,0.5 --variant four=1.4142,1,0.7071,0.5 \
        --variant query-four=1.4142,1,0.7071,0.5/1,0.7071,0.5 --rerank qe+dba \
        --store /tmp/scales

Prints one JSON line per model, variant, re-ranking and collection, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_output import finish, run_facts  # noqa: E402
from scoring import paired_report, ranked_aps  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[float], list[float]]:
    """"NAME=S1,S2" or "NAME=Q1,Q2/D1,D2" -> (name, query scales, database scales)."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ValueError(f"variant {text!r}: write NAME=SCALES or NAME=QUERY_SCALES/DB_SCALES")
    q, _, d = spec.partition("/")
    scales = [[float(s) for s in part.split(",") if s] for part in (q, d or q)]
    if not scales[0] or not scales[1] or min(scales[0] + scales[1]) <= 0:
        raise ValueError(f"variant {text!r}: scales must be positive numbers")
    return name, scales[0], scales[1]


def per_scale(model, arrays, scales, store=None, digest=None) -> dict[float, np.ndarray]:
    """{scale: (N, D) single-scale descriptors}, read from (or saved to) `store` when given, one
    file per model fingerprint, input side, collection `digest` and scale."""
    out, own = {}, list(model.config["scales"])
    try:
        for s in sorted(set(scales), reverse=True):
            path = (os.path.join(store, f"{model.fingerprint}.{model.config['max_side']}"
                                        f".{digest}.s{s:.4f}.npy") if store else None)
            if path and os.path.exists(path):
                out[s] = np.load(path)
                continue
            model.config["scales"] = [s]
            out[s] = model.embed_arrays(arrays)
            if path:
                os.makedirs(store, exist_ok=True)
                np.save(path, out[s])
    finally:
        model.config["scales"] = own
    return out


def compose(descriptors: dict[float, np.ndarray], scales) -> np.ndarray:
    """The multi-scale descriptor over `scales` from single-scale ones: L2(sum)."""
    x = sum(descriptors[float(s)] for s in scales)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def collections(cache):
    """{name: (images as model input before resizing, query rows, ground truth, nuisance per
    query, photo per query, digest)} for the benchmark's eval split and the held-out proxy."""
    from PIL import Image

    import heldout_eval as H
    from remap_core.evaluation.benchmark import build_benchmark

    bench = build_benchmark("eval", cache, seed=0)
    b_images = [Image.fromarray(im) for im in bench.images]
    q = bench.queries
    photos, bgs = H.read_collection(cache, None, None, 300, 768)
    h_images, family, kind = H.build_collection(photos, bgs, 1, 0)
    hq, hgnd = H.ground_truth(family, kind)
    return {"benchmark": (b_images, q, bench.ground_truth(q),
                          np.asarray([bench.nuisance[i] for i in q]), bench.family[q],
                          H.collection_digest(bench.images)),
            "heldout": (h_images, hq, hgnd, np.asarray([kind[i] for i in hq]), family[hq],
                        H.collection_digest(h_images))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="benchmark cache folder (the held-out proxy's "
                                                  "packages are fetched into it once)")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--variant", action="append", required=True, type=parse_variant,
                    help="NAME=SCALES or NAME=QUERY_SCALES/DB_SCALES; the first is the reference")
    ap.add_argument("--rerank", action="append", default=[], choices=["qe", "dba", "qe+dba"])
    ap.add_argument("--store", help="folder for single-scale descriptors (reruns reuse them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", help="also write the JSON lines here")
    args = ap.parse_args(argv)

    import torch

    import heldout_eval as H
    from remap_core.data.preprocess import resize_for_model
    from remap_core.evaluation.benchmark import default_cache_dir

    torch.set_num_threads(args.threads)
    t0 = time.time()
    sets = collections(args.cache or default_cache_dir())
    scales = sorted({s for _, q, d in args.variant for s in q + d}, reverse=True)
    reranks = [()] + [tuple(r.split("+")) for r in args.rerank]
    lines, aps = [], {}
    for spec in args.model:
        model = H.load(spec).float().eval()
        side, multiple = model.config["max_side"], model.config["multiple"]
        for set_name, (images, rows, gnd, nuisance, groups, digest) in sets.items():
            arrays = [resize_for_model(im, side, multiple) for im in images]
            desc = per_scale(model, arrays, scales, args.store, digest)
            for rr in reranks:
                for name, q_scales, db_scales in args.variant:
                    aps[spec, set_name, rr, name] = ranked_aps(compose(desc, q_scales)[rows],
                                                               compose(desc, db_scales), gnd, rr)
                    mine = aps[spec, set_name, rr, name]
                    first = paired_report(mine, aps[args.model[0], set_name, rr, name],
                                          nuisance, groups)
                    line = {"model": spec, "fingerprint": model.fingerprint,
                            "collection": set_name, "rerank": "+".join(rr) or "none",
                            "variant": name, "query_scales": q_scales, "db_scales": db_scales,
                            **paired_report(mine,
                                            aps[spec, set_name, rr, args.variant[0][0]],
                                            nuisance, groups),
                            "minus_first_model": first["minus_ref"],
                            "minus_first_model_per_nuisance": first["minus_ref_per_nuisance"]}
                    print(json.dumps(line), flush=True)
                    lines.append(line)
    summary = {"bench": "inference_scales", "models": args.model,
               "variants": [v[0] for v in args.variant],
               "collections": {k: len(v[0]) for k, v in sets.items()}, **run_facts(t0)}
    finish(summary, lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
