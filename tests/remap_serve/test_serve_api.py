"""`remap serve` over real HTTP on 127.0.0.1 (uvicorn in a thread, httpx clients): search by
vectors against exact numpy search, metadata and filters, 4xx JSON errors, probes and metrics,
thumbnails only for held images, and a hot reload under load with no failed query."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from index_builder.rerank import reranked_similarities
from index_builder.synthetic import clustered_vectors, write_run
from remap_cli import main as remap
from remap_store.schema import stable_ids
from serving import running_server

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

N, DIM = 800, 16
RUN = "20260101T000000Z-aaaaaa"


def make_store(root, prefix: str, seed: int, n: int = N):
    """A store of n vectors whose URIs are real small JPEG files under root/images-<prefix>,
    with metadata columns (title, product_id, width, height, content_sha1 with duplicates)."""
    X = clustered_vectors(n, DIM, clusters=20, seed=seed)
    folder = root / f"images-{prefix}"
    folder.mkdir()
    uris = []
    for i in range(n):
        path = folder / f"{i:04d}.jpg"
        if i < 12:      # a few real images for thumbnails; the rest need not exist
            colour = tuple(int(c) for c in np.random.default_rng(i).integers(0, 255, 3))
            Image.new("RGB", (64, 48), colour).save(path)
        uris.append(str(path))
    meta = {"title": [f"{prefix} item {i}" for i in range(n)],
            "product_id": [f"p{i % 10}" for i in range(n)],
            "width": [64] * n, "height": [48] * n,
            # every pair (2j, 2j+1) holds the same bytes
            "content_sha1": [f"{prefix}-sha-{i // 2}" for i in range(n)]}
    store = root / f"store-{prefix}"
    write_run(str(store), RUN, uris, X, shards=2, metadata=meta)
    return str(store), X, uris, meta


def build(store: str, out: str, factory: str = "Flat", layout: str = "single") -> str:
    assert remap(["index", "--embeddings", store, "--output", out, "--factory", factory,
                  "--layout", layout, "--no-progress", "--recall-queries", "100",
                  "--dba", "0"]) == 0           # the stored vectors are X (DBA: index_builder)
    return out


def publish(root, folder: str) -> None:
    from remap_store.files import write_bytes_atomic

    write_bytes_atomic(str(root / "CURRENT"), (folder + "\n").encode())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store, X, uris, meta = make_store(root, "a", seed=1)
    index = build(store, str(root / "index-a"))
    publish(root, index)
    with running_server(str(root), reload_interval=0.2) as url:
        yield url, X, uris, meta, root


def exact(X, xq, k, allowed=None):
    scores = xq @ X.T
    if allowed is not None:
        scores = np.where(allowed[None, :], scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def test_search_by_vectors_returns_the_exact_neighbours_with_their_metadata(served):
    url, X, uris, meta, _ = served
    xq = clustered_vectors(5, DIM, clusters=20, seed=7)
    r = httpx.post(f"{url}/search", json={"vectors": xq.tolist(), "k": 7, "qe": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"]["vectors"] == N
    order, scores = exact(X, xq, 7)
    for q, res in enumerate(body["results"]):
        assert res["query"] == q
        assert [h["uri"] for h in res["hits"]] == [uris[j] for j in order[q]]
        np.testing.assert_allclose([h["score"] for h in res["hits"]], scores[q], atol=1e-5)
        assert [h["rank"] for h in res["hits"]] == list(range(1, 8))
        j = order[q][0]
        assert res["hits"][0]["id"] == int(stable_ids([uris[j]])[0])
        assert res["hits"][0]["metadata"] == {
            "content_sha1": meta["content_sha1"][j], "size_bytes": 0, "width": 64,
            "height": 48, "title": meta["title"][j], "product_id": meta["product_id"][j]}


def test_searches_expand_queries_as_the_manifest_says_unless_the_request_turns_it_off(served):
    url, X, uris, meta, _ = served
    xq = clustered_vectors(4, DIM, clusters=20, seed=12)
    sims = reranked_similarities(xq, X, qe=2, alpha=3.0)       # the built index's default
    order = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    for body in ({}, {"qe": 2}, {"qe": "2"}):
        r = httpx.post(f"{url}/search", json={"vectors": xq.tolist(), "k": 6, **body})
        assert r.status_code == 200, r.text
        for q, res in enumerate(r.json()["results"]):
            assert [h["uri"] for h in res["hits"]] == [uris[j] for j in order[q]]
            np.testing.assert_allclose([h["score"] for h in res["hits"]],
                                       sims[q, order[q]], atol=1e-5)
    sims = reranked_similarities(xq, X, qe=5, alpha=3.0)       # another depth per request
    order = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    r = httpx.post(f"{url}/search", json={"vectors": xq.tolist(), "k": 6, "qe": 5}).json()
    assert [[h["uri"] for h in res["hits"]] for res in r["results"]] == \
        [[uris[j] for j in row] for row in order]
    for bad in (-1, "x", True):
        r = httpx.post(f"{url}/search", json={"vectors": xq.tolist(), "qe": bad})
        assert r.status_code == 400 and "qe must be an integer" in r.json()["error"]["message"]


def test_a_filter_on_a_metadata_column_returns_the_best_matching_hits(served):
    url, X, uris, meta, _ = served
    xq = clustered_vectors(3, DIM, clusters=20, seed=8)
    allowed = np.isin(np.array(meta["product_id"]), ["p3", "p7"])
    r = httpx.post(f"{url}/search", json={"vectors": xq.tolist(), "k": 5, "qe": 0,
                                          "filters": {"product_id": ["p3", "p7"]}})
    assert r.status_code == 200, r.text
    order, _ = exact(X, xq, 5, allowed)
    for q, res in enumerate(r.json()["results"]):
        assert [h["uri"] for h in res["hits"]] == [uris[j] for j in order[q]]
        assert {h["metadata"]["product_id"] for h in res["hits"]} <= {"p3", "p7"}
    # an integer column, and a value no image has: no hits
    r = httpx.post(f"{url}/search", json={"vectors": xq[:1].tolist(), "k": 5,
                                          "filters": {"product_id": "p-none"}})
    assert r.json()["results"][0]["hits"] == []
    r = httpx.post(f"{url}/search", json={"vectors": xq[:1].tolist(), "filters": {"nope": 1}})
    assert r.status_code == 400 and "cannot filter on 'nope'" in r.json()["error"]["message"]


def test_dedupe_keeps_one_hit_per_identical_bytes(served):
    url, X, uris, meta, _ = served
    xq = X[[10, 300]] + 0.01
    body = httpx.post(f"{url}/search", json={"vectors": xq.tolist(), "k": 6, "qe": 0,
                                             "dedupe": True}).json()
    order, _ = exact(X, xq, N)
    for q, res in enumerate(body["results"]):
        expect, seen = [], set()
        for j in order[q]:
            if meta["content_sha1"][j] not in seen:
                seen.add(meta["content_sha1"][j])
                expect.append(uris[j])
            if len(expect) == 6:
                break
        assert [h["uri"] for h in res["hits"]] == expect
        assert [h["rank"] for h in res["hits"]] == list(range(1, 7))


def test_bad_requests_get_4xx_json_errors_and_the_service_keeps_answering(served):
    url, X, uris, meta, _ = served
    before = httpx.get(f"{url}/metrics").text

    def error(r, status, kind):
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["kind"] == kind and r.json()["error"]["message"]
        return r.json()["error"]["message"]

    big = b"\xff\xd8" + b"0" * (21 << 20)      # over the 20 MiB default, declared length
    error(httpx.post(f"{url}/search", content=big, headers={"content-type": "image/jpeg"}),
          413, "too_large")

    def chunks():                               # the same, streamed without a length
        for _ in range(22):
            yield b"0" * (1 << 20)
    error(httpx.post(f"{url}/search", content=chunks(), headers={"content-type": "image/jpeg"}),
          413, "too_large")
    error(httpx.post(f"{url}/search", content=b"hello", headers={"content-type": "text/plain"}),
          415, "unsupported_media_type")
    error(httpx.post(f"{url}/search", files={"image": ("a.txt", b"hi", "text/plain")}),
          415, "unsupported_media_type")
    msg = error(httpx.post(f"{url}/search", json={"vectors": [[0.1] * (DIM + 1)]}),
                400, "bad_vectors")
    assert f"dimension {DIM}" in msg
    error(httpx.post(f"{url}/search", json={"vectors": [[0.1, "x"] * (DIM // 2)]}),
          400, "bad_vectors")
    error(httpx.post(f"{url}/search", json={"vectors": [[1e39] * DIM]}), 400, "bad_vectors")
    error(httpx.post(f"{url}/search", json={"vectors": [[0.1] * DIM], "k": 0}),
          400, "bad_request")
    error(httpx.post(f"{url}/search", content=b"{not json",
                     headers={"content-type": "application/json"}), 400, "bad_request")
    msg = error(httpx.post(f"{url}/search", content=b"GIF89a-not-really",
                           headers={"content-type": "image/gif"}), 400, "undecodable_image")
    assert "not a readable image" in msg
    error(httpx.post(f"{url}/search", files={"image": ("x.jpg", b"\xff\xd8broken", "image/jpeg")}),
          400, "undecodable_image")
    error(httpx.get(f"{url}/nothing-here"), 404, "not_found")

    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ok = httpx.post(f"{url}/search", json={"vectors": [X[0].tolist()], "k": 1}).json()
    assert ok["results"][0]["hits"][0]["uri"] == uris[0]
    after = httpx.get(f"{url}/metrics").text
    for kind, n in [("too_large", 2), ("unsupported_media_type", 2), ("bad_vectors", 3),
                    ("bad_request", 2), ("undecodable_image", 2), ("not_found", 1)]:
        assert count(after, "remap_errors_total", kind=kind) - \
            count(before, "remap_errors_total", kind=kind) == n, kind


def count(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            got = set(head[len(name) + 1:-1].split(",")) if "{" in head else set()
            if want <= got:
                return float(value)
    return 0.0


def test_probes_and_metrics_describe_the_served_index(served):
    url, X, uris, meta, root = served
    assert httpx.get(f"{url}/healthz").status_code == 200
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["ready"] is True and ready["vectors"] == N
    info = httpx.get(f"{url}/index").json()
    assert info["dimension"] == DIM and info["vectors"] == N and "product_id" in info["columns"]
    manifest = json.load(open(root / "index-a" / "manifest.json"))
    for _ in range(3):
        httpx.post(f"{url}/search", json={"vectors": [X[1].tolist()], "k": 2})
    m = httpx.get(f"{url}/metrics")
    assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = m.text
    assert count(text, "remap_index_vectors") == N
    assert count(text, "remap_index_info", version=manifest["built_at"]) == 1
    assert count(text, "remap_index_ready") == 1
    assert count(text, "remap_requests_total", route="/search", method="POST", status=200) >= 3
    n = count(text, "remap_request_duration_seconds_count", route="/search")
    assert n >= 3 and count(text, "remap_request_duration_seconds_bucket", route="/search",
                            le="+Inf") == n
    assert count(text, "remap_queries_total", by="vectors") >= 3
    assert "# TYPE remap_request_duration_seconds histogram" in text


def test_readyz_is_503_until_an_index_is_published(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with running_server(str(root), ready=False, reload_interval=0.2) as url:
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and "no index" in r.json()["error"]
        r = httpx.post(f"{url}/search", json={"vectors": [[0.0] * DIM]})
        assert r.status_code == 503 and r.json()["error"]["kind"] == "not_ready"
        store, X, uris, _ = make_store(tmp_path, "b", seed=2, n=50)
        publish(root, build(store, str(tmp_path / "index-b")))
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the published index was never served"
            time.sleep(0.1)
        hit = httpx.post(f"{url}/search", json={"vectors": [X[3].tolist()], "k": 1}).json()
        assert hit["results"][0]["hits"][0]["uri"] == uris[3]


def test_thumbnails_are_served_only_for_images_the_index_holds(served):
    url, X, uris, meta, root = served
    ids = stable_ids(uris)
    r = httpx.get(f"{url}/thumb", params={"id": int(ids[3])})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    source = Image.open(uris[3]).convert("RGB")
    assert thumb.size == source.size          # 64x48 already fits 256
    assert np.abs(np.asarray(thumb, float) - np.asarray(source, float)).mean() < 8
    assert httpx.get(f"{url}/thumb", params={"uri": uris[5]}).status_code == 200

    outside = root / "not-indexed.jpg"          # a real image the index does not hold
    Image.new("RGB", (10, 10)).save(outside)
    held_dir = os.path.dirname(uris[0])
    for params in [{"uri": "/etc/passwd"}, {"uri": str(outside)},
                   {"uri": f"{held_dir}/../not-indexed.jpg"},
                   {"uri": f"{held_dir}/../../../../etc/passwd"},
                   {"uri": "http://127.0.0.1:1/x.jpg"}, {"id": 12345}]:
        r = httpx.get(f"{url}/thumb", params=params)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found", params
    assert httpx.get(f"{url}/thumb", params={"id": "abc"}).status_code == 400
    assert httpx.get(f"{url}/thumb").status_code == 400


def test_a_new_index_is_swapped_in_under_load_without_a_failed_query(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    store_a, XA, uris_a, _ = make_store(tmp_path, "a", seed=1, n=400)
    store_b, XB, uris_b, _ = make_store(tmp_path, "b", seed=2, n=500)
    index_a = build(store_a, str(tmp_path / "index-a"))
    index_b = build(store_b, str(tmp_path / "index-b"), factory="IVF8,Flat")
    publish(root, index_a)
    version_b = json.load(open(os.path.join(index_b, "manifest.json")))["built_at"]
    failures, answered, seen_b = [], [0], threading.Event()
    clients, per_client = 4, 150
    xq = clustered_vectors(clients * per_client, DIM, clusters=20, seed=3)

    with running_server(str(root), reload_interval=0.1) as url:
        def client(c):
            with httpx.Client(timeout=30) as http:
                for i in range(per_client):
                    q = xq[c * per_client + i]
                    r = http.post(f"{url}/search", json={"vectors": [q.tolist()], "k": 3})
                    if r.status_code != 200 or len(r.json()["results"][0]["hits"]) != 3:
                        failures.append((r.status_code, r.text[:200]))
                        continue
                    answered[0] += 1
                    uri = r.json()["results"][0]["hits"][0]["uri"]
                    if "images-b" in uri:
                        seen_b.set()
                    if i == per_client // 3 and c == 0:
                        publish(root, index_b)        # mid-load
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics").text
        after = httpx.post(f"{url}/search", json={"vectors": [XB[7].tolist()], "k": 1}).json()

    assert failures == [] and answered[0] == clients * per_client
    assert seen_b.is_set(), "no query was answered by the new index during the load"
    assert count(metrics, "remap_index_info", version=version_b) == 1
    assert count(metrics, "remap_index_vectors") == 500
    assert count(metrics, "remap_index_reloads_total", outcome="swapped") == 1
    assert count(metrics, "remap_index_reloads_total", outcome="failed") == 0
    assert after["results"][0]["hits"][0]["uri"] == uris_b[7]


def test_a_broken_new_index_is_not_served_and_the_old_one_stays(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    store, X, uris, _ = make_store(tmp_path, "a", seed=1, n=100)
    publish(root, build(store, str(tmp_path / "index-a")))
    broken = build(store, str(tmp_path / "index-broken"))
    with open(os.path.join(broken, "index.faiss"), "r+b") as f:     # damaged after the build
        f.seek(100)
        f.write(b"garbage")
    with running_server(str(root), reload_interval=0.1) as url:
        publish(root, broken)
        deadline = time.monotonic() + 20
        while count(httpx.get(f"{url}/metrics").text, "remap_index_reloads_total",
                    outcome="failed") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"{url}/readyz").status_code == 200
        r = httpx.post(f"{url}/search", json={"vectors": [X[2].tolist()], "k": 1}).json()
        assert r["results"][0]["hits"][0]["uri"] == uris[2]
        assert str(tmp_path / "index-a") in httpx.get(f"{url}/index").json()["folder"]
