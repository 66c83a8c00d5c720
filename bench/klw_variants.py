"""KLW ablation on a trained REMAP model: write checkpoints that differ from it only in the
region weights, to score with `bench/benchmark_models.py` (paired intervals) or
`bench/heldout_eval.py`.

    python bench/klw_variants.py --model remap --init /work/runs/F1/init.pt --out /tmp/klw
    python bench/benchmark_models.py --model remap --model /tmp/klw/layer-mean.pt ...

Variants (everything else, backbone and whitening included, is the trained model's). They
change the grid regions' weights; the whole map (a head with it) keeps its multiple of its
layer's grid mean, as the model has it (×100 after `remap train`'s final step, ~×1 before):
  layer-mean.pt   every grid region of a layer weighted by that layer's mean grid weight: no
                  region weighting, the layers' balance kept
  uniform.pt      every grid weight the mean over all layers: no region weighting and no layer
                  weighting
  init-klw.pt     the grid weights as initialised from the KL divergences (`--init`: the run's
                  init.pt), before training moved them
  no-grid.pt      the grid regions weighted 0 (a head with the whole map only): what the grid
                  adds at all
The whitening was fitted with the model's own weights, so a variant also pays for that
mismatch: a variant that loses little says the weighting carries little.

Prints the weights per layer and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def whole_map_multiple(w: np.ndarray) -> np.ndarray:
    """KLW weights (layers, regions), the whole map first -> per layer, the whole map's weight
    as a multiple of the mean of the layer's grid regions."""
    return w[:, 0] / w[:, 1:].mean(axis=1)


def variant_keeping_whole_map(trained: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """The variant's grid weights, with each layer's whole map at the trained model's multiple
    of that layer's (new) grid mean."""
    from remap_core.fitting.klw import weigh_whole_map

    return weigh_whole_map(variant, whole_map_multiple(trained))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="remap", help="a trained REMAP checkpoint or shipped name")
    ap.add_argument("--init", default=None, help="the run's init.pt (for init-klw.pt)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from remap_core.descriptor.checkpoint import load_model, save_checkpoint

    base = load_model(args.model, device="cpu")
    if base.config["head"] != "remap":
        sys.exit(f"{args.model} has a {base.config['head']!r} head; KLW variants need REMAP")
    w = base.head.region_weights.detach().numpy().astype(np.float64)
    whole = bool(getattr(base.head, "include_global", False)) and w.shape[1] > 1
    grid = w[:, 1:] if whole else w                       # the weights a variant flattens
    variants = {"layer-mean": np.repeat(grid.mean(axis=1, keepdims=True), w.shape[1], axis=1),
                "uniform": np.full_like(w, grid.mean())}
    if args.init:
        variants["init-klw"] = load_model(args.init, device="cpu").head.region_weights \
            .detach().numpy().astype(np.float64)
    if whole:
        variants = {n: variant_keeping_whole_map(w, v) for n, v in variants.items()}
        variants["no-grid"] = np.concatenate([w[:, :1], np.zeros_like(w[:, 1:])], axis=1)
    os.makedirs(args.out, exist_ok=True)
    taps = base.config["taps"]
    report = {"model": args.model, "fingerprint": base.fingerprint,
              "grid_weights": {t: {"min": round(float(grid[i].min()), 3),
                                   "mean": round(float(grid[i].mean()), 3),
                                   "max": round(float(grid[i].max()), 3)}
                               for i, t in enumerate(taps)},
              "whole_map_multiple": ([round(float(x), 2) for x in whole_map_multiple(w)]
                                     if whole else None),
              "variants": {}}
    for t, s in report["grid_weights"].items():
        print(f"trained KLW weights of the grid regions, layer {t}: min {s['min']}, "
              f"mean {s['mean']}, max {s['max']}")
    if whole:
        print(f"whole map: x {report['whole_map_multiple']} the layer's grid mean (kept)")
    for name, weights in variants.items():
        model = load_model(args.model, device="cpu")
        model.head.set_region_weights(weights)
        path = os.path.join(args.out, f"{name}.pt")
        fp = save_checkpoint(model, path, half=True,
                             extra={"klw_variant": name, "from": args.model,
                                    "from_fingerprint": base.fingerprint})
        g = weights[:, 1:] if whole else weights
        report["variants"][name] = {"path": path, "fingerprint": fp,
                                    "grid_means": [round(float(x), 3) for x in g.mean(1)],
                                    "whole_map": ([round(float(x), 3) for x in weights[:, 0]]
                                                  if whole else None)}
        print(f"{name}: {path} ({fp}); grid means {report['variants'][name]['grid_means']}")
    print(json.dumps({"bench": "klw_variants", **report}))


if __name__ == "__main__":
    main()
