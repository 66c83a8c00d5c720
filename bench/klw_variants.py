"""KLW ablation on a trained REMAP model: write checkpoints that differ from it only in the
region weights, to score with `bench/benchmark_models.py` (paired intervals) or
`bench/heldout_eval.py`.

    python bench/klw_variants.py --model remap --init /work/runs/F1/init.pt --out /tmp/klw
    python bench/benchmark_models.py --model remap --model /tmp/klw/layer-mean.pt ...

Variants (everything else, backbone and whitening included, is the trained model's):
  layer-mean.pt   every region of a layer weighted by that layer's mean KLW weight: no region
                  weighting, the layers' balance kept
  uniform.pt      every weight the overall mean: no region weighting and no layer weighting
  init-klw.pt     the KLW weights as initialised from the KL divergences (`--init`: the run's
                  init.pt), before training moved them
The whitening was trained with the model's own weights, so a variant also pays for that
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
    variants = {"layer-mean": np.repeat(w.mean(axis=1, keepdims=True), w.shape[1], axis=1),
                "uniform": np.full_like(w, w.mean())}
    if args.init:
        variants["init-klw"] = load_model(args.init, device="cpu").head.region_weights \
            .detach().numpy().astype(np.float64)
    os.makedirs(args.out, exist_ok=True)
    taps = base.config["taps"]
    report = {"model": args.model, "fingerprint": base.fingerprint,
              "weights": {t: {"min": round(float(w[i].min()), 3), "mean": round(float(w[i].mean()), 3),
                              "max": round(float(w[i].max()), 3)} for i, t in enumerate(taps)},
              "variants": {}}
    for t, s in report["weights"].items():
        print(f"trained KLW weights, layer {t}: min {s['min']}, mean {s['mean']}, max {s['max']}")
    for name, weights in variants.items():
        model = load_model(args.model, device="cpu")
        model.head.set_region_weights(weights)
        path = os.path.join(args.out, f"{name}.pt")
        fp = save_checkpoint(model, path, half=True,
                             extra={"klw_variant": name, "from": args.model,
                                    "from_fingerprint": base.fingerprint})
        report["variants"][name] = {"path": path, "fingerprint": fp,
                                    "layer_means": [round(float(x), 3) for x in weights.mean(1)]}
        print(f"{name}: {path} ({fp}); layer means {report['variants'][name]['layer_means']}")
    print(json.dumps({"bench": "klw_variants", **report}))


if __name__ == "__main__":
    main()
