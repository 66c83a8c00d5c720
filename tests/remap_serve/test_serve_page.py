"""The page a person uses and search by image: `remap serve`'s GET / (upload form, results
gallery) and `remap search --html` rendered in headless Chromium with the screenshot's pixels
checked for loaded thumbnails; search by uploaded image over HTTP against numpy over the
descriptors; `remap serve` as a process (console entry point, SIGTERM)."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from objectstore import free_port
from index_builder.rerank import reranked_similarities
from photo_index import indexed_photos
from remap_cli import main as remap
from serving import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install "
                             "chromium); the page is still tested as HTML")


@pytest.fixture(scope="module")
def photo_index(tiny_model_path, tmp_path_factory):
    """8 distinct colourful photos embedded with the tiny model and indexed (Flat), with a
    `label` column: -> (index folder, paths, X)."""
    return indexed_photos(tmp_path_factory.mktemp("photos"), tiny_model_path, 8,
                          metadata={"label": [f"photo <{i}>" for i in range(8)]})


@pytest.fixture(scope="module")
def server(photo_index):
    index, paths, X = photo_index
    with running_server(index, reload_interval=5) as url:
        yield url


def ranking(X, q):
    return list(np.argsort(-(X @ X[q]), kind="stable"))


def reranked(X, q):
    """The ranking, scores under the index's default: alpha-QE over the top 2, alpha 3."""
    s = reranked_similarities(X[q:q + 1], X, qe=2, alpha=3.0)[0]
    order = np.argsort(-s, kind="stable")
    return list(order), s[order]


def test_search_by_uploaded_image_ranks_like_numpy_over_the_descriptors(photo_index, server):
    index, paths, X = photo_index
    data = open(paths[2], "rb").read()
    multipart = httpx.post(f"{server}/search", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"k": "4", "qe": "0"})
    raw = httpx.post(f"{server}/search?k=4&qe=0", content=data,
                     headers={"content-type": "image/jpeg"})
    for r in (multipart, raw):        # qe 0: no query expansion, the raw inner products
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        assert [h["uri"] for h in hits] == [paths[j] for j in ranking(X, 2)[:4]]
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["metadata"]["label"] == "photo <2>"
    order, scores = reranked(X, 2)     # the index's default: alpha-QE as rerank defines it
    multipart = httpx.post(f"{server}/search", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"k": "4"})
    raw = httpx.post(f"{server}/search?k=4", content=data, headers={"content-type": "image/jpeg"})
    for r in (multipart, raw):
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        assert [h["uri"] for h in hits] == [paths[j] for j in order[:4]]
        np.testing.assert_allclose([h["score"] for h in hits], scores[:4], atol=1e-4)
    filtered = httpx.post(f"{server}/search", files={"image": ("q.jpg", data, "image/jpeg")},
                          data={"k": "2", "filters": json.dumps({"label": "photo <5>"})}).json()
    assert [h["uri"] for h in filtered["results"][0]["hits"]] == [paths[5]]


def saturated_pixels(png: bytes) -> int:
    """Pixels whose colour is far from grey: the photos' colour blocks (the page itself is
    greys and one blue border)."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((a.max(axis=2) - a.min(axis=2)) > 60).sum())


def screenshot(url: str, tmp_path, size=(1300, 1400)) -> bytes:
    out = tmp_path / f"shot-{time.monotonic_ns()}.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
                    "--virtual-time-budget=10000", f"--screenshot={out}", url],
                   capture_output=True, timeout=90, check=True)
    return out.read_bytes()


def test_the_page_shows_a_gallery_of_the_matches_with_their_thumbnails(photo_index, server,
                                                                       tmp_path):
    index, paths, X = photo_index
    home = httpx.get(f"{server}/")
    assert home.status_code == 200 and "<form" in home.text and "name='image'" in home.text
    data = open(paths[6], "rb").read()
    page = httpx.post(f"{server}/", files={"image": ("mine.jpg", data, "image/jpeg")},
                      data={"k": "3"}).text
    shown = re.findall(r"<div class='uri'>([^<]*)</div>", page)
    assert shown == [paths[j] for j in reranked(X, 6)[0][:3]]     # the index's default QE
    assert "photo &lt;6&gt;" in page and "photo <6>" not in page     # metadata, escaped
    assert page.count("src='thumb?id=") == 3 and "data:image/jpeg;base64," in page

    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); "
                    "the page was checked as HTML only")
    from remap_store.schema import stable_id

    like = stable_id(paths[6])
    png = screenshot(f"{server}/?like={like}&k=4", tmp_path)
    # 4 thumbnails of 200x200 (96x96 colour blocks, contained) + the query: all loaded
    assert saturated_pixels(png) > 4 * 200 * 200 * 0.5
    broken = screenshot(f"{server}/", tmp_path)                   # the form alone: no photos
    assert saturated_pixels(broken) < 2000
    metrics = httpx.get(f"{server}/metrics").text
    # 4 distinct thumbnails (the query is its own first hit: one URL, fetched once)
    assert 'remap_requests_total{method="GET",route="/thumb",status="200"} 4' in metrics
    assert 'route="/thumb",status="4' not in metrics


@needs_chromium
def test_remap_search_html_writes_a_gallery_that_stands_alone(photo_index, tmp_path, capsys):
    index, paths, X = photo_index
    out = tmp_path / "results.html"
    assert remap(["search", "--index", index, "--k", "3", "--html", str(out), paths[1],
                  paths[4]]) == 0
    html = out.read_text()
    for q in (1, 4):
        assert all(paths[j] in html for j in ranking(X, q)[:3])
    assert "thumb?id=" not in html and html.count("data:image/jpeg;base64,") == 2 + 6
    png = screenshot(out.as_uri(), tmp_path, size=(1300, 2000))
    assert saturated_pixels(png) > 6 * 200 * 200 * 0.5


def test_remap_serve_runs_as_a_process_and_stops_on_sigterm(photo_index):
    index, paths, X = photo_index
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "remap_cli", "serve", "--index", index,
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/search",
                       json={"vectors": [X[3].tolist()], "k": 1})
        assert r.json()["results"][0]["hits"][0]["uri"] == paths[3]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then ends by the signal it caught (as Kubernetes expects)
    assert "Application shutdown complete" in out and proc.returncode in (0, -signal.SIGTERM), out


def test_remap_serve_refuses_bad_options_in_one_line(capsys):
    assert remap(["serve", "--index", "x", "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == \
        "remap serve: error: --port must be between 1 and 65535, got 70000"
