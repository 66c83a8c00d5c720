"""What `remap eval` runs: MAC, SPoC, GeM, R-MAC and REMAP on the same backbone, on the
view-family benchmark (`benchmark.py`), scored with the revisitop mAP (`metrics.py`); one table
(`run(EvalOptions) -> report`, `format_table(report)`).

REMAP here is "off the shelf": its KL-divergence region weights are estimated from matching and
non-matching pairs of the benchmark's *train* split and its whitening is learned on the same
split; nothing is trained end to end. Evaluation uses the disjoint *eval* split. All methods
share one backbone pass per image and scale, and the same multi-scale inference.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)
WHITEN_LABEL = {"learned": "Lw", "pca": "PCAw"}


@dataclass
class EvalOptions:
    """Everything one `remap eval` run depends on (the defaults are the command's)."""

    # benchmark
    cache: str | None = None          # downloaded photos and built benchmarks; None: default
    no_debian: bool = False           # only the scikit-image/scikit-learn photos
    views_per_nuisance: int = 2
    side: int = 384                   # long side of the benchmark images
    seed: int = 0                     # seed of the generated views
    category: bool = False            # also score category retrieval (tuxpaint stamps)
    max_photos: int | None = None     # at most this many photos per split
    # model
    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    taps: str | None = None           # REMAP's taps, comma-separated; None: default_remap_taps
    baseline_taps: str | None = None  # taps of MAC/SPoC/GeM/R-MAC; None: the last tap
    max_side: int = 320               # long side of the network input
    scales: str | Sequence[float] = "1,1/sqrt(2),1/2"   # text as `model.parse_scales` reads it
    levels: int = 3
    layer_norm: bool = False          # REMAP: L2 per layer before concatenation (see REMAPHead)
    klw_method: str = "gaussian"      # or "histogram"
    whiten: str = "learned"           # or "pca"
    whiten_dim: int = 256
    batch_size: int = 16
    model: list[str] = field(default_factory=list)   # checkpoints also scored
    save_model: str | None = None     # save the REMAP model (KLW + whitening) here


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

    from remap_core.descriptor.batching import shape_batches
    from remap_core.descriptor.pooling import resize_batch

    base.eval()
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img",
                                      disable=desc is None, leave=False) as bar:
        for chunk in shape_batches(images, batch_size):
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

def score(desc: np.ndarray | None, bench, ranks: np.ndarray | None = None) -> dict:
    """mAP per nuisance and overall, revisitop mP@k, P@5 and R@10 of descriptors (N, D), ranked
    by inner product; or of given `ranks` (Q, N) of the queries' rankings (e.g. by an index)."""
    from remap_core.evaluation.metrics import compute_map, precision_at_k, rank_by_similarity, recall_at_k

    q = bench.queries
    if ranks is None:
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
    from remap_core.fitting.klw import fit_region_weights

    batches = ((chunk, [feats_by_scale[0][i] for i in remap.tap_index])
               for chunk, feats_by_scale in train_feats)
    match = bench.matching_pairs()
    nonmatch = bench.non_matching_pairs(n=max(len(match), 2000), seed=0)
    return fit_region_weights(remap.model.head, batches, match, nonmatch, method=method,
                              dtype=np.float32)


def learn_whitening(method: Method, train_feats: list, bench, kind: str, dim: int) -> int:
    """Learn a whitening on the method's pooled descriptors of the train images (every scale a
    sample; matching pairs within a scale) and set it in the model. Returns the dimension."""
    import torch

    from remap_core.fitting.whiten import fit_whitening, set_model_whitening

    n_scales = len(train_feats[0][1])
    x = np.zeros((n_scales, len(bench.images), method.model.head.out_dim))
    with torch.inference_mode():
        for chunk, feats_by_scale in train_feats:
            for s, feats in enumerate(feats_by_scale):
                x[s, chunk] = method.model.head([feats[i] for i in method.tap_index]).numpy()
    # the dimension asked for, within what the samples allow
    rank = min(n_scales * len(bench.images), x.shape[-1]) - 1 if kind == "pca" else x.shape[-1]
    pairs = bench.matching_pairs() if kind == "learned" else None
    mean, proj = fit_whitening(x, kind, min(dim, rank), pairs)
    set_model_whitening(method.model, mean, proj)
    return proj.shape[0]


# --------------------------------------------------------------------------- the run

def default_remap_taps(spec) -> list[str]:
    """REMAP's default taps: the stride-16 stage and the head where the backbone has them (the
    stride-32 stages before the head add little), otherwise the last two taps."""
    if "stage5" in spec.taps and "head" in spec.taps:
        return ["stage5", "head"]
    return list(spec.taps[-2:])


def run(options: EvalOptions) -> dict:
    """The benchmark table as a JSON-ready report (see `format_table`)."""
    import torch

    from remap_core.descriptor.backbones import backbone_spec
    from remap_core.evaluation.benchmark import build_benchmark, default_cache_dir
    from remap_core.descriptor.model import build_model, parse_scales

    t0 = time.time()
    cache = options.cache or default_cache_dir()
    scales = (parse_scales(options.scales) if isinstance(options.scales, str)
              else [float(x) for x in options.scales])
    spec = backbone_spec(options.backbone)
    remap_taps = default_remap_taps(spec) if not options.taps else [
        t.strip() for t in options.taps.split(",") if t.strip()]
    base_taps = ([t.strip() for t in options.baseline_taps.split(",")] if options.baseline_taps
                 else [spec.taps[-1]])
    all_taps = list(dict.fromkeys(base_taps + remap_taps))
    torch.manual_seed(0)
    common = {"backbone": options.backbone, "max_side": options.max_side, "scales": scales}
    base = build_model({**common, "taps": all_taps}, backbone_weights=options.weights).eval()

    def method(name, head, taps, head_args):
        m = build_model({**common, "taps": taps, "head": head, "head_args": head_args},
                        backbone_weights=None).eval()
        m.backbone = base.backbone
        return Method(name, m, [all_taps.index(t) for t in taps])

    levels = {"levels": options.levels}
    remap_args = {**levels, **({"layer_norm": True} if options.layer_norm else {})}
    methods = [method("MAC", "mac", base_taps, {}), method("SPoC", "spoc", base_taps, {}),
               method("GeM", "gem", base_taps, {"p": 3.0}),
               method("R-MAC", "rmac", base_taps, levels),
               method(f"R-MAC + {WHITEN_LABEL[options.whiten]}", "rmac", base_taps, levels),
               method("REMAP uniform weights", "remap", remap_taps, remap_args),
               method("REMAP KLW, no whitening", "remap", remap_taps, remap_args),
               method("REMAP", "remap", remap_taps, remap_args)]
    rmac_w, remap_uniform, remap_klw, remap = methods[4:]

    common_bench = dict(cache_dir=cache, views_per_nuisance=options.views_per_nuisance,
                        seed=options.seed, side=options.side, debian=not options.no_debian,
                        max_photos=options.max_photos)
    train = build_benchmark("train", **common_bench)
    evalb = build_benchmark("eval", **common_bench)
    if set(train.photos) & set(evalb.photos):
        raise RuntimeError("train and eval photos overlap; the split is broken")
    t_bench = time.time() - t0
    print(f"train split: {train.summary()}; eval split: {evalb.summary()}", file=sys.stderr)

    t1 = time.time()
    train_feats = list(iter_features(base, _prepare(train, options.max_side), scales,
                                     options.batch_size, desc="train split"))
    klw = learn_klw(remap, train_feats, train, options.klw_method)
    remap.model.head.set_region_weights(klw)
    remap_klw.model.head.set_region_weights(klw)
    dims = {m.name: learn_whitening(m, train_feats, train, options.whiten, options.whiten_dim)
            for m in (rmac_w, remap_uniform, remap)}
    del train_feats
    t_learn = time.time() - t1

    t2 = time.time()
    images = _prepare(evalb, options.max_side)
    desc = describe_all(methods, base, images, scales, options.batch_size, "eval split")
    t_embed = time.time() - t2

    category = None
    if options.category:
        from remap_core.evaluation.benchmark import category_benchmark

        t3 = time.time()
        cb = category_benchmark(cache, seed=options.seed)
        if cb is None:
            print("category retrieval skipped: tuxpaint-stamps-default could not be fetched",
                  file=sys.stderr)
        else:
            cimages = _prepare(cb, options.max_side)
            cdesc = describe_all(methods, base, cimages, scales, options.batch_size, "category")
            cres = {m.name: {"dim": int(m.model.dim), **score(cdesc[m.name], cb)}
                    for m in methods}
            compare_to(cres, "R-MAC", cb)
            category = {"benchmark": cb.summary(), "classes": cb.photos, "results": cres,
                        "seconds": round(time.time() - t3, 1)}

    if options.save_model:
        from remap_core.descriptor.checkpoint import save_checkpoint

        fp = save_checkpoint(remap.model, options.save_model,
                             extra={"klw": "benchmark train split", "whiten": options.whiten})
        print(f"saved REMAP model {fp} to {options.save_model}", file=sys.stderr)

    results = {m.name: {"dim": int(m.model.dim), "taps": m.model.config["taps"],
                        **score(desc[m.name], evalb)} for m in methods}
    models = score_checkpoints(options.model, evalb)
    results.update(models)
    compare_to(results, "R-MAC", evalb)
    pairs = [(name, next(iter(models))) for name in list(models)[1:]]
    pairs += [("REMAP", other) for other in (f"R-MAC + {WHITEN_LABEL[options.whiten]}",
                                            "REMAP uniform weights")]
    key_comparisons = {f"{name} vs {ref}": paired_difference(results[name], results[ref], evalb)
                       for name, ref in pairs}
    return {
        "command": ("remap eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"]
                    else "remap eval"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}, cuda={'yes' if torch.cuda.is_available() else 'no'}",
        "backbone": options.backbone, "scales": scales, "levels": options.levels,
        "layer_norm": options.layer_norm,
        "max_side": options.max_side, "whiten": options.whiten, "whiten_dims": dims,
        "klw_method": options.klw_method,
        "klw_weights": {t: [round(float(v), 4) for v in row] for t, row in zip(remap_taps, klw)},
        "benchmark": {"train": train.summary(), "eval": evalb.summary(),
                      "eval_photos": evalb.photos, "views_per_nuisance": options.views_per_nuisance,
                      "side": options.side, "seed": options.seed,
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
