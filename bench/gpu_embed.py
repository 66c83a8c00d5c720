"""Embedding throughput on a GPU at production size, and where the time goes. One command on a
GPU machine (defaults: the product's default model at its input size, 512 px; real photos as
1-12 MP JPEGs; decoding on every CPU core, overlapped with the GPU):

    python bench/gpu_embed.py                      # --device auto: the GPU when there is one
    python bench/gpu_embed.py --device cpu --images 16 --max_side 64 --megapixels 0.1 0.3

Prints one JSON line with four measurements over the same images:
- decode: `image_for_model` (fetch excluded: bytes in memory) on `--decode_threads` threads
  (or processes: `--decode_pool process`);
- h2d: host-to-device copies of uint8 batches through pinned memory (CUDA events);
- model: the forward pass (mixed precision on a GPU) on already decoded batches;
- amp_vs_cpu_fp32 (GPU only): cosine between the GPU's mixed-precision descriptors and the
  float32 CPU model's for the same decoded images;
- end_to_end: decode threads feeding the GPU loop through a bounded queue (what a worker does),
  with how long the GPU loop waited for decoded images (`gpu_waited_s`) and which side bounds
  the throughput (`bound`: decode or model).
Without a GPU it says so (`"gpu": false` and a `note`) and runs on the CPU: those figures are not
GPU figures. `--model` defaults to what `remap embed` uses without --model.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import queue
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_jpegs(n: int, megapixels: tuple[float, float], seed: int = 0) -> list[bytes]:
    """n distinct JPEGs: the bundled sample photos upscaled to sizes drawn uniformly from
    `megapixels` (quality 90)."""
    from decode_resize import photo_jpeg

    from remap_core.data.samples import sample_photos

    photos = list(sample_photos().values())
    rng = np.random.default_rng(seed)
    return [photo_jpeg(photos[i % len(photos)], float(rng.uniform(*megapixels)))
            for i in range(n)]


def decode_pixels(data: bytes, side: int, multiple: int, draft: float | None) -> np.ndarray:
    """What a worker does per image once the bytes are fetched (picklable for process pools)."""
    from remap_core.data.preprocess import DRAFT_MARGIN, image_for_model

    margin = DRAFT_MARGIN if draft is None else (draft or None)
    return image_for_model(data, side, multiple, draft=margin).pixels


def shape_batches_of(arrays: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Arrays grouped by shape into stacked uint8 (B, H, W, 3) batches of at most batch_size."""
    from remap_core.descriptor.batching import shape_batches

    return [np.stack([arrays[i] for i in idx]) for idx in shape_batches(arrays, batch_size)]


class GpuTimer:
    """Seconds of GPU work between start() and stop() (CUDA events), or wall seconds on CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def __enter__(self):
        if self.cuda:
            self.a = self.torch.cuda.Event(enable_timing=True)
            self.b = self.torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.seconds = self.a.elapsed_time(self.b) / 1000
        else:
            self.seconds = time.perf_counter() - self.t


def forward(model, batch):
    """uint8 (B, H, W, 3) tensor on the model's device -> (B, D) float32 on the host."""
    import torch

    with torch.inference_mode(), torch.autocast(model.device.type,
                                                enabled=model.device.type == "cuda"):
        return model.forward_multiscale(batch.permute(0, 3, 1, 2).float()).float().cpu()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (default: the GPU if any), cuda, cpu")
    ap.add_argument("--model", default=None, help="checkpoint (default: remap embed's default)")
    ap.add_argument("--images", type=int, default=2000, help="images embedded per measurement")
    ap.add_argument("--distinct", type=int, default=48,
                    help="distinct JPEGs generated (the stream cycles over them)")
    ap.add_argument("--megapixels", type=float, nargs=2, default=[1.0, 12.0])
    ap.add_argument("--max_side", type=int, default=None, help="default: the model's input size")
    ap.add_argument("--batch_size", default="auto",
                    help="images per forward pass: a number, or auto (GPU: what half the free "
                         "memory holds, at most 256; CPU: 32)")
    ap.add_argument("--decode_threads", type=int, default=os.cpu_count(),
                    help="decode workers (threads or processes, see --decode_pool)")
    ap.add_argument("--decode_pool", choices=("thread", "process"), default="thread",
                    help="decode on a thread pool (as one SDK process does) or a process pool")
    ap.add_argument("--draft", type=float, default=None,
                    help="JPEG draft margin (default: image_for_model's); 0 decodes in full")
    args = ap.parse_args(argv)

    import torch

    from remap_core.descriptor.checkpoint import load_model
    from remap_core.descriptor.devices import (device_name, memory_batch_size, resolve_device,
                                               to_device)

    device = resolve_device(args.device)
    gpu = torch.device(device).type == "cuda"
    model = load_model(args.model, device=device)
    side = args.max_side or int(model.config["max_side"])
    multiple = int(model.config["multiple"])
    if args.batch_size == "auto":
        batch_size = memory_batch_size(model, side, side, 256) if gpu else 32
    else:
        batch_size = int(args.batch_size)
    print(f"device {device_name(device)}, model {model.fingerprint}, {side} px, batch "
          f"{batch_size}, {args.decode_threads} decode threads", file=sys.stderr, flush=True)

    t = time.perf_counter()
    jpegs = make_jpegs(args.distinct, tuple(args.megapixels))
    stream = [jpegs[i % len(jpegs)] for i in range(args.images)]
    generate_s = time.perf_counter() - t

    decode = functools.partial(decode_pixels, side=side, multiple=multiple, draft=args.draft)
    if args.decode_pool == "thread":
        Pool = ThreadPoolExecutor
    else:   # spawned, not forked: the parent already holds a CUDA context
        Pool = functools.partial(ProcessPoolExecutor, mp_context=mp.get_context("spawn"))

    # decode alone, on the pool
    with Pool(args.decode_threads) as pool:
        list(pool.map(decode, stream[: min(len(stream), 2 * args.decode_threads)]))  # warm
        t = time.perf_counter()
        arrays = list(pool.map(decode, stream))
        decode_s = time.perf_counter() - t

    # h2d and model alone, on decoded batches
    batches = shape_batches_of(arrays, batch_size)
    dev = torch.device(device)
    t = time.perf_counter()
    warmed: set = set()
    for b in batches:          # one pass per input shape first: a long-running worker's state
        if b.shape[1:] not in warmed:
            forward(model, to_device(b, dev))
            warmed.add(b.shape[1:])
    warmup_s = time.perf_counter() - t
    h2d_s = model_s = 0.0
    for b in batches:
        with GpuTimer(dev) as copy:
            x = to_device(b, dev)
        with GpuTimer(dev) as fwd:
            forward(model, x)
        h2d_s += copy.seconds
        model_s += fwd.seconds

    # the same images through the float32 model on the CPU: how far mixed precision moves them
    agreement = None
    if gpu:
        cpu_model = load_model(args.model, device="cpu")
        sample = batches[0][: min(16, len(batches[0]))]
        on_gpu = forward(model, to_device(sample, dev))
        on_cpu = forward(cpu_model, torch.from_numpy(sample))
        cos = (on_gpu * on_cpu).sum(1) / (on_gpu.norm(dim=1) * on_cpu.norm(dim=1))
        agreement = {"images": len(sample), "min_cosine": round(float(cos.min()), 5),
                     "mean_cosine": round(float(cos.mean()), 5)}
        del cpu_model

    # end to end: decode threads -> bounded queue -> shape buckets -> GPU
    q: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    done = object()

    def produce():
        with Pool(args.decode_threads) as pool:
            for arr in pool.map(decode, stream, chunksize=8):
                q.put(arr)
        q.put(done)

    t = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    buckets: dict[tuple, list] = defaultdict(list)
    waited = 0.0
    embedded = 0
    while True:
        w = time.perf_counter()
        item = q.get()
        waited += time.perf_counter() - w
        if item is done:
            break
        bucket = buckets[item.shape]
        bucket.append(item)
        if len(bucket) == batch_size:
            embedded += len(forward(model, to_device(np.stack(bucket), dev)))
            buckets[item.shape] = []
    for bucket in buckets.values():
        if bucket:
            embedded += len(forward(model, to_device(np.stack(bucket), dev)))
    if gpu:
        torch.cuda.synchronize(dev)
    e2e_s = time.perf_counter() - t
    producer.join()
    assert embedded == len(stream)

    n = len(stream)
    decode_rate, model_rate = n / decode_s, n / max(model_s + h2d_s, 1e-9)
    result = {
        "bench": "gpu_embed", "gpu": gpu, "device": device_name(device),
        "model_fingerprint": model.fingerprint, "max_side": side, "batch_size": batch_size,
        "decode_threads": args.decode_threads, "decode_pool": args.decode_pool,
        "draft": args.draft, "shapes": len(warmed), "warmup_s": round(warmup_s, 2), "cpu_count": os.cpu_count(), "images": n,
        "distinct_jpegs": len(jpegs), "megapixels": args.megapixels,
        "mean_jpeg_kb": round(float(np.mean([len(j) for j in jpegs])) / 1024, 1),
        "generate_s": round(generate_s, 2),
        "img_per_s": round(n / e2e_s, 1),
        "decode": {"img_per_s": round(decode_rate, 1),
                   "ms_per_img_per_thread": round(1000 * decode_s * args.decode_threads / n, 2)},
        "h2d": {"ms_per_batch": round(1000 * h2d_s / len(batches), 3),
                "ms_per_img": round(1000 * h2d_s / n, 4)},
        "model": {"img_per_s": round(n / max(model_s, 1e-9), 1),
                  "ms_per_batch": round(1000 * model_s / len(batches), 2)},
        "end_to_end": {"seconds": round(e2e_s, 2), "gpu_waited_s": round(waited, 2),
                       "bound": "decode" if decode_rate < model_rate else "model"},
        "amp_vs_cpu_fp32": agreement,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }
    if not gpu:
        result["note"] = ("no CUDA GPU present (or --device cpu): this ran on the CPU; these are "
                          "not GPU figures")
        print("NOTE: " + result["note"], file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
