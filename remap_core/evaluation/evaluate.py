"""`remap eval`: MAC, SPoC, GeM, R-MAC and REMAP on the same backbone, on the view-family
benchmark (`benchmark.py`), scored with the revisitop mAP (`metrics.py`); one table.

REMAP here is "off the shelf": its KL-divergence region weights are estimated from matching and
non-matching pairs of the benchmark's *train* split and its whitening is learned on the same
split; nothing is trained end to end. Evaluation uses the disjoint *eval* split. All methods
share one backbone pass per image and scale, and the same multi-scale inference.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)
WHITEN_LABEL = {"learned": "Lw", "pca": "PCAw"}


def default_cache_dir() -> str:
    return os.environ.get("REMAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "remap")


def parse_scales(text: str) -> list[float]:
    """"1,1/sqrt(2),0.5" -> [1.0, 0.7071..., 0.5]: numbers, +-*/ and sqrt() only."""
    import ast
    import math
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "sqrt" and len(node.args) == 1):
            return math.sqrt(value(node.args[0]))
        raise ValueError(f"cannot read scale {text!r}: use numbers, / and sqrt(), e.g. "
                         f"1,1/sqrt(2),0.5")

    out = [value(ast.parse(t.strip(), mode="eval").body) for t in text.split(",") if t.strip()]
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"scales must be positive numbers, got {text!r}")
    return out


def add_arguments(parser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--cache", default=default_cache_dir(),
                   help="folder for downloaded photos and built benchmarks (default: "
                        "$REMAP_CACHE or ~/.cache/remap)")
    g.add_argument("--no-debian", action="store_true",
                   help="use only the scikit-image/scikit-learn photos (no apt-get download)")
    g.add_argument("--views-per-nuisance", type=int, default=2,
                   help="views of each photo per nuisance (default 2)")
    g.add_argument("--side", type=int, default=384, help="long side of the benchmark images")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated views")
    g.add_argument("--category", action="store_true",
                   help="also score category retrieval on Debian's tuxpaint-stamps-default "
                        "(folder = class; needs apt-get download; skipped when unavailable)")
    g.add_argument("--max-photos", type=int, default=None,
                   help="use at most this many photos per split (quick runs)")
    m = parser.add_argument_group("model")
    m.add_argument("--backbone", default="efficientnet_lite0")
    m.add_argument("--weights", default="default",
                   help="backbone weights: 'default' (offline), a path/fsspec URL, 'torchvision'")
    m.add_argument("--taps", default=None,
                   help="REMAP's feature taps, comma-separated (default: stage5,head for the "
                        "EfficientNet/MobileNet backbones, the last two taps otherwise, e.g. "
                        "layer3,layer4)")
    m.add_argument("--baseline-taps", default=None,
                   help="taps of MAC/SPoC/GeM/R-MAC (default: the backbone's last tap)")
    m.add_argument("--max-side", type=int, default=320, help="long side of the network input")
    m.add_argument("--scales", default="1,1/sqrt(2),1/2",
                   help="multi-scale inference for every method (default 1,1/sqrt(2),1/2)")
    m.add_argument("--levels", type=int, default=3, help="R-MAC/REMAP region grid levels")
    m.add_argument("--klw-method", choices=("gaussian", "histogram"), default="gaussian")
    m.add_argument("--whiten", choices=("learned", "pca"), default="learned",
                   help="whitening learned on the train split (default: Radenović's learned)")
    m.add_argument("--whiten-dim", type=int, default=256)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--model", action="append", default=[], metavar="CHECKPOINT",
                   help="also score this checkpoint (e.g. `remap train`'s init.pt and model.pt) "
                   "as it embeds in the product (`embed_arrays`: its own input size and "
                   "scales); repeatable; the first is the reference the others are compared to")
    m.add_argument("--save-model", default=None,
                   help="also save the REMAP model (KLW + whitening) as a checkpoint here")
    o = parser.add_argument_group("output")
    o.add_argument("--format", choices=("table", "json"), default="table")
    o.add_argument("--output", default=None, help="also write the JSON results to this file")


# --------------------------------------------------------------------------- features

@dataclass
class Method:
    """One row of the table: a RetrievalNet sharing the base backbone."""

    name: str
    model: object           # RetrievalNet
    tap_index: list[int]    # positions of its taps in the base model's taps


def _prepare(bench, max_side: int, multiple: int = 32) -> list[np.ndarray]:
    from PIL import Image

    from remap_core.data.preprocess import resize_for_model

    return [resize_for_model(Image.fromarray(im), max_side, multiple) for im in bench.images]


def iter_features(base, images: list[np.ndarray], scales: list[float], batch_size: int,
                  desc: str | None = None):
    """Yield (indices, [taps at each scale]) over batches of equally shaped images; one backbone
    pass per batch and scale, in eval mode without gradients. `desc`: show a progress bar."""
    import torch
    from tqdm import tqdm

    from remap_core.descriptor.pooling import resize_batch

    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_shape[im.shape].append(i)
    base.eval()
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img",
                                      disable=desc is None, leave=False) as bar:
        for idx in by_shape.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                x = torch.from_numpy(np.stack([images[i] for i in chunk])).permute(0, 3, 1, 2)
                x = x.float()
                yield chunk, [base.features(resize_batch(x, sc)) for sc in scales]
                bar.update(len(chunk))


def describe_multiscale(method: Method, feats_by_scale) -> np.ndarray:
    """What `RetrievalNet.forward_multiscale` computes, from shared taps: L2 of the sum over
    scales of the single-scale descriptors."""
    import torch

    from remap_core.descriptor.pooling import l2n

    with torch.inference_mode():
        v = sum(method.model.describe([f[i] for i in method.tap_index]) for f in feats_by_scale)
        return l2n(v).numpy()


# --------------------------------------------------------------------------- scoring

def score(desc: np.ndarray, bench) -> dict:
    """mAP per nuisance and overall, revisitop mP@k, P@5 and R@10 of descriptors (N, D)."""
    from remap_core.evaluation.metrics import compute_map, precision_at_k, rank_by_similarity, recall_at_k

    q = bench.queries
    ranks = rank_by_similarity(desc[q], desc)
    gnd = bench.ground_truth(q)
    m, aps, mpr, _ = compute_map(ranks, gnd, KAPPAS)
    nuis = np.array([bench.nuisance[i] for i in q])
    per = {n: float(np.nanmean(aps[nuis == n])) for n in dict.fromkeys(nuis)}
    return {"mAP": m, "per_nuisance": per,
            **{f"mP@{k}": float(v) for k, v in zip(KAPPAS, mpr)},
            "P@5": precision_at_k(ranks, gnd, 5), "R@10": recall_at_k(ranks, gnd, 10),
            "aps": [round(float(a), 6) for a in aps]}


def paired_difference(result: dict, reference: dict, bench) -> dict:
    """mAP of `result` minus that of `reference` with a 95 % bootstrap interval over photos (a
    photo's views are resampled together): {"dmAP": d, "ci95": [lo, hi]}."""
    from remap_core.evaluation.metrics import paired_bootstrap

    d, lo, hi = paired_bootstrap(np.array(result["aps"]), np.array(reference["aps"]),
                                 bench.family[bench.queries])
    return {"dmAP": d, "ci95": [lo, hi]}


def compare_to(results: dict, reference: str, bench) -> None:
    """Add to each result its `paired_difference` to `reference`, as "vs <reference>"."""
    for r in results.values():
        r[f"vs {reference}"] = paired_difference(r, results[reference], bench)


# --------------------------------------------------------------------------- learning on train

def learn_klw(remap: Method, train_feats: list, bench, method: str) -> np.ndarray:
    """KLW weights (layers, canonical regions) from the train split's matching pairs and as many
    random non-matching pairs (scale 1 taps)."""
    from remap_core.fitting.klw import canonical_region_vectors, kl_region_weights, pair_region_distances

    head = remap.model.head
    n_layers = len(remap.tap_index)
    vectors: list[np.ndarray | None] = [None] * n_layers
    for chunk, feats_by_scale in train_feats:
        vecs = canonical_region_vectors(head, [feats_by_scale[0][i] for i in remap.tap_index])
        for layer, v in enumerate(vecs):
            if vectors[layer] is None:
                vectors[layer] = np.zeros((len(bench.images),) + v.shape[1:], np.float32)
            vectors[layer][chunk] = v
    match = bench.matching_pairs()
    nonmatch = bench.non_matching_pairs(n=max(len(match), 2000), seed=0)
    return kl_region_weights(pair_region_distances(vectors, match),
                             pair_region_distances(vectors, nonmatch), method=method)


def learn_whitening(method: Method, train_feats: list, bench, kind: str, dim: int) -> int:
    """Learn a whitening on the method's pooled descriptors of the train images (every scale a
    sample; matching pairs within a scale) and set it in the model. Returns the dimension."""
    import torch

    from remap_core.fitting.whiten import learned_whitening, pca_whitening, set_model_whitening

    n_scales = len(train_feats[0][1])
    x = np.zeros((n_scales, len(bench.images), method.model.head.out_dim))
    with torch.inference_mode():
        for chunk, feats_by_scale in train_feats:
            for s, feats in enumerate(feats_by_scale):
                x[s, chunk] = method.model.head([feats[i] for i in method.tap_index]).numpy()
    x = x.reshape(-1, x.shape[-1])
    if kind == "pca":
        rank = min(x.shape) - 1
        mean, proj = pca_whitening(x, min(dim, rank))
    else:
        pairs = bench.matching_pairs()
        pairs = np.concatenate([pairs + s * len(bench.images) for s in range(n_scales)])
        mean, proj = learned_whitening(x, pairs, min(dim, x.shape[1]))
    set_model_whitening(method.model, mean, proj)
    return proj.shape[0]


# --------------------------------------------------------------------------- the run

def default_remap_taps(spec) -> list[str]:
    """REMAP's default taps: the stride-16 stage and the head where the backbone has them (the
    stride-32 stages before the head add little), otherwise the last two taps."""
    if "stage5" in spec.taps and "head" in spec.taps:
        return ["stage5", "head"]
    return list(spec.taps[-2:])


def run(args) -> dict:
    import torch

    from remap_core.descriptor.backbones import backbone_spec
    from remap_core.evaluation.benchmark import build_benchmark
    from remap_core.descriptor.model import build_model

    t0 = time.time()
    scales = parse_scales(args.scales)
    spec = backbone_spec(args.backbone)
    remap_taps = default_remap_taps(spec) if not args.taps else [
        t.strip() for t in args.taps.split(",") if t.strip()]
    base_taps = ([t.strip() for t in args.baseline_taps.split(",")] if args.baseline_taps
                 else [spec.taps[-1]])
    all_taps = list(dict.fromkeys(base_taps + remap_taps))
    torch.manual_seed(0)
    common = {"backbone": args.backbone, "max_side": args.max_side, "scales": scales}
    base = build_model({**common, "taps": all_taps}, backbone_weights=args.weights).eval()

    def method(name, head, taps, head_args):
        m = build_model({**common, "taps": taps, "head": head, "head_args": head_args},
                        backbone_weights=None).eval()
        m.backbone = base.backbone
        return Method(name, m, [all_taps.index(t) for t in taps])

    levels = {"levels": args.levels}
    methods = [method("MAC", "mac", base_taps, {}), method("SPoC", "spoc", base_taps, {}),
               method("GeM", "gem", base_taps, {"p": 3.0}),
               method("R-MAC", "rmac", base_taps, levels),
               method(f"R-MAC + {WHITEN_LABEL[args.whiten]}", "rmac", base_taps, levels),
               method("REMAP uniform weights", "remap", remap_taps, levels),
               method("REMAP KLW, no whitening", "remap", remap_taps, levels),
               method("REMAP", "remap", remap_taps, levels)]
    rmac_w, remap_uniform, remap_klw, remap = methods[4:]

    common_bench = dict(cache_dir=args.cache, views_per_nuisance=args.views_per_nuisance,
                        seed=args.seed, side=args.side, debian=not args.no_debian,
                        max_photos=args.max_photos)
    train = build_benchmark("train", **common_bench)
    evalb = build_benchmark("eval", **common_bench)
    if set(train.photos) & set(evalb.photos):
        raise RuntimeError("train and eval photos overlap; the split is broken")
    t_bench = time.time() - t0
    print(f"train split: {train.summary()}; eval split: {evalb.summary()}", file=sys.stderr)

    t1 = time.time()
    train_feats = list(iter_features(base, _prepare(train, args.max_side), scales,
                                     args.batch_size, desc="train split"))
    klw = learn_klw(remap, train_feats, train, args.klw_method)
    remap.model.head.set_region_weights(klw)
    remap_klw.model.head.set_region_weights(klw)
    dims = {m.name: learn_whitening(m, train_feats, train, args.whiten, args.whiten_dim)
            for m in (rmac_w, remap_uniform, remap)}
    del train_feats
    t_learn = time.time() - t1

    t2 = time.time()
    images = _prepare(evalb, args.max_side)
    desc = describe_all(methods, base, images, scales, args.batch_size, "eval split")
    t_embed = time.time() - t2

    category = None
    if getattr(args, "category", False):
        from remap_core.evaluation.benchmark import category_benchmark

        t3 = time.time()
        cb = category_benchmark(args.cache, seed=args.seed)
        if cb is None:
            print("category retrieval skipped: tuxpaint-stamps-default could not be fetched",
                  file=sys.stderr)
        else:
            cimages = _prepare(cb, args.max_side)
            cdesc = describe_all(methods, base, cimages, scales, args.batch_size, "category")
            cres = {m.name: {"dim": int(m.model.dim), **score(cdesc[m.name], cb)}
                    for m in methods}
            compare_to(cres, "R-MAC", cb)
            category = {"benchmark": cb.summary(), "classes": cb.photos, "results": cres,
                        "seconds": round(time.time() - t3, 1)}

    if args.save_model:
        from remap_core.descriptor.checkpoint import save_checkpoint

        fp = save_checkpoint(remap.model, args.save_model,
                             extra={"klw": "benchmark train split", "whiten": args.whiten})
        print(f"saved REMAP model {fp} to {args.save_model}", file=sys.stderr)

    results = {m.name: {"dim": int(m.model.dim), "taps": m.model.config["taps"],
                        **score(desc[m.name], evalb)} for m in methods}
    models = score_checkpoints(args.model, evalb)
    results.update(models)
    compare_to(results, "R-MAC", evalb)
    pairs = [(name, next(iter(models))) for name in list(models)[1:]]
    pairs += [("REMAP", other) for other in (f"R-MAC + {WHITEN_LABEL[args.whiten]}",
                                            "REMAP uniform weights")]
    key_comparisons = {f"{name} vs {ref}": paired_difference(results[name], results[ref], evalb)
                       for name, ref in pairs}
    return {
        "command": ("remap eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"]
                    else "remap eval"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}, cuda={'yes' if torch.cuda.is_available() else 'no'}",
        "backbone": args.backbone, "scales": scales, "levels": args.levels,
        "max_side": args.max_side, "whiten": args.whiten, "whiten_dims": dims,
        "klw_method": args.klw_method,
        "klw_weights": {t: [round(float(v), 4) for v in row] for t, row in zip(remap_taps, klw)},
        "benchmark": {"train": train.summary(), "eval": evalb.summary(),
                      "eval_photos": evalb.photos, "views_per_nuisance": args.views_per_nuisance,
                      "side": args.side, "seed": args.seed,
                      "queries_per_nuisance": {n: int(sum(1 for i in evalb.queries
                                                          if evalb.nuisance[i] == n))
                                               for n in dict.fromkeys(evalb.nuisance[i]
                                                                      for i in evalb.queries)}},
        "results": results,
        "key_comparisons": key_comparisons,
        "category": category,
        "seconds": {"benchmark": round(t_bench, 1), "learn_on_train": round(t_learn, 1),
                    "embed_eval": round(t_embed, 1), "total": round(time.time() - t0, 1)},
    }


def format_table(report: dict) -> str:
    """The results as one fixed-width table (mAP in %, per nuisance and overall)."""
    results = report["results"]
    nuisances = list(next(iter(results.values()))["per_nuisance"])
    short = {"illumination": "illum", "scale_crop": "scale", "perspective": "persp",
             "occlusion": "occl", "clutter": "clutter"}
    cols = [short.get(n, n[:7]) for n in nuisances] + ["mAP", "mP@5", "R@10"]
    width = max(len(k) for k in results) + 2
    lines = [f"{'method':<{width}}{'dim':>6}" + "".join(f"{c:>9}" for c in cols)
             + "   mAP - R-MAC [95% CI]"]
    lines.append("-" * len(lines[0]))
    for name, r in results.items():
        vals = [r["per_nuisance"][n] for n in nuisances] + [r["mAP"], r["mP@5"], r["R@10"]]
        c = r["vs R-MAC"]
        lines.append(f"{name:<{width}}{r['dim']:>6}" + "".join(f"{100 * v:>9.1f}" for v in vals)
                     + f"   {100 * c['dmAP']:+5.1f} [{100 * c['ci95'][0]:+.1f}, "
                       f"{100 * c['ci95'][1]:+.1f}]")
    b = report["benchmark"]
    lines.append("")
    lines.append("mAP per nuisance and overall (revisitop), mP@5 (revisitop), R@10, in %; the "
                 "interval resamples photos")
    for name, c in report.get("key_comparisons", {}).items():
        lines.append(f"{name}: mAP {100 * c['dmAP']:+.1f} [{100 * c['ci95'][0]:+.1f}, "
                     f"{100 * c['ci95'][1]:+.1f}]")
    lines.append("REMAP = KLW + whitening; 'uniform weights' = REMAP with every KLW weight 1 "
                 f"(+ the same whitening, {report['whiten']})")
    lines.append(f"eval: {b['eval']}; KLW + whitening learned on train: {b['train']}")
    cat = report.get("category")
    if cat:
        lines.append("")
        lines.append(f"Category retrieval, tuxpaint-stamps-default ({cat['benchmark']}; "
                     "positives = same folder; same models as above)")
        head = f"{'method':<{width}}{'dim':>6}" + "".join(f"{c:>9}" for c in
                                                         ("mAP", "mP@5", "R@10"))
        lines.append(head + "   mAP - R-MAC [95% CI]")
        lines.append("-" * (len(head) + 23))
        for name, r in cat["results"].items():
            c = r["vs R-MAC"]
            lines.append(f"{name:<{width}}{r['dim']:>6}" + "".join(
                f"{100 * r[k]:>9.1f}" for k in ("mAP", "mP@5", "R@10"))
                + f"   {100 * c['dmAP']:+5.1f} [{100 * c['ci95'][0]:+.1f}, "
                  f"{100 * c['ci95'][1]:+.1f}]")
        lines.append("")
    lines.append(f"backbone {report['backbone']}, scales {[round(s, 3) for s in report['scales']]}"
                 f", levels {report['levels']}, input long side {report['max_side']}; "
                 f"{report['machine']}; {report['seconds']['total']} s")
    return "\n".join(lines)



def score_checkpoints(paths: list[str], bench) -> dict:
    """Scores of saved models on `bench`, embedded as the product embeds (`embed_arrays`):
    {"<folder>/<file>": result (with the checkpoint's path and fingerprint)}."""
    from PIL import Image

    from remap_core.descriptor.checkpoint import load_model, model_fingerprint
    from remap_core.data.preprocess import resize_for_model

    out = {}
    for path in paths:
        model = load_model(path, device="cpu")
        max_side, multiple = int(model.config["max_side"]), int(model.config["multiple"])
        images = [resize_for_model(Image.fromarray(im), max_side, multiple)
                  for im in bench.images]
        name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))),
                            os.path.basename(path))
        if name in out:
            raise ValueError(f"--model {path}: two checkpoints named {name}")
        out[name] = {"dim": int(model.dim), "taps": model.config["taps"], "checkpoint": path,
                     "fingerprint": model_fingerprint(model),
                     **score(model.embed_arrays(images), bench)}
    return out


def describe_all(methods, base, images, scales, batch_size, desc) -> dict:
    """Every method's multi-scale descriptors of `images`, sharing one backbone pass per chunk:
    name -> (N, D_method) float32."""
    out = {m.name: np.zeros((len(images), m.model.dim), np.float32) for m in methods}
    for chunk, feats_by_scale in iter_features(base, images, scales, batch_size, desc=desc):
        for m in methods:
            out[m.name][chunk] = describe_multiscale(m, feats_by_scale)
    return out

def main(args) -> int:
    report = run(args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0
