"""A real `remap serve` on 127.0.0.1 for tests: uvicorn in a thread on a free port, stopped
when the block ends. No part of the server is replaced.

    with running_server(index_root, reload_interval=0.2) as url:
        httpx.post(f"{url}/search", json={"vectors": [...], "k": 5})
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx

from objectstore import free_port


@contextlib.contextmanager
def running_server(index: str, ready: bool = True, timeout: float = 60.0, **kwargs):
    from remap_serve import build_server

    port = free_port()
    server = build_server(index, "127.0.0.1", port, log_level="warning", **kwargs)
    thread = threading.Thread(target=server.run, name="remap-serve-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = httpx.get(f"{url}/readyz" if ready else f"{url}/healthz", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"remap serve on {url} did not become ready in {timeout} s")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
