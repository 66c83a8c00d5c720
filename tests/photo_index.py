"""A small real index for query tests: block-pattern photos embedded with a given model, written
as an embedding store whose run records that model, and built with `remap index`."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

RUN = "20260101T000000Z-aaaaaa"


def indexed_photos(root, model_path: str, n: int, metadata: dict | None = None):
    """`n` distinct 96 x 96 JPEGs under `root` (a pathlib folder), embedded with the model at
    `model_path` and indexed (Flat) -> (index folder, photo paths, descriptors (n, D))."""
    from index_builder.synthetic import write_run
    from remap_cli import main as remap
    from remap_core.data.preprocess import decode_image, resize_for_model
    from remap_core.descriptor.checkpoint import load_model

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        blocks = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        paths.append(str(root / f"p{i}.jpg"))
        Image.fromarray(blocks).resize((96, 96), Image.Resampling.NEAREST).save(paths[-1])
    model = load_model(model_path)
    X = model.embed_arrays([resize_for_model(decode_image(open(p, "rb").read()),
                                             model.config["max_side"], model.config["multiple"])
                            for p in paths])
    run = write_run(str(root / "store"), RUN, paths, X, shards=1, model=model.fingerprint,
                    **({"metadata": metadata} if metadata else {}))
    summary = json.load(open(os.path.join(run, "run.json")))
    json.dump({**summary, "model_uri": model_path}, open(os.path.join(run, "run.json"), "w"))
    index = str(root / "index")
    # --dba 0: the index holds the descriptors X themselves, which the tests rank by (the
    # DBA default is tested in tests/index_builder and tests/test_end_to_end.py)
    assert remap(["index", "--embeddings", str(root / "store"), "--output", index,
                  "--no-progress", "--dba", "0"]) == 0
    return index, paths, X
