"""`remap index` and `remap search` as a user meets them through the console entry point: small
indexes that open, refusals that are one clear line with exit status 2 and leave nothing
half-written, and the recall the manifest records. References are numpy computations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from remap_core.cli import main as remap
from remap_core.shard_schema import stable_ids

DIM = 8
RUN = "20260101T000000Z-aaaaaa"


def small_store(root, uris, seed=0, shards=1):
    X = clustered_vectors(len(uris), DIM, clusters=max(1, len(uris) // 4), seed=seed)
    write_run(str(root), RUN, list(uris), X, shards=shards)
    return str(root), X


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_a_two_image_index_with_ids_far_apart_opens_and_searches(tmp_path, capsys):
    """Sorted neighbour ids more than 2**63 apart overflowed the id map's duplicate check."""
    candidates = synthetic_uris(64)
    ids = stable_ids(candidates)
    uris = [candidates[int(np.argmax(ids < -2**62))], candidates[int(np.argmax(ids > 2**62))]]
    assert int(stable_ids(uris)[1]) - int(stable_ids(uris)[0]) > 2**63  # would wrap in int64
    store, X = small_store(tmp_path / "store", uris)
    index = str(tmp_path / "index")
    assert remap(["index", "--embeddings", store, "--output", index, "--no-progress"]) == 0
    np.save(tmp_path / "q.npy", X)
    capsys.readouterr()
    assert remap(["search", "--index", index, "--vectors", str(tmp_path / "q.npy"), "--k", "2",
                  "--format", "json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    order = np.argsort(-(X @ X.T), axis=1)
    assert [[r["uri"] for r in row["results"]] for row in rows] == \
        [[uris[j] for j in order[q]] for q in range(2)]
