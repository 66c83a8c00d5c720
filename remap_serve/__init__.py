"""`remap serve`: a thin HTTP service over the query library (index_builder.search).

    app.py      the FastAPI application: /search, the results page, /thumb, probes, /metrics
    reload.py   IndexHolder: follows an index root's CURRENT pointer, swaps indexes atomically
    metrics.py  Prometheus text metrics kept in process
    gallery.py  the results page (also written by `remap search --html`)

It owns no retrieval logic and imports no Beam.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def build_server(index: str, host: str = "127.0.0.1", port: int = 8080,
                 reload_interval: float = 30.0, verify: bool = True, cache: str | None = None,
                 settings=None, faiss_threads: int | None = 1, log_level: str = "info"):
    """-> a uvicorn.Server for the service over `index` (a folder, URL or index root with a
    CURRENT pointer); `server.run()` serves until SIGINT/SIGTERM (or `server.should_exit`)."""
    import faiss
    import uvicorn

    from remap_serve.app import create_app
    from remap_serve.metrics import Metrics
    from remap_serve.reload import IndexHolder

    if faiss_threads:
        # one query per request: FAISS's OpenMP threads would only compete with the
        # service's own request threads
        faiss.omp_set_num_threads(faiss_threads)
    metrics = Metrics()
    holder = IndexHolder(index, reload_interval, verify, cache, metrics)
    app = create_app(holder, settings, metrics)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=10)
    return uvicorn.Server(config)
