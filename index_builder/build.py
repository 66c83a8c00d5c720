"""Build a FAISS index from an embedding store in one go: train, add, measure recall, publish.

Files of a built index (all in one folder, local or object storage):
    index.faiss      the FAISS index, ids = stable int64 ids of the shards
    ids.parquet      id -> uri
    manifest.json    written last (see manifest.py)
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from remap_core.shard_schema import PARQUET_CODEC

from .embeddings import list_runs, load_embeddings
from .manifest import file_entry, write_manifest

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"


def make_index(factory: str, dim: int) -> faiss.Index:
    """An inner-product FAISS index from a factory string, able to take our int64 ids."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        index.add_with_ids(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
        return index
    except RuntimeError:
        return faiss.IndexIDMap2(index)


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k-NN (reference for recall): -> (scores (Q, k), row indices (Q, k))."""
    return faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)


def recall_at(found_ids: np.ndarray, true_ids: np.ndarray, ks=(1, 10, 100)) -> dict[str, float]:
    """recall@k = fraction of queries whose exact nearest neighbour is in the first k results."""
    out = {}
    for k in ks:
        if k > found_ids.shape[1]:
            continue
        hit = (found_ids[:, :k] == true_ids[:, :1]).any(axis=1)
        out[f"recall@{k}"] = float(hit.mean())
    return out


def measure_recall(index: faiss.Index, X: np.ndarray, ids: np.ndarray, n_queries: int = 1000,
                   seed: int = 0, ks=(1, 10, 100)) -> dict:
    """Recall of `index` against exact search on queries drawn from the data (their own vectors,
    slightly perturbed so the query is not trivially itself)."""
    if len(X) == 0:
        return {"queries": 0}
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(X), size=min(n_queries, len(X)), replace=False)
    xq = X[pick] + rng.normal(0, 0.01, size=X[pick].shape).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    kmax = min(max(ks), len(X))
    _, true_rows = exact_knn(xq, X, kmax)
    _, found = index.search(xq, kmax)
    return {"queries": int(len(pick)), **recall_at(found, ids[true_rows], ks)}


def put_file(local: str, dest_folder: str, name: str) -> None:
    """Copy a local file into an fsspec folder (temp name, then rename)."""
    fs, root = fsspec.core.url_to_fs(dest_folder)
    fs.makedirs(root, exist_ok=True)
    fs.put_file(local, f"{root.rstrip('/')}/{name}.tmp")
    fs.mv(f"{root.rstrip('/')}/{name}.tmp", f"{root.rstrip('/')}/{name}")


def write_ids(folder: str, ids: np.ndarray, uris: list[str]) -> None:
    table = pa.table({"id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())})
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, IDS_FILE)
        pq.write_table(table, local, compression=PARQUET_CODEC)
        put_file(local, folder, IDS_FILE)


def build_index(store: str, output: str, factory: str = "Flat", train_sample: int = 100_000,
                recall_queries: int = 1000, seed: int = 0) -> dict:
    """Read every completed run of `store`, build `factory`, write index + ids + manifest."""
    started = time.time()
    ids, X, uris, fingerprint, run_ids = load_embeddings(store)
    n, dim = X.shape
    index = make_index(factory, dim)
    sample = 0
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = min(train_sample, n)
        index.train(X[rng.choice(n, size=sample, replace=False)])
    index.add_with_ids(X, ids)
    recall = measure_recall(index, X, ids, recall_queries, seed)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        faiss.write_index(index, local)
        put_file(local, output, INDEX_FILE)
    write_ids(output, ids, uris)
    runs = list_runs(store)
    manifest = {
        "model": fingerprint,
        "model_uri": runs[-1].summary.get("model_uri"),
        "dimension": int(dim),
        "metric": "inner_product",
        "factory": factory,
        "search_params": {},
        "index_files": [file_entry(output, INDEX_FILE)],
        "id_files": [file_entry(output, IDS_FILE)],
        "layout": "single",
        "num_vectors": int(index.ntotal),
        "training_sample": int(sample),
        "recall": recall,
        "build_seconds": round(time.time() - started, 3),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "source_runs": run_ids,
        "source_store": store,
    }
    write_manifest(output, manifest)
    return manifest
