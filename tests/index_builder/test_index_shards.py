"""Index shards share one trained quantizer: an IVF shard file holds its codes and ids, not a
copy of the coarse quantizer; a `shards` index lists the quantizer once and answers as the
exact reference; an index written before (whole-index shards, format 1) still opens; the
`ondisk` merge holds one shard in memory at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from index_builder.add import read_index_shard, write_index_shard
from index_builder.build import build_index
from index_builder.manifest import file_entry
from index_builder.search import open_index
from index_builder.synthetic import clustered_vectors, synthetic_uris, write_run
from remap_store.schema import stable_ids

N, DIM, SHARDS, NLIST = 12_000, 32, 4, 256

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def shards_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    X = clustered_vectors(N, DIM, clusters=100, seed=3)
    uris = synthetic_uris(N)
    write_run(str(root / "store"), "20260101T000000Z-aaaaaa", uris, X, shards=SHARDS)
    folder = str(root / "index")
    build_index(str(root / "store"), folder, factory=f"IVF{NLIST},Flat", layout="shards",
                dba=0, recall_queries=200, workers=1, progress=False)
    return folder, X, stable_ids(uris)


def test_shards_hold_their_codes_and_ids_and_the_quantizer_is_stored_once(shards_index):
    folder, X, ids = shards_index
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["format_version"] == 3 and manifest["quantizer_file"] == "trained.faiss"
    paths = [e["path"] for e in manifest["index_files"]]
    assert paths[0] == "trained.faiss" and paths.count("trained.faiss") == 1
    quantizer_bytes = NLIST * DIM * 4
    for e in manifest["index_files"][1:]:
        vectors = N // SHARDS
        codes_and_ids = vectors * (DIM * 4 + 8)     # IVF-Flat: a float32 vector + int64 id each
        assert codes_and_ids <= e["bytes"] < codes_and_ids + quantizer_bytes // 4, e
    # the whole index answers as exact search once every list is probed
    idx = open_index(folder)
    faiss.extract_index_ivf(idx.index).nprobe = NLIST
    xq = X[:50] + 0.01
    D, I = idx.index.search(xq, 10)
    exact = np.argsort(-(xq @ X.T), axis=1)[:, :10]
    np.testing.assert_allclose(D, np.take_along_axis(xq @ X.T, exact, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(I, ids[exact])
    assert len(idx) == N


def test_an_index_of_whole_index_shards_written_before_still_opens(shards_index, tmp_path):
    folder, X, ids = shards_index
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    trained = faiss.read_index(os.path.join(folder, "trained.faiss"))
    old = tmp_path / "old"
    for e in manifest["index_files"][1:] + manifest["id_files"]:
        (old / e["path"]).parent.mkdir(parents=True, exist_ok=True)
        src = os.path.join(folder, e["path"])
        if e["path"].endswith(".faiss"):       # what remap wrote before: quantizer in each
            faiss.write_index(read_index_shard(src, trained), str(old / e["path"]))
        else:
            (old / e["path"]).write_bytes(open(src, "rb").read())
    before = {k: v for k, v in manifest.items() if k not in ("quantizer_file", "id_map")}
    before.update(format_version=1,
                  index_files=[file_entry(str(old), e["path"])
                               for e in manifest["index_files"][1:]])
    (old / "manifest.json").write_text(json.dumps(before))
    new, was = open_index(folder), open_index(str(old))
    xq = X[100:140]
    np.testing.assert_array_equal(new.index.search(xq, 10)[1], was.index.search(xq, 10)[1])


MEASURE = r"""
import sys, threading, time, faiss
from index_builder.merge import merge_to_ondisk

def rss():     # resident memory, mapped files included
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

trained, out, shards = sys.argv[1], sys.argv[2], sys.argv[3:]
faiss.read_index(trained)
base, peak, done = rss(), [0], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
merge_to_ondisk(trained, shards, out)
done.append(1); t.join()
print(max(peak[0], rss()) - base)
"""


def test_the_ondisk_merge_holds_one_shard_in_memory_at_a_time(tmp_path):
    dim, nlist, shards, per = 64, 64, 6, 60_000
    rng = np.random.default_rng(0)
    trained = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(rng.normal(size=(nlist * 40, dim)).astype(np.float32))
    faiss.write_index(trained, str(tmp_path / "trained.faiss"))
    paths, X = [], []
    for s in range(shards):
        x = rng.normal(size=(per, dim)).astype(np.float32)
        part = faiss.clone_index(trained)
        part.add_with_ids(x, np.arange(s * per, (s + 1) * per))
        paths.append(str(tmp_path / f"s{s}.faiss"))
        write_index_shard(part, paths[-1])
        X.append(x)
    shard_bytes = per * (dim * 4 + 8)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "trained.faiss"),
                          str(tmp_path / "index.faiss"), *paths],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown = int(out.stdout.split()[-1])
    # one shard read at a time, no file mapped (faiss.contrib.ondisk.merge_ondisk, which maps
    # every shard and the output, grew by 188 MB here: all 6 shards + the merged lists)
    assert grown < 2.5 * shard_bytes, (grown, shard_bytes)
    # and the merged lists are every shard's: IVF-Flat probing every list is exact search
    index = faiss.read_index(str(tmp_path / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    assert index.ntotal == shards * per
    X = np.concatenate(X)
    index.nprobe = nlist
    xq = X[::9000][:40]
    D, I = index.search(xq, 5)
    exact = np.argsort(-(xq @ X.T), axis=1)[:, :5]
    np.testing.assert_array_equal(I, exact)


def test_added_vectors_go_to_the_list_of_their_nearest_centroid(tmp_path):
    """From 1,000 lists on the centroids sit under an HNSW graph; add_shard searches it wide
    (train.ASSIGN_EF), where FAISS's default efSearch 16 puts some vectors in another list,
    which no search then finds unless it probes that list too."""
    import glob

    from index_builder.add import AddJob, add_shard
    from index_builder.train import train_index

    n, dim, nlist = 40_000, 256, 1024
    X = clustered_vectors(n, dim, clusters=2000, seed=5)
    uris = synthetic_uris(n)
    run = write_run(str(tmp_path / "store"), "20260101T000000Z-bbbbbb", uris, X, shards=1)
    trained = train_index(f"IVF{nlist}_HNSW32,Flat", X)
    ivf = faiss.extract_index_ivf(trained)
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 16   # FAISS's default
    centroids = faiss.downcast_index(ivf.quantizer).storage.reconstruct_n(0, nlist)
    nearest = np.argmax(X @ centroids.T, axis=1)
    ids = stable_ids(uris)

    def lists_of(index):
        got = {}
        inv = faiss.extract_index_ivf(index).invlists
        for lst in range(nlist):
            for i in faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)):
                got[int(i)] = lst
        return np.array([got[int(i)] for i in ids])

    shard = glob.glob(os.path.join(run, "*.parquet"))
    shard = [s for s in shard if "tomb" not in os.path.basename(s)]
    out = str(tmp_path / "s0.faiss")
    result = add_shard(trained, AddJob(shard[0], out))
    assert result.vectors == n
    widened = lists_of(read_index_shard(out, trained))
    default = faiss.clone_index(trained)
    default.add_with_ids(X, ids)
    assert (widened == nearest).mean() == 1.0
    assert (widened == nearest).mean() >= (lists_of(default) == nearest).mean()
