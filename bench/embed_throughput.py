"""Throughput of `remap embed` (the full Beam pipeline) against a bare torch loop doing the same
work (read, decode, resize, shape-bucketed forward) with the same model and images, in one
process run, at production settings by default: real photos (the bundled samples) as 1-12 MP
JPEGs, the product's default model (what `remap embed` uses without --model) at its own input
size. Prints one JSON line.

Production (1k and 10k images, 512 px: long; the lead runs it alone, on an idle machine; the
bare loop at 1k only, else the 10k point alone takes 1.5 h on 2 cores):

    python bench/embed_throughput.py --sizes 1000 10000 --bare_sizes 1000

Flatness at 100k with small images and a small input (the pipeline's per-image overhead):

    python bench/embed_throughput.py --sizes 100000 --megapixels 0.02 0.1 --max_side 64

Check that it runs (seconds):

    python bench/embed_throughput.py --sizes 8 --distinct 4 --megapixels 0.05 0.2 --max_side 64

Per size: img/s and ms/img of both, ratio = pipeline img/s / bare img/s (goal >= 0.9), peak RSS
of each phase (sampled; the pipeline runs in this process: the in-process FnApiRunner), and
where the bare loop's time goes (decode+resize vs forward: `bound`). `--distinct` JPEGs are
generated and hard-linked under N names, so 10k 12 MP images take no more disk than 300 (their
bytes are read from the page cache: fetch from an object store is not in these figures).
`--max_side` re-saves the model with another input size (same weights). Threads: torch's
intra-op threads (`--torch_threads`, default torch's), one FnApiRunner worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate_jpegs(folder: Path, n: int, megapixels: tuple[float, float], distinct: int,
                   seed: int = 0) -> list[str]:
    """n JPEG files: `distinct` real photos (the bundled samples, upscaled to sizes drawn
    uniformly from `megapixels`, quality 90) under n names (hard links)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from decode_resize import photo_jpeg

    from remap_core.data.samples import sample_photos

    folder.mkdir(parents=True, exist_ok=True)
    photos = list(sample_photos().values())
    rng = np.random.default_rng(seed)
    originals = []
    for i in range(min(n, distinct)):
        p = folder / f"img_{i:07d}.jpg"
        p.write_bytes(photo_jpeg(photos[i % len(photos)], float(rng.uniform(*megapixels))))
        originals.append(p)
    paths = [str(p) for p in originals]
    for i in range(len(originals), n):
        p = folder / f"img_{i:07d}.jpg"
        os.link(originals[i % len(originals)], p)
        paths.append(str(p))
    return paths


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.peak, self.stop = _rss_mb(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bare_loop(paths: list[str], model, batch_size: int) -> dict:
    """The same work without Beam: read, decode + resize (`image_for_model`, the pipeline's
    path), bucket by shape, forward, keep the vectors. -> seconds in all, in decode, in model."""
    from remap_core.data.preprocess import image_for_model

    cfg = model.config
    decode_s = model_s = 0.0
    t0 = time.perf_counter()
    buckets: dict[tuple, list[np.ndarray]] = defaultdict(list)
    out = []

    def embed(bucket):
        nonlocal model_s
        t = time.perf_counter()
        out.append(model.embed_arrays(bucket, batch_size=batch_size))
        model_s += time.perf_counter() - t

    for p in paths:
        t = time.perf_counter()
        with open(p, "rb") as f:
            data = f.read()
        arr = image_for_model(data, cfg["max_side"], cfg["multiple"]).pixels
        decode_s += time.perf_counter() - t
        bucket = buckets[arr.shape]
        bucket.append(arr)
        if len(bucket) >= batch_size:
            embed(bucket)
            buckets[arr.shape] = []
    for bucket in buckets.values():
        if bucket:
            embed(bucket)
    assert sum(len(o) for o in out) == len(paths)
    return {"seconds": time.perf_counter() - t0, "decode_s": decode_s, "model_s": model_s}


def pipeline_run(folder: Path, store: Path, model_path: str, batch_size: int,
                 torch_threads: int | None) -> tuple[float, dict]:
    from pipelines.embed import run

    argv = [f"--input={folder}", f"--output={store}", f"--model={model_path}",
            f"--batch_size={batch_size}", "--progress_seconds=0"]
    if torch_threads:
        argv.append(f"--torch_threads={torch_threads}")
    t0 = time.perf_counter()
    summary = run(argv)
    return time.perf_counter() - t0, summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--bare_sizes", type=int, nargs="*", default=None,
                    help="sizes at which the bare loop runs too (default: every size); the "
                         "others run the pipeline alone (ratio null): at 512 px a 10k bare loop "
                         "doubles a 45-minute run")
    ap.add_argument("--model", default=None,
                    help="checkpoint (default: the product's default model, as remap embed)")
    ap.add_argument("--max_side", type=int, default=None,
                    help="model input long side (default: the model's own)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--megapixels", type=float, nargs=2, default=[1.0, 12.0],
                    help="range of the generated photos' sizes, Mpx")
    ap.add_argument("--distinct", type=int, default=300,
                    help="distinct JPEGs per size (the rest are hard links to them)")
    ap.add_argument("--torch_threads", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    args = ap.parse_args(argv)

    import torch

    from remap_core.descriptor.checkpoint import load_model, save_checkpoint

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embed_bench_"))
    try:
        model = load_model(args.model, device="cpu")
        if args.max_side:
            model.config["max_side"] = args.max_side
        model_path = str(work / "model.pt")        # the pipeline and the bare loop load this
        save_checkpoint(model, model_path)
        model = load_model(model_path, device="cpu")
        side = model.config["max_side"]
        model.embed_arrays([np.zeros((side, side, 3), np.uint8)])  # warm up
        result = {"bench": "embed_throughput", "model": model.fingerprint,
                  "model_uri": args.model or "default (remap embed without --model)",
                  "max_side": side, "batch_size": args.batch_size,
                  "megapixels": args.megapixels, "distinct_jpegs": args.distinct,
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                  "python": platform.python_version(),
                  "runner": "FnApiRunner (in-process, one worker)", "runs": []}
        for n in args.sizes:
            folder = work / f"images_{n}"
            t = time.perf_counter()
            paths = generate_jpegs(folder, n, tuple(args.megapixels), args.distinct, seed=n)
            gen_s = time.perf_counter() - t
            mean_kb = np.mean([os.path.getsize(p) for p in paths[:args.distinct]]) / 1024
            load_start = os.getloadavg()[0]
            bare = bare_rss = None
            if args.bare_sizes is None or n in args.bare_sizes:
                with PeakRss() as bare_rss:
                    bare = bare_loop(paths, model, args.batch_size)
            with PeakRss() as pipe_rss:
                pipe_s, summary = pipeline_run(folder, work / f"store_{n}", model_path,
                                               args.batch_size, args.torch_threads)
            assert summary["embedded"] == n and summary["accounted"], summary
            print(f"{n} images: bare {bare and bare['seconds']} s, pipeline {pipe_s:.1f} s",
                  file=sys.stderr, flush=True)
            run = {
                "images": n, "generate_s": round(gen_s, 2), "mean_jpeg_kb": round(mean_kb, 1),
                "pipeline_s": round(pipe_s, 2), "pipeline_img_per_s": round(n / pipe_s, 2),
                "pipeline_ms_per_img": round(1000 * pipe_s / n, 2),
                "pipeline_peak_rss_mb": round(pipe_rss.peak, 1),
                "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            }
            result["runs"].append(run)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work / f"store_{n}", ignore_errors=True)
            if bare is not None:
                bare_s = bare["seconds"]
                run.update({
                    "bare_s": round(bare_s, 2), "bare_img_per_s": round(n / bare_s, 2),
                    "ratio": round(bare_s / pipe_s, 3),
                    "bare_ms_per_img": round(1000 * bare_s / n, 2),
                    "bare_decode_ms_per_img": round(1000 * bare["decode_s"] / n, 2),
                    "bare_model_ms_per_img": round(1000 * bare["model_s"] / n, 2),
                    "bound": "decode" if bare["decode_s"] > bare["model_s"] else "model",
                    "pipeline_overhead_ms_per_img": round(1000 * (pipe_s - bare_s) / n, 2),
                    "bare_peak_rss_mb": round(bare_rss.peak, 1),
                })
            # each size as it completes: a later size killed (memory, time) loses nothing here
            print(json.dumps({"bench": "embed_throughput", "size_done": n, **run}), flush=True)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
