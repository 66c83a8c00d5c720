"""Opening an index at scale (index_builder.search, cache, id_map): a remote index is downloaded
once into a local cache keyed by the manifest's checksums; index files and the id map are
memory-mapped; format-1 indexes still open; filters run inside FAISS in every layout."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pytest

from index_builder.id_map import ID_MAP_FILES
from index_builder.manifest import MANIFEST_NAME
from index_builder.search import open_index
from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from objectstore import fake_gcs  # noqa: F401  (pytest fixture)
from remap_cli import main as remap

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

N, DIM = 900, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("open")
    X = clustered_vectors(N, DIM, clusters=25, seed=5)
    uris = synthetic_uris(N)
    colour = [["red", "green", "blue"][i % 3] for i in range(N)]
    write_run(str(root / "store"), "20260101T000000Z-aaaaaa", uris, X, shards=3,
              metadata={"colour": colour, "width": list(range(N))})
    return str(root / "store"), X, uris, np.array(colour)


def build(store, out, factory="Flat", layout="single"):
    assert remap(["index", "--dba", "0",
                  "--embeddings", store, "--output", str(out), "--factory", factory,
                  "--layout", layout, "--no-progress", "--recall-queries", "100"]) == 0
    return str(out)


def exact(X, xq, k, allowed=None):
    s = xq @ X.T
    if allowed is not None:
        s = np.where(allowed[None, :], s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_a_remote_index_is_downloaded_once_and_verified_as_it_enters_the_cache(
        store, tmp_path, fake_gcs):  # noqa: F811
    root, X, uris, _ = store
    dest = fake_gcs.bucket("indexes-cache") + "/idx"
    assert remap(["index", "--dba", "0",
                  "--embeddings", root, "--output", dest, "--factory", "IVF8,Flat",
                  "--no-progress", "--recall-queries", "100"]) == 0
    cache = str(tmp_path / "cache")
    manifest = json.loads(fake_gcs.fs.cat(f"indexes-cache/idx/{MANIFEST_NAME}"))
    needed = [e["path"] for e in manifest["index_files"] + manifest["id_map"]]

    first = open_index(dest, cache=cache)
    assert sorted(first.open_stats["downloaded"]) == sorted(needed)
    assert first.open_stats["reused"] == 0
    for e in manifest["index_files"] + manifest["id_map"]:
        assert os.path.getsize(os.path.join(cache, "objects", e["sha256"])) == e["bytes"]

    # the remote files go away (the manifest stays): a second open downloads nothing
    for path in needed:
        fake_gcs.fs.rm(f"indexes-cache/idx/{path}")
    fake_gcs.fs.invalidate_cache()
    second = open_index(dest, cache=cache)
    assert second.open_stats["downloaded"] == [] and second.open_stats["reused"] == len(needed)
    xq = X[[4, 400, 800]]
    for a, b in zip(first.search_vectors(xq, 5), second.search_vectors(xq, 5)):
        assert [h.uri for h in a] == [h.uri for h in b]
    assert [h[0].uri for h in second.search_vectors(xq, 1)] == [uris[4], uris[400], uris[800]]

    # a file whose bytes differ from the manifest never enters the cache
    bad = dict(manifest)
    bad["id_map"] = [{**e, "sha256": "0" * 64} if e["path"].endswith(".arrow") else e
                     for e in manifest["id_map"]]
    fake_gcs.fs.pipe({f"indexes-cache/bad/{MANIFEST_NAME}": json.dumps(bad).encode()})
    for e in manifest["index_files"] + manifest["id_map"]:
        fake_gcs.fs.pipe({f"indexes-cache/bad/{e['path']}":
                          open(os.path.join(first.open_stats["cache"], e["path"]), "rb").read()})
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        open_index(fake_gcs.bucket("indexes-cache") + "/bad", cache=cache)
    assert not os.path.exists(os.path.join(cache, "objects", "0" * 64))
    assert not [n for n in os.listdir(os.path.join(cache, "objects")) if ".tmp" in n]


def test_index_files_and_the_id_map_are_memory_mapped(store, tmp_path):
    root, X, uris, _ = store
    folder = build(root, tmp_path / "idx", "IVF8,Flat")
    allocated = pa.total_allocated_bytes()
    idx = open_index(folder)
    assert isinstance(idx.id_map.ids, np.memmap)            # the sorted ids: a file mapping
    assert pa.total_allocated_bytes() == allocated           # URIs + metadata: zero-copy
    maps = open("/proc/self/maps").read()
    for name in ("index.faiss",) + ID_MAP_FILES:
        assert os.path.join(folder, name) in maps, name
    assert idx.open_stats["mmap"] is True
    assert idx.id_map.lookup(np.array([idx.id_map.ids[0], -1])) [1] is None
    unmapped = open_index(folder, mmap=False)
    assert not isinstance(unmapped.id_map.ids, np.memmap)
    xq = X[:20]
    assert [[h.uri for h in r] for r in idx.search_vectors(xq, 5)] == \
        [[h.uri for h in r] for r in unmapped.search_vectors(xq, 5)]


def test_an_index_of_format_1_without_an_id_map_still_opens(store, tmp_path):
    root, X, uris, _ = store
    folder = build(root, tmp_path / "idx")
    manifest = json.load(open(os.path.join(folder, MANIFEST_NAME)))
    for e in manifest.pop("id_map"):
        os.remove(os.path.join(folder, e["path"]))
    json.dump({**manifest, "format_version": 1}, open(os.path.join(folder, MANIFEST_NAME), "w"))
    idx = open_index(folder)
    xq = clustered_vectors(10, DIM, clusters=25, seed=9)
    order = exact(X, xq, 5)
    assert [[h.uri for h in r] for r in idx.search_vectors(xq, 5, qe=0)] == \
        [[uris[j] for j in row] for row in order]
    assert idx.search_vectors(xq, 1)[0][0].metadata == {}


@pytest.mark.parametrize("factory,layout", [("Flat", "single"), ("IVF8,Flat", "shards"),
                                            ("IVF8,Flat", "ondisk"), ("HNSW16", "single")])
def test_a_metadata_filter_keeps_the_best_matching_hits_in_every_layout(store, tmp_path,
                                                                        factory, layout):
    root, X, uris, colour = store
    idx = open_index(build(root, tmp_path / "idx", factory, layout))
    for part in getattr(idx.index, "parts", [idx.index]):     # exact for IVF-Flat
        ivf = faiss.try_extract_index_ivf(part)
        if ivf is not None:
            ivf.nprobe = ivf.nlist
        elif factory.startswith("HNSW"):                        # a wide beam, as for IVF
            faiss.ParameterSpace().set_index_parameter(part, "efSearch", 256)
    xq = clustered_vectors(8, DIM, clusters=25, seed=11)
    got = idx.search_vectors(xq, 6, filters={"colour": ["green", "blue"]}, qe=0)
    order = exact(X, xq, 6, np.isin(colour, ["green", "blue"]))
    if factory.startswith("HNSW"):      # approximate: nearly all of the exact answers
        overlap = np.mean([len({h.uri for h in r} & {uris[j] for j in row}) / 6
                           for r, row in zip(got, order)])
        assert overlap >= 0.9
    else:
        assert [[h.uri for h in r] for r in got] == [[uris[j] for j in row] for row in order]
    assert all(h.metadata["colour"] in ("green", "blue") for r in got for h in r)
    both = idx.search_vectors(xq, 3, filters={"colour": "red", "width": [3, 6, 9, 10]})
    assert {h.metadata["width"] for r in both for h in r} <= {3, 6, 9}
