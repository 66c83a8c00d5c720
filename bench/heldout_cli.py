"""Benchmark: the held-out proxy (`heldout_eval.py`'s collection and view generator) scored
through the `remap` command, as a user runs it: the images written as files, `remap embed`,
`remap index` (its defaults: the index type it picks, DBA, the manifest's αQE), `remap search
--format json` with every view as a query image, revisitop mAP from the ranked URIs it prints.

`heldout_eval.py` embeds the same images in process and re-ranks in numpy. This script checks
that the product's path gives what those numbers promise: decoding files, the Beam pipeline's
resize and batching, the FAISS index, the query library embedding the queries again, and the
re-ranking the index records. Each model's in-process figures (`heldout_eval.score`, with and
without αQE + DBA) are printed beside its CLI figures, on the same images.

    python bench/heldout_cli.py --standard ~/.cache/remap --model remap --model gem \
        --work /tmp/heldout-cli --output bench/heldout_cli.json

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import heldout_eval as H  # noqa: E402
from bench_output import run_facts, write_json  # noqa: E402


def image_names(family, kind):
    """One file name per collection image, in collection order."""
    names, n_bg = [], 0
    for f, k in zip(family, kind):
        if f < 0:
            names.append(f"bg{n_bg:03d}")
            n_bg += 1
        else:
            names.append(f"f{f:04d}_{k or 'original'}")
    return names


def write_images(images, names, folder, fmt):
    """The collection as image files (`fmt` "png": lossless; "jpg": quality 95)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for im, name in zip(images, names):
        path = os.path.join(folder, f"{name}.{fmt}")
        if not os.path.exists(path):
            tmp = path + ".tmp"
            im.convert("RGB").save(tmp, format="PNG" if fmt == "png" else "JPEG",
                                   **({} if fmt == "png" else {"quality": 95}))
            os.replace(tmp, path)
        paths.append(path)
    return paths


# the `remap` command, run by this interpreter (whichever environment runs the script)
REMAP = [sys.executable, "-c", "import sys, remap_cli; sys.exit(remap_cli.main())"]


def run_remap(*args):
    """Run one `remap` subcommand with this interpreter; -> seconds."""
    t = time.time()
    subprocess.run([*REMAP, *args], check=True, stdout=subprocess.DEVNULL)
    return time.time() - t


def search_ranks(index, queries, n_images, index_of):
    """`remap search --format json` over the query files -> (ranks (Q, <= n_images), seconds):
    the collection positions of each query's results, best first."""
    t = time.time()
    out = subprocess.run([*REMAP, "search", "--index", index, "--k", str(n_images),
                          "--format", "json", *queries],
                         check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    if len(lines) != len(queries):
        raise SystemExit(f"remap search answered {len(lines)} of {len(queries)} queries")
    ranks = np.full((len(queries), n_images), -1, np.int64)
    for q, line in enumerate(lines):
        if "error" in line:
            raise SystemExit(f"remap search failed on {line['query']}: {line['error']}")
        got = [index_of[os.path.splitext(os.path.basename(r["uri"]))[0]]
               for r in line["results"]]
        ranks[q, :len(got)] = got
    return ranks, time.time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--standard", metavar="CACHE",
                    help="heldout_eval.py --standard's collection, fetched into CACHE")
    ap.add_argument("--photos", action="append", help="glob of family photos")
    ap.add_argument("--backgrounds", action="append", help="glob of background photos")
    ap.add_argument("--min-side", type=int, default=256)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=("png", "jpg"), default="png",
                    help="how the images are written (png: the same pixels as heldout_eval)")
    ap.add_argument("--model", action="append", required=True,
                    help="a model name or checkpoint, as `remap embed --model` takes it")
    ap.add_argument("--work", required=True,
                    help="folder for the images, stores and indexes (one subfolder per "
                         "collection, reused when run again)")
    ap.add_argument("--cache", help="folder for the in-process descriptors (heldout_eval.py's "
                                     "--cache: the same files)")
    ap.add_argument("--output")
    args = ap.parse_args(argv)
    if not H.collection_given(args.standard, args.photos, args.backgrounds):
        ap.error("give --standard CACHE, or both --photos and --backgrounds")

    import torch

    from remap_core.evaluation.metrics import compute_map, paired_bootstrap

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    photos, backgrounds = H.read_collection(args.standard, args.photos, args.backgrounds,
                                            args.min_side, 768)
    images, family, kind = H.build_collection(photos, backgrounds, args.views, args.seed)
    # files, stores and indexes are reused on a rerun, so they are filed by the collection
    digest = H.collection_digest(images)
    work = os.path.join(args.work, digest)
    names = image_names(family, kind)
    index_of = {n: i for i, n in enumerate(names)}
    folder = os.path.join(work, f"images-{args.format}")
    paths = write_images(images, names, folder, args.format)
    queries, gnd = H.ground_truth(family, kind)
    qkind = np.asarray([kind[q] for q in queries])
    groups = family[queries]
    print(f"{len(images)} images, {len(queries)} queries in {folder} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)

    report, rows = {}, {}
    for spec in args.model:
        tag = "".join(c if c.isalnum() or c in "-." else "_" for c in spec)[-60:]
        store, index = (os.path.join(work, f"{tag}-{args.format}", d) for d in ("emb", "index"))
        seconds = {}
        if not os.path.exists(os.path.join(index, "manifest.json")):
            seconds["embed"] = round(run_remap("embed", "--input", folder, "--output", store,
                                           "--model", spec), 1)
            seconds["index"] = round(run_remap("index", "--embeddings", store, "--output", index,
                                           "--no-progress"), 1)
        with open(os.path.join(index, "manifest.json")) as f:
            manifest = json.load(f)
        ranks, t_search = search_ranks(index, [paths[q] for q in queries], len(images),
                                                index_of)
        seconds["search"] = round(t_search, 1)
        rows[f"{spec} (CLI)"] = compute_map(ranks, gnd)[1]
        model = H.load(spec)
        desc = H.cached_embed(model, images, args.cache, digest)
        rows[f"{spec} (in process)"] = H.score(desc, family, kind)
        rows[f"{spec} (in process, qe+dba)"] = H.score(desc, family, kind, ("qe", "dba"))
        report[spec] = {"fingerprint": model.fingerprint, "factory": manifest.get("factory"),
                        "rerank": manifest.get("rerank"), "seconds": seconds}
        print(f"{spec}: {seconds}", file=sys.stderr)

    print(f"{'path':44s}" + "".join(f"{n[:8]:>9s}" for n in ("overall",) + H.NUISANCES))
    for name, aps in rows.items():
        per = {n: round(float(np.nanmean(aps[qkind == n]) * 100), 1) for n in H.NUISANCES}
        spec = name.rsplit(" (", 1)[0]
        entry = {"overall": round(float(np.nanmean(aps) * 100), 1), **per}
        if name.endswith("(CLI)"):
            ref = rows[f"{spec} (in process, qe+dba)"]
            entry["cli_minus_in_process_qe_dba"] = [
                round(100 * x, 2) for x in paired_bootstrap(aps, ref, groups)]
        report[spec][name[len(spec) + 2:-1]] = entry
        print(f"{name[-44:]:44s}{entry['overall']:9.1f}" +
              "".join(f"{per[n]:9.1f}" for n in H.NUISANCES))
    line = {"bench": "heldout_cli", "photos": len(photos), "images": len(images),
            "queries": len(queries), "format": args.format, "results": report,
            **run_facts(t0)}
    print(json.dumps(line))
    if args.output:
        write_json(args.output, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
