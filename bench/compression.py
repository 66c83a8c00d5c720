"""Benchmark: retrieval mAP after the index builder's compression against float descriptors.

    python bench/compression.py --cache ~/.cache/remap --output bench/compression.json
    python bench/compression.py --model runs/remap/model.pt --cache ~/.cache/remap
    python bench/compression.py --cache /tmp/c --max-photos 4 --train-vectors 600 --nlist 8  # smoke

The model's descriptors (`--model`, default `load_model(None)`: the shipped default) of the
benchmark's eval split, embedded exactly as `remap eval --model` scores a checkpoint
(`evaluate.score_checkpoints`: `resize_for_model` to the model's own input size, then
`embed_arrays`), are the database; every view is a query (revisitop protocol, `evaluate.score`).
Each index is built the way `remap index` builds one (`index_builder.train.train_index` on a
training sample, then `add_with_ids`), every database vector is ranked by the index's own scores
(search with k = database size, IVF probing every list, so only the codes matter), and the
rankings are scored like `remap eval`'s, with a paired bootstrap interval against float (Flat).

Codes: PQ{m}x8, OPQ{m}_{d'},PQ{m}x8 (d' = `index_builder.train.opq_dim`, what `remap index
--opq` puts in front), IVF{nlist},PQ{m}x8 and OPQ{m}_{d'},IVF{nlist},PQ{m}x8, at m = 16, 32, 64
and 128 bytes per image (those m that divide the dimension; 8 more bytes of id per image in IVF
lists are not counted).

Codebooks are trained on vectors that are never evaluated: the benchmark's *train* split (its
photos and their views, as `remap eval` builds it) plus views of the train-split photos and of
the training-only photos (`benchmark.training_only_photos`, as `remap train --benchmark-views`
uses them), drawn with the training view generator (`training_sets.compound_view`: one or two
nuisances chained, crops included) until there are `--train-vectors` of them (default 39 x 256:
FAISS's minimum for a 256-centroid k-means without a warning, one per PQ sub-quantizer).

`--rerank qe+dba` measures what `remap index` and `remap search` do by default: the database
and the codebooks' training vectors are DBA'd (each vector averaged with its 2 nearest others,
`rerank.database_augmentation`) before the codes are trained and added, and every query is
expanded by alpha-QE over its top 2 results as the index decodes them (`merge.
search_and_reconstruct`), then searched again. Float is then Flat with the same re-ranking.

Prints a table and one JSON line ({"bench": "compression", ...}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

# OpenMP threads that wait passively: FAISS's OPQ training (thousands of small k-means) runs ~50x
# slower with spinning waits when the cores are shared (0.6 s against 30 s for 5 OPQ16
# iterations on 600 x 1280 vectors at load 7 on 2 cores). Must be set before FAISS/torch load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE_BYTES = (16, 32, 64, 128)
GOAL_FRACTION = 0.95   # of float mAP
GOAL_BYTES = 64
TRAIN_VECTORS = 39 * 256


# --------------------------------------------------------------------------- ranking by an index

def probe_every_list(index) -> None:
    """An IVF index (also behind OPQ) probes all its lists, so that only the codes rank."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = ivf.nlist


def rank_with_index(index, queries: np.ndarray, n_database: int) -> np.ndarray:
    """Rank a whole database by an index's own scores: queries (Q, D) float32 -> (Q, N) the
    database ids (as added: 0..N-1), best first, ties broken by id (as
    `metrics.rank_by_similarity`). An IVF index probes every list (its nprobe is set to nlist),
    so the ranking depends only on the codes."""
    import faiss

    probe_every_list(index)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), n_database)
    if (ids < 0).any():
        raise RuntimeError(f"the index returned {int((ids >= 0).sum(1).min())} of {n_database} "
                           f"database vectors for a query; it cannot rank the whole database")
    sign = -1.0 if index.metric_type == faiss.METRIC_INNER_PRODUCT else 1.0
    order = np.lexsort((ids, sign * scores), axis=1)
    return np.take_along_axis(ids, order, axis=1)


def expand_queries(index, queries: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """alpha-QE as `remap search` does it: the top `k` results of a first search (IVF probing
    every list), with the vectors the index decodes for them."""
    from index_builder.merge import search_and_reconstruct
    from index_builder.rerank import alpha_query_expansion

    probe_every_list(index)
    scores, ids, vecs = search_and_reconstruct(index, np.ascontiguousarray(queries, np.float32), k)
    return alpha_query_expansion(queries, vecs, np.where(ids == -1, np.nan, scores), k, alpha)


def build_index(factory: str, train: np.ndarray, database: np.ndarray):
    """What `remap index` builds: `train_index(factory, train)`, then the database added with
    ids 0..N-1."""
    from index_builder.train import train_index

    index = train_index(factory, train)
    index.add_with_ids(np.ascontiguousarray(database, dtype=np.float32),
                       np.arange(len(database), dtype=np.int64))
    return index


def factories(dim: int, m: int, nlist: int) -> dict[str, str]:
    """The compressed indexes at m bytes per image: {kind: factory string}."""
    from index_builder.train import opq_dim

    opq = f"OPQ{m}_{opq_dim(dim, m)}"
    return {"PQ": f"PQ{m}x8", "OPQ+PQ": f"{opq},PQ{m}x8",
            "IVF-PQ": f"IVF{nlist},PQ{m}x8", "OPQ+IVF-PQ": f"{opq},IVF{nlist},PQ{m}x8"}


# --------------------------------------------------------------------------- data

def embed(model, images: list[np.ndarray], desc: str) -> np.ndarray:
    """`model.embed_arrays` in blocks with a progress bar: uint8 (H, W, 3) arrays -> (N, D)."""
    from tqdm import tqdm

    out = np.zeros((len(images), model.dim), np.float32)
    block = 128
    with tqdm(total=len(images), desc=desc, unit="img", leave=False) as bar:
        for s in range(0, len(images), block):
            out[s:s + block] = model.embed_arrays(images[s:s + block])
            bar.update(len(images[s:s + block]))
    return out


def photo_view_seed(seed: int, name: str) -> int:
    """Seed of one training photo's views: its own stream, never a benchmark view seed."""
    return int.from_bytes(hashlib.sha1(f"compression/{seed}/{name}".encode()).digest()[:4],
                          "little")


def training_vectors(model, args, eval_photos: list[str]) -> tuple[np.ndarray, dict]:
    """Descriptors (T, D) of the training vectors (see the module docstring) and what they are."""
    from PIL import Image
    from tqdm import tqdm

    from remap_core.data.preprocess import resize_for_model
    from remap_core.data.training_sets import compound_view, view_families
    from remap_core.evaluation.benchmark import (benchmark_photos, build_benchmark,
                                                 training_only_photos)

    max_side, multiple = int(model.config["max_side"]), int(model.config["multiple"])
    bench = build_benchmark("train", args.cache, views_per_nuisance=args.views_per_nuisance,
                            seed=args.seed, side=args.side, debian=not args.no_debian,
                            max_photos=args.max_photos)
    photos = benchmark_photos("train", args.cache, debian=not args.no_debian,
                              max_side=args.side, max_photos=args.max_photos)
    extra = {}
    if not (args.no_extra_photos or args.no_debian):
        extra = training_only_photos(args.cache, args.side)
        extra = dict(list(extra.items())[:args.max_photos]) if args.max_photos else extra
    photos.update(extra)
    overlap = (set(photos) | set(bench.photos)) & set(eval_photos)
    if overlap:
        raise RuntimeError(f"training photos {sorted(overlap)} are eval photos; the split is "
                           f"broken")
    parts = [embed(model, [resize_for_model(Image.fromarray(im), max_side, multiple)
                           for im in bench.images], "train split")]
    views = max(0, math.ceil((args.train_vectors - len(bench.images)) / len(photos)))
    for name in tqdm(sorted(photos) if views else [], desc="training views", unit="photo"):
        fam = view_families({name: photos[name]}, views, photo_view_seed(args.seed, name),
                            compound_view, max_side, multiple, include_original=False)
        parts.append(model.embed_arrays(fam.images))
    x = np.concatenate(parts)
    about = {"vectors": int(len(x)), "train_split": bench.summary(),
             "train_split_photos": len(bench.photos), "training_only_photos": len(extra),
             "views_per_photo": views,
             "what": f"benchmark train split ({bench.summary()}) + {views} compound views "
                     f"(training_sets.compound_view) of each of {len(photos)} photos "
                     f"({len(photos) - len(extra)} train split, {len(extra)} training-only)"}
    return x, about


def cached(path: str | None, key: dict, make):
    """`make()` -> (array, info), kept as <path>/<sha1 of key>.npz when `path` is given."""
    if not path:
        return make()
    file = os.path.join(path, hashlib.sha1(json.dumps(key, sort_keys=True).encode())
                        .hexdigest()[:16] + ".npz")
    if os.path.exists(file):
        with np.load(file) as z:
            return z["x"], json.loads(str(z["info"]))
    x, info = make()
    os.makedirs(path, exist_ok=True)
    np.savez(file + ".tmp.npz", x=x, info=json.dumps(info))
    os.replace(file + ".tmp.npz", file)
    return x, info


# --------------------------------------------------------------------------- the run

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="remap checkpoint (path or URL; default: the shipped default model)")
    ap.add_argument("--cache", default=None,
                    help="benchmark photo cache, as `remap eval --cache` (default $REMAP_CACHE "
                         "or ~/.cache/remap)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the benchmark's views (as remap eval) and of the training views")
    ap.add_argument("--output", default=None, help="write the report (JSON) here")
    ap.add_argument("--views-per-nuisance", type=int, default=2)
    ap.add_argument("--side", type=int, default=384, help="long side of the benchmark images")
    ap.add_argument("--max-photos", type=int, default=None,
                    help="at most this many photos per split (smoke tests)")
    ap.add_argument("--no-debian", action="store_true",
                    help="only the scikit-image/scikit-learn photos")
    ap.add_argument("--no-extra-photos", action="store_true",
                    help="train codebooks without the training-only photos")
    ap.add_argument("--train-vectors", type=int, default=TRAIN_VECTORS,
                    help=f"training vectors for the codebooks (default {TRAIN_VECTORS} = 39 x 256)")
    ap.add_argument("--nlist", type=int, default=32, help="IVF lists (all are probed)")
    ap.add_argument("--code-bytes", default=",".join(map(str, CODE_BYTES)),
                    help="bytes per image (PQ sub-quantizers), comma-separated")
    ap.add_argument("--rerank", choices=("none", "qe+dba"), default="none",
                    help="qe+dba: DBA'd database and training vectors, alpha-QE queries "
                         "(the index and search defaults); none: the descriptors as embedded")
    ap.add_argument("--descriptor-cache", default=None,
                    help="keep the descriptors here, keyed by model and data (reruns skip "
                         "embedding)")
    args = ap.parse_args(argv)

    import faiss
    import torch

    from PIL import Image

    from index_builder.build import DEFAULT_DBA, DEFAULT_QE, DEFAULT_QE_ALPHA
    from index_builder.train import MIN_POINTS_PER_CENTROID, PQ_CENTROIDS, quantization_error
    from remap_core.data.preprocess import resize_for_model
    from remap_core.descriptor.checkpoint import load_model
    from remap_core.evaluation.benchmark import build_benchmark, default_cache_dir
    from remap_core.evaluation.evaluate import paired_difference, score

    t0 = time.time()
    args.cache = args.cache or default_cache_dir()
    model = load_model(args.model)
    dim = int(model.dim)
    sizes = [int(s) for s in args.code_bytes.split(",") if s.strip()]
    skipped = [m for m in sizes if dim % m]
    sizes = [m for m in sizes if dim % m == 0 and m < dim]
    bench = build_benchmark("eval", args.cache, views_per_nuisance=args.views_per_nuisance,
                            seed=args.seed, side=args.side, debian=not args.no_debian,
                            max_photos=args.max_photos)
    print(f"model {model.fingerprint} ({dim}-D); eval split: {bench.summary()}", file=sys.stderr)
    key = {"model": model.fingerprint, "seed": args.seed, "vpn": args.views_per_nuisance,
           "side": args.side, "max_photos": args.max_photos, "debian": not args.no_debian,
           "photos": bench.photos}
    max_side, multiple = int(model.config["max_side"]), int(model.config["multiple"])
    t1 = time.time()
    db, _ = cached(args.descriptor_cache, {**key, "what": "eval"}, lambda: (embed(
        model, [resize_for_model(Image.fromarray(im), max_side, multiple) for im in bench.images],
        "eval split"), {}))
    train, train_info = cached(args.descriptor_cache,
                               {**key, "what": "train", "n": args.train_vectors,
                                "extra": not args.no_extra_photos},
                               lambda: training_vectors(model, args, bench.photos))
    t_embed = time.time() - t1
    print(f"training vectors: {train_info['what']}: {len(train)}", file=sys.stderr)
    if len(train) < PQ_CENTROIDS:
        raise SystemExit(f"{len(train)} training vectors cannot train {PQ_CENTROIDS}-centroid PQ "
                         f"codebooks; raise --train-vectors")
    nlist = args.nlist
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > len(train):
        nlist //= 2
    if nlist != args.nlist:
        print(f"--nlist {args.nlist} lowered to {nlist}: {len(train)} training vectors give "
              f"{MIN_POINTS_PER_CENTROID} per list at most", file=sys.stderr)

    queries = db[bench.queries]
    if args.rerank == "qe+dba":
        from index_builder.rerank import database_augmentation

        db = database_augmentation(db, DEFAULT_DBA, DEFAULT_QE_ALPHA)
        train = database_augmentation(train, DEFAULT_DBA, DEFAULT_QE_ALPHA)
    rows: dict[str, dict] = {}

    def measure(name: str, kind: str, factory: str, code_bytes: int) -> None:
        t = time.time()
        index = build_index(factory, train, db)
        t_train = time.time() - t
        q = queries if args.rerank == "none" else expand_queries(index, queries, DEFAULT_QE,
                                                                 DEFAULT_QE_ALPHA)
        ranks = rank_with_index(index, q, len(db))
        r = score(None, bench, ranks=ranks)
        r.update(kind=kind, factory=factory, bytes=code_bytes,
                 reconstruction_error=quantization_error(index, db).get("reconstruction", 0.0),
                 seconds=round(time.time() - t, 1), train_seconds=round(t_train, 1))
        rows[name] = r
        print(f"{name}: mAP {100 * r['mAP']:.1f} ({r['seconds']} s)", file=sys.stderr)

    t2 = time.time()
    measure("float", "Flat", "Flat", 4 * dim)
    numpy_map = score(db, bench)["mAP"] if args.rerank == "none" else None
    for m in sizes:
        for kind, factory in factories(dim, m, nlist).items():
            measure(f"{kind} {m} B", kind, factory, m)
    t_index = time.time() - t2

    ref = rows["float"]
    for r in rows.values():
        r["vs float"] = paired_difference(r, ref, bench)
        r["fraction_of_float"] = r["mAP"] / ref["mAP"] if ref["mAP"] > 0 else float("nan")
    goal = {}
    for kind in ("PQ", "OPQ+PQ", "IVF-PQ", "OPQ+IVF-PQ"):
        ok = [r["bytes"] for r in rows.values()
              if r["kind"] == kind and r["fraction_of_float"] >= GOAL_FRACTION]
        goal[kind] = {"smallest_bytes_reaching_goal": min(ok) if ok else None,
                      f"goal_met_at_{GOAL_BYTES}B": GOAL_BYTES in ok}

    print(format_table(rows, goal))
    report = {
        "bench": "compression", "model": args.model or "default (load_model(None))",
        "fingerprint": model.fingerprint, "dim": dim, "nlist": nlist, "nprobe": nlist,
        "rerank": args.rerank,
        "eval": bench.summary(), "eval_photos": bench.photos, "training": train_info,
        "code_bytes": sizes, "code_bytes_skipped_not_dividing_dim": skipped,
        "goal": f"mAP >= {GOAL_FRACTION:.0%} of float at {GOAL_BYTES} B", "goal_by_kind": goal,
        "float_mAP_numpy_ranking": numpy_map,
        "results": {n: {k: v for k, v in r.items() if k != "aps"} for n, r in rows.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"faiss {faiss.__version__}, cuda={'yes' if torch.cuda.is_available() else 'no'}",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "seconds": {"embed": round(t_embed, 1), "indexes": round(t_index, 1),
                    "total": round(time.time() - t0, 1)},
        "command": "python bench/compression.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
    }
    print(json.dumps(report))
    if args.output:
        from remap_store.files import write_json_atomic

        write_json_atomic(args.output, report)
    return report


def format_table(rows: dict, goal: dict) -> str:
    nuisances = list(next(iter(rows.values()))["per_nuisance"])
    short = {"illumination": "illum", "scale_crop": "scale", "perspective": "persp",
             "occlusion": "occl", "clutter": "clutter"}
    width = max(len(n) for n in rows) + 2
    head = (f"{'index':<{width}}{'bytes':>6}" + "".join(f"{short.get(n, n[:7]):>9}"
                                                       for n in nuisances)
            + f"{'mAP':>9}{'/float':>8}   mAP - float [95% CI]   factory")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        c = r["vs float"]
        lines.append(f"{name:<{width}}{r['bytes']:>6}"
                     + "".join(f"{100 * r['per_nuisance'][n]:>9.1f}" for n in nuisances)
                     + f"{100 * r['mAP']:>9.1f}{100 * r['fraction_of_float']:>7.1f}%"
                     + f"   {100 * c['dmAP']:+5.1f} [{100 * c['ci95'][0]:+.1f}, "
                       f"{100 * c['ci95'][1]:+.1f}]   {r['factory']}")
    lines.append("")
    lines.append("mAP per nuisance and overall (revisitop), in %; /float: fraction of float mAP; "
                 "the interval resamples photos")
    for kind, g in goal.items():
        lines.append(f"{kind}: smallest code with >= {GOAL_FRACTION:.0%} of float mAP: "
                     f"{g['smallest_bytes_reaching_goal'] or 'none'}{' B' if g['smallest_bytes_reaching_goal'] else ''}; "
                     f"goal at {GOAL_BYTES} B {'met' if g[f'goal_met_at_{GOAL_BYTES}B'] else 'not met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
