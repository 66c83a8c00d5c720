"""Benchmark: drawing the index's training sample from a stream of embedding batches
(`index_builder.train.sample_part`, what `remap index` and each `remap index-beam` worker run)
against the way it was drawn before session 14, in the same process.

Before, every batch was appended to the rows kept so far, so each batch copied up to 2 x the
sample into a new array (at 10M x 256 with 819,200 training points, ~150 arrays of up to 1.7 GB).
Now the rows go into one buffer allocated once and cut in place. Both must keep the same rows.

    python bench/sampling.py --n 3000000 --dim 256 --size 819200
    python bench/sampling.py --n 200000 --dim 64 --size 20000      # a quick check

Prints one JSON line per repeat and a summary line (ratio = before / now; the stream's own
cost, drawing the vectors, is timed alone once and is in both; ratio_less_generation takes it
out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_output import finish, run_facts  # noqa: E402


def sample_part_before(batches, size, seed=0):
    """`sample_part` as it was before session 14: each batch concatenated onto the kept rows,
    cut to `size` when more than 2 x size are kept."""
    from index_builder.train import _smallest, sample_keys

    keys, ids, X = np.zeros(0), np.zeros(0, np.int64), None
    for bid, bx in batches:
        bid = np.asarray(bid, np.int64)
        keys, ids = np.concatenate([keys, sample_keys(bid, seed)]), np.concatenate([ids, bid])
        X = bx.astype(np.float32) if X is None else np.concatenate([X, bx.astype(np.float32)])
        if len(keys) > 2 * size:
            keys, ids, X = _smallest(keys, ids, X, size)
    return _smallest(keys, ids, X, size)


def stream(n, dim, batch_rows, seed=0):
    """n rows in batches of `batch_rows`: ids 0..n-1, vectors drawn afresh for each batch (as
    a Parquet reader hands out new arrays)."""
    rng = np.random.default_rng(seed)
    for i in range(0, n, batch_rows):
        ids = np.arange(i, min(n, i + batch_rows), dtype=np.int64)
        yield ids, rng.standard_normal((len(ids), dim), dtype=np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--size", type=int, default=819_200,
                    help="sample size (819,200: 50 points per list for IVF16384, the 10M build's)")
    ap.add_argument("--batch-rows", type=int, default=65_536, help="as `remap index` reads shards")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output")
    args = ap.parse_args(argv)
    from index_builder.train import sample_part

    t0 = time.time()
    t = time.time()
    for _ in stream(args.n, args.dim, args.batch_rows):
        pass
    gen_s = time.time() - t
    lines = []
    for r in range(args.repeats):
        res = {}
        for name, fn in (("before", sample_part_before), ("now", sample_part)):
            t = time.time()
            part = fn(stream(args.n, args.dim, args.batch_rows), args.size)
            res[name] = (time.time() - t, part)
        same = np.array_equal(res["before"][1].ids, res["now"][1].ids) and \
            np.array_equal(res["before"][1].X, res["now"][1].X)
        line = {"repeat": r, "before_s": round(res["before"][0], 2),
                "now_s": round(res["now"][0], 2),
                "ratio": round(res["before"][0] / res["now"][0], 2),
                "ratio_less_generation": round((res["before"][0] - gen_s) /
                                               max(res["now"][0] - gen_s, 1e-3), 2),
                "same_sample": bool(same)}
        print(json.dumps(line), flush=True)
        lines.append(line)
        if not same:
            raise SystemExit("the two ways kept different rows")
    summary = {"bench": "sampling", "n": args.n, "dim": args.dim, "size": args.size,
               "batch_rows": args.batch_rows, "generate_s": round(gen_s, 2),
               "ratio_median": float(np.median([x["ratio"] for x in lines])),
               "python": platform.python_version(), **run_facts(t0)}
    finish(summary, lines, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
