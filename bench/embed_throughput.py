"""Throughput of `remap embed` (the full Beam pipeline) against a bare torch loop doing the same
work (read, decode, resize, shape-bucketed forward) with the same model and images, in one
process run, at 1k and 10k generated JPEGs of varied sizes. Prints one JSON line:

    python bench/embed_throughput.py [--sizes 1000 10000] [--max_side 128] [--batch_size 32]

ratio = pipeline images/s / bare images/s (goal >= 0.9); cost per image should stay flat from
1k to 10k; peak RSS is this process's (the pipeline runs in it: the in-process FnApiRunner).
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
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate_jpegs(folder: Path, n: int, seed: int = 0, long_sides=(160, 960)) -> list[str]:
    """n JPEGs with long sides in `long_sides` px, aspect ratios 1:2 .. 2:1, quality 85."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        long = int(rng.integers(long_sides[0], long_sides[1] + 1))
        aspect = float(rng.uniform(0.5, 2.0))
        w, h = (long, max(16, int(long / aspect))) if aspect >= 1 else \
            (max(16, int(long * aspect)), long)
        small = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BILINEAR)
        p = folder / f"img_{i:06d}.jpg"
        img.save(p, "JPEG", quality=85)
        paths.append(str(p))
    return paths


def bare_loop(paths: list[str], model, batch_size: int) -> float:
    """Seconds for the same work without Beam: read, decode, resize, bucket by shape, forward,
    keep the vectors."""
    from remap_core.data.preprocess import decode_image, resize_for_model

    cfg = model.config
    t0 = time.perf_counter()
    buckets: dict[tuple, list[np.ndarray]] = defaultdict(list)
    out = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        arr = resize_for_model(decode_image(data), cfg["max_side"], cfg["multiple"])
        bucket = buckets[arr.shape]
        bucket.append(arr)
        if len(bucket) >= batch_size:
            out.append(model.embed_arrays(bucket, batch_size=batch_size))
            buckets[arr.shape] = []
    for bucket in buckets.values():
        if bucket:
            out.append(model.embed_arrays(bucket, batch_size=batch_size))
    assert sum(len(o) for o in out) == len(paths)
    return time.perf_counter() - t0


def pipeline_run(folder: Path, store: Path, model_path: str, batch_size: int) -> tuple[float, dict]:
    from pipelines.embed import run

    t0 = time.perf_counter()
    summary = run([f"--input={folder}", f"--output={store}", f"--model={model_path}",
                   f"--batch_size={batch_size}", "--progress_seconds=0"])
    return time.perf_counter() - t0, summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--max_side", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--long_sides", type=int, nargs=2, default=[160, 960],
                    help="range of the generated images' long side, px")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    args = ap.parse_args(argv)

    import torch

    from remap_core.descriptor.checkpoint import load_model, save_checkpoint
    from remap_core.descriptor.model import build_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="embed_bench_"))
    try:
        model_path = str(work / "model.pt")
        save_checkpoint(build_model({"max_side": args.max_side}), model_path)
        model = load_model(model_path, device="cpu")
        model.embed_arrays([np.zeros((args.max_side, args.max_side, 3), np.uint8)])  # warm up
        result = {"bench": "embed_throughput", "model": model.fingerprint,
                  "max_side": args.max_side, "batch_size": args.batch_size,
                  "image_long_sides": args.long_sides,
                  "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                  "python": platform.python_version(), "runner": "FnApiRunner (in-process)",
                  "runs": []}
        for n in args.sizes:
            folder = work / f"images_{n}"
            t = time.perf_counter()
            paths = generate_jpegs(folder, n, seed=n, long_sides=args.long_sides)
            gen_s = time.perf_counter() - t
            bare_s = bare_loop(paths, model, args.batch_size)
            pipe_s, summary = pipeline_run(folder, work / f"store_{n}", model_path,
                                           args.batch_size)
            assert summary["embedded"] == n and summary["accounted"], summary
            print(f"{n} images: bare {bare_s:.1f} s, pipeline {pipe_s:.1f} s", file=sys.stderr,
                  flush=True)
            result["runs"].append({
                "images": n, "generate_s": round(gen_s, 2),
                "bare_s": round(bare_s, 2), "pipeline_s": round(pipe_s, 2),
                "bare_img_per_s": round(n / bare_s, 1),
                "pipeline_img_per_s": round(n / pipe_s, 1),
                "ratio": round(bare_s / pipe_s, 3),
                "bare_ms_per_img": round(1000 * bare_s / n, 2),
                "pipeline_ms_per_img": round(1000 * pipe_s / n, 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            })
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
