"""Which trained part of REMAP moves which nuisance: one epoch of `remap train` per variant,
each from the same initialised model (KLW + PCA-whitening), on the same training set, frozen
trunk cache and validation, with the learning rate of the other parameter groups set to 0.

    python bench/train_ablation.py --cache /tmp/tcache [--tuples 400] [remap train options]

Variants (one JSON line each, then a summary line): the backbone tail only, KLW only, the
whitening only, and all three at the `remap train` defaults. Ratios are not the point here: the
per-nuisance mAP change against the epoch-0 model measured in the same process is.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402

from remap_cli import train as train_cli  # noqa: E402
from remap_core.training import run  # noqa: E402
from remap_core.training.train import train  # noqa: E402

VARIANTS = {
    "backbone only": {"lr_head": 0.0, "lr_whiten": 0.0},
    "KLW only": {"lr": 0.0, "lr_whiten": 0.0},
    "whitening only (lr 1e-4)": {"lr": 0.0, "lr_head": 0.0, "lr_whiten": 1e-4},
    "all (remap train defaults)": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train_cli.add_arguments(parser)
    for action in parser._actions:
        if action.dest == "out":          # optional here: a temporary folder by default
            action.required = False
    parser.set_defaults(benchmark_views=True, tuples=400, epochs=1, quiet=True)
    args = parser.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="remap-ablation-")
    if args.cache is None:
        from remap_core.evaluation.benchmark import default_cache_dir

        args.cache = default_cache_dir()
    options = run.TrainRun(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(run.TrainRun)})
    torch.manual_seed(options.seed)
    t0 = time.time()
    model = run.new_model(options, torch.device("cpu"))
    ts, source = run.load_training_set(options, int(model.config["max_side"]))
    caches = run.cache_frozen_trunk(model, ts, run.train_options(options), progress=False)
    run.initialise_model(model, ts, options, caches)
    validate = run.make_validator(options, model, options.freeze, progress=False)
    init = validate(model)
    state0 = copy.deepcopy(model.state_dict())
    rows = []
    for name, overrides in VARIANTS.items():
        opts = run.train_options(options)
        for k, v in overrides.items():
            setattr(opts, k, v)
        model.load_state_dict(state0)
        out = os.path.join(options.out, name.split(" (")[0].replace(" ", "_"))
        tv = time.time()
        rec = train(model, ts.images, ts.labels, opts, out, validate=validate, progress=False,
                    cache=caches.get(1.0), groups=ts.groups, history=[{"epoch": 0}])[-1]
        row = {"bench": "train_ablation", "variant": name,
               "lr": {"backbone": opts.lr, "head": opts.lr_head, "whiten": opts.lr_whiten},
               "tuples": opts.tuples_per_epoch, "loss": rec["loss"],
               "map": rec["map"], "dmap": round(rec["map"] - init["map"], 5),
               "per_nuisance_delta": {k: round(v - init["per_nuisance"][k], 4)
                                      for k, v in rec["per_nuisance"].items()},
               "seconds": round(time.time() - tv, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "train_ablation", "training_data": f"{source}: {ts.summary()}",
                      "init_map": init["map"], "init_per_nuisance": init["per_nuisance"],
                      "variants": {r["variant"]: r["dmap"] for r in rows},
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
                                 f"{torch.__version__}",
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
