"""Benchmark: what REMAP's region aggregation and its whitening do, on a trained REMAP model,
without training again: the whole-map region's weight (`klw.weigh_whole_map`) and the whitening
(as trained, or refitted on the training views after training, as `remap train` now finishes).

The backbone runs once per image and scale; every variant re-aggregates the stored region
vectors in numpy, fits its whitening on the training views (`remap train --benchmark-views`'s
1,488 images, as `remap train` fits it), and is scored on the benchmark's eval split and on the
held-out proxy of `heldout_eval.py` (its second view generator on photos training never sees),
whose photos are split in two halves (even and odd family number): a choice made on one half is
checked on the other.

    python bench/region_aggregation.py --cache ~/.cache/remap --model remap-lite0-v1 \
        --photos 'evalsplit/*.png' --photos 'tuxpaint/**/*.png' --min-side 300 \
        --backgrounds 'gnome/*.webp' --backgrounds 'gnome/*.jpg' --weights 1 10 100 1000
    python bench/region_aggregation.py --cache ~/.cache/remap --standard --weights 1 10 100

Prints one JSON line per variant and a summary line.
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

from bench_output import finish  # noqa: E402


def gem_region_pool(p: float):
    """A stand-in for `pooling.region_max_pool` that pools every region (and the whole map) by
    generalised mean with exponent p instead of max (p -> infinity is max)."""
    from remap_core.descriptor import pooling

    def pool(x, levels=3, include_global=False):
        return pooling.region_pool(x, levels, include_global, lambda r: pooling.gem(r, p))

    return pool


def region_vectors(model, arrays, batch_size=16, gem_p=None):
    """Per scale, image and tapped layer: the head's L2-normalised region vectors (R, C) and
    their canonical region index (`REMAPHead.region_vectors`); `gem_p`: regions pooled by
    generalised mean instead of max. -> (regions, index) object arrays (S, N, L)."""
    import torch

    from remap_core.descriptor import pooling
    from remap_core.descriptor.batching import shape_batches
    from remap_core.descriptor.pooling import resize_batch

    if gem_p is not None:
        max_pool, pooling.region_max_pool = pooling.region_max_pool, gem_region_pool(gem_p)
        try:
            return region_vectors(model, arrays, batch_size)
        finally:
            pooling.region_max_pool = max_pool

    scales = model.config["scales"]
    n_layers = model.head.n_layers
    regs = np.empty((len(scales), len(arrays), n_layers), object)
    idx = np.empty((len(scales), len(arrays), n_layers), object)
    with torch.inference_mode():
        for chunk in shape_batches(arrays, batch_size):
            x = torch.from_numpy(np.stack([arrays[i] for i in chunk])).permute(0, 3, 1, 2).float()
            for si, s in enumerate(scales):
                feats = model.features(resize_batch(x, s))
                for li, (r, ci) in enumerate(model.head.region_vectors(feats)):
                    for k, i in enumerate(chunk):
                        regs[si, i, li] = r[k].numpy()
                        idx[si, i, li] = np.asarray(ci)
    return regs, idx


def _l2(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def aggregate(regs, idx, weights):
    """REMAP's aggregation of stored region vectors with KLW `weights` (L, R): L2 per region
    (already so from the head; kept so that raw max-pooled vectors work too), weighted sum,
    layers concatenated. -> (S, N, sum C)."""
    s_n, n, n_layers = regs.shape
    out = []
    for s in range(s_n):
        rows = [np.concatenate([(weights[l, idx[s, i, l]][:, None] * _l2(regs[s, i, l])).sum(0)
                                for l in range(n_layers)]) for i in range(n)]
        out.append(np.stack(rows).astype(np.float32))
    return np.stack(out)


def describe(pooled, mean, projection):
    """Whitening and L2 per scale (`whiten.apply_whitening`), sum over scales, L2 (as
    `forward_multiscale`)."""
    from remap_core.fitting.whiten import apply_whitening

    return _l2(sum(apply_whitening(p, mean, projection) for p in pooled))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="remap-lite0-v1",
                    help="a trained REMAP checkpoint before the final step (default: the former "
                         "default, which is one)")
    ap.add_argument("--cache", default=None, help="benchmark cache folder")
    ap.add_argument("--photos", action="append", help="held-out photos (glob)")
    ap.add_argument("--backgrounds", action="append", help="held-out background photos (glob)")
    ap.add_argument("--standard", action="store_true",
                    help="instead of --photos/--backgrounds: heldout_eval.py --standard's "
                         "collection, fetched into the --cache folder")
    ap.add_argument("--min-side", type=int, default=300)
    ap.add_argument("--weights", type=float, nargs="+", default=[1, 3, 10, 30, 100, 1000],
                    help="whole-map weights to try, x the grid regions' mean")
    ap.add_argument("--gem-p", type=float, default=None,
                    help="pool the regions by generalised mean with this exponent instead of max "
                         "(a departure from REMAP, measured against it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", help="also write the JSON lines here")
    args = ap.parse_args(argv)
    import heldout_eval as H

    if not H.collection_given(args.standard, args.photos, args.backgrounds):
        ap.error("give --standard, or both --photos and --backgrounds")

    import torch
    from PIL import Image

    from remap_core.data.preprocess import resize_for_model
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.evaluation.benchmark import build_benchmark, default_cache_dir
    from remap_core.evaluation.evaluate import score
    from remap_core.fitting.klw import weigh_whole_map
    from remap_core.fitting.whiten import fit_whitening
    from remap_core.training.run import TrainRun, load_training_set

    torch.set_num_threads(args.threads)
    t0 = time.time()
    cache = args.cache or default_cache_dir()
    model = load_model(args.model, device="cpu").float().eval()
    if model.config["head"] != "remap":
        raise SystemExit(f"{args.model} has a {model.config['head']!r} head; this needs REMAP")
    side, multiple = int(model.config["max_side"]), int(model.config["multiple"])
    bench = build_benchmark("eval", cache, seed=0)
    photos, bgs = H.read_collection(cache if args.standard else None, args.photos,
                                    args.backgrounds, args.min_side, 768)
    h_images, family, kind = H.build_collection(photos, bgs, 1, 0)
    train_set, _ = load_training_set(TrainRun(out="", benchmark_views=True, cache=cache,
                                              quiet=True), 320, multiple)
    sets = {"bench": [resize_for_model(Image.fromarray(im), side, multiple) for im in bench.images],
            "heldout": [resize_for_model(im, side, multiple) for im in h_images],
            "train": train_set.images}
    stored = {}
    for name, arrays in sets.items():
        t = time.time()
        stored[name] = region_vectors(model, arrays, gem_p=args.gem_p)
        print(f"{name}: {len(arrays)} images in {time.time() - t:.0f}s", file=sys.stderr)
    queries = [i for i, k in enumerate(kind) if k is not None]
    q_kind, q_family = np.array([kind[i] for i in queries]), family[queries]
    trained = model.head.region_weights.detach().numpy().astype(np.float64)
    w_model = model.whiten.weight.detach().numpy().astype(np.float64)
    mean_model = np.linalg.lstsq(w_model, -model.whiten.bias.detach().numpy(), rcond=None)[0]

    variants = [("as trained", None, "model"), ("as trained", None, "pca")]
    variants += [(f"whole map x{w:g}", w, "pca") for w in args.weights]
    lines = []
    for name, factor, whitening in variants:
        weights = trained if factor is None else weigh_whole_map(trained, factor)
        pooled = {k: aggregate(*v, weights) for k, v in stored.items()}
        if whitening == "model":
            mean, proj = mean_model, w_model
        else:
            mean, proj = fit_whitening(list(pooled["train"]), "pca", w_model.shape[0])
        rb = score(describe(pooled["bench"], mean, proj), bench)
        aps = H.score(describe(pooled["heldout"], mean, proj), family, kind)
        line = {"variant": name, "whole_map_weight": factor, "whitening": whitening,
                "region_pooling": "max" if args.gem_p is None else f"gem p={args.gem_p:g}",
                "bench_map": round(100 * rb["mAP"], 2),
                "bench": {k: round(100 * v, 2) for k, v in rb["per_nuisance"].items()},
                "heldout_map": round(100 * float(aps.mean()), 2),
                **{f"heldout_{h}": round(100 * float(aps[H.half_mask(q_family, h)].mean()), 2)
                   for h in ("even", "odd")},
                "heldout": {n: round(100 * float(aps[q_kind == n].mean()), 2) for n in H.NUISANCES}}
        print(json.dumps(line), flush=True)
        lines.append(line)
    summary = {"bench": "region_aggregation", "model": args.model,
               "fingerprint": model.fingerprint, "heldout_photos": len(photos),
               "heldout_images": len(h_images), "train_images": len(train_set.images),
               "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads "
                          f"{args.threads}",
               "load_avg_1m": round(os.getloadavg()[0], 2),
               "seconds": round(time.time() - t0, 1)}
    finish(summary, lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
