"""The README's index contract is what `remap index` writes: a built index opens with json,
FAISS and pyarrow alone, following the README's words, and answers as exact numpy search."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from remap_cli import main as remap
from remap_store.schema import stable_ids

README = Path(__file__).resolve().parents[2] / "README.md"
N, DIM = 600, 16


def readme_index_contract() -> str:
    text = README.read_text()
    start = text.index("- **Index** (`remap index")
    return text[start:text.index("- **Model fingerprint**", start)]


def open_by_contract(folder: str):
    """Only what the README's Index bullet says, with json, faiss and pyarrow:
    -> (search(xq, k) -> (scores, ids), {id: uri}, manifest)."""
    manifest = json.loads(Path(folder, "manifest.json").read_text())
    assert manifest["format_version"] in (2, 3) and manifest["metric"] == "inner_product"
    for e in manifest["index_files"] + manifest["id_files"] + manifest["id_map"]:
        data = Path(folder, e["path"]).read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
    paths = [os.path.join(folder, e["path"]) for e in manifest["index_files"]]
    if manifest["layout"] == "single":
        (path,) = paths
        parts = [faiss.read_index(path)]
    elif manifest["layout"] == "ondisk":
        (path,) = [p for p in paths if p.endswith(".faiss")]
        (data,) = [p for p in paths if p.endswith(".ivfdata")]
        assert os.path.dirname(data) == os.path.dirname(path)
        parts = [faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)]
    elif manifest.get("quantizer_file"):     # format 2: IVF shards share one trained index
        assert manifest["format_version"] == 3 and paths[0].endswith(manifest["quantizer_file"])
        index = faiss.read_index(paths[0])
        ivf = faiss.extract_index_ivf(index)
        for p in paths[1:]:
            shard = faiss.read_index(p)     # held while its lists are moved
            ivf.invlists.merge_from(faiss.extract_index_ivf(shard).invlists, 0)
        inner, n = index, ivf.invlists.compute_ntotal()
        while True:
            inner = faiss.downcast_index(inner)
            inner.ntotal = n
            if isinstance(inner, faiss.IndexIVF):
                break
            inner = inner.index
        parts = [index]
    else:
        parts = [faiss.read_index(p) for p in paths]
    for part in parts:
        for name, value in manifest["search_params"].items():
            faiss.ParameterSpace().set_index_parameter(part, name, value)

    def search(xq, k):          # each part, lists merged by score (higher is better)
        D, I = zip(*(part.search(xq, k) for part in parts))
        D, I = np.hstack(D), np.hstack(I)
        D = np.where(I == -1, -np.inf, D)
        order = np.argsort(-D, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    uris = {}
    for e in manifest["id_files"]:
        t = pq.read_table(os.path.join(folder, e["path"]))
        for i, u in zip(t.column("id").to_pylist(), t.column("uri").to_pylist()):
            assert i not in uris
            uris[i] = u
    assert len(uris) == manifest["num_vectors"]
    # the id map: sorted ids (numpy), row i of the Arrow file is ids[i]'s
    paths = {os.path.basename(e["path"]): os.path.join(folder, e["path"])
             for e in manifest["id_map"]}
    ids = np.load(paths["id_map.ids.npy"], mmap_mode="r")
    table = pa.ipc.open_file(pa.memory_map(paths["id_map.arrow"])).read_all()
    assert isinstance(ids, np.memmap) and (np.diff(ids) > 0).all()
    assert dict(zip(ids.tolist(), table.column("uri").to_pylist())) == uris
    return search, uris, parts, manifest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    X = clustered_vectors(N, DIM, clusters=30, seed=4)
    uris = synthetic_uris(N)
    write_run(str(root / "store"), "20260101T000000Z-aaaaaa", uris, X, shards=3)
    return str(root / "store"), X, uris


@pytest.mark.parametrize("layout", ["single", "ondisk", "shards"])
def test_a_built_index_opens_with_faiss_and_pyarrow_as_the_readme_says(store, tmp_path, layout):
    root, X, uris = store
    folder = str(tmp_path / "index")
    assert remap(["index", "--dba", "0",
                  "--embeddings", root, "--output", folder, "--factory", "IVF8,Flat",
                  "--layout", layout, "--no-progress"]) == 0
    search, id_to_uri, parts, manifest = open_by_contract(folder)
    contract = readme_index_contract()
    for e in manifest["index_files"] + manifest["id_files"] + manifest["id_map"]:  # as described
        generic = re.sub(r"shards/.*-g\d+\.", "shards/<run>-<shard>-g<generation>.", e["path"])
        assert f"`{generic}" in contract or f"`{generic}`" in contract, generic
    for key in manifest["search_params"]:
        assert f"`{key}`" in contract
    assert "ids.parquet`" not in contract.replace(".ids.parquet`", "")
    assert id_to_uri == dict(zip(stable_ids(uris).tolist(), uris))

    xq = clustered_vectors(40, DIM, clusters=30, seed=9)
    for part in parts:      # all lists probed: IVF-Flat is then exact
        faiss.extract_index_ivf(part).nprobe = 8
    D, I = search(xq, 10)
    exact = np.argsort(-(xq @ X.T), axis=1)[:, :10]
    np.testing.assert_allclose(D, np.take_along_axis(xq @ X.T, exact, 1), rtol=1e-5, atol=1e-6)
    assert [[id_to_uri[i] for i in row] for row in I] == [[uris[j] for j in row] for row in exact]
