"""The service's Prometheus metrics, in the text exposition format (version 0.0.4), kept in
process: requests, a latency histogram, errors by kind, index version, vectors, reloads.

No client library: a few counters under one lock, rendered on GET /metrics.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(**labels) -> str:
    if not labels:
        return ""
    def esc(v):
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)          # (route, method, status)
        self.errors: dict[str, int] = defaultdict(int)              # kind
        self.latency: dict[str, list[int]] = {}                     # route -> bucket counts
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.queries: dict[str, int] = defaultdict(int)             # by: vectors | image
        self.reloads: dict[str, int] = defaultdict(int)             # outcome
        self.index: dict = {}                                       # version, folder, model, vectors
        self.started = time.time()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, int(status))] += 1
            buckets = self.latency.setdefault(route, [0] * len(LATENCY_BUCKETS))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.latency_sum[route] += seconds
            self.latency_count[route] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def query(self, by: str, n: int = 1) -> None:
        with self._lock:
            self.queries[by] += n

    def reload(self, outcome: str) -> None:
        with self._lock:
            self.reloads[outcome] += 1

    def set_index(self, version: str, folder: str, model: str, vectors: int) -> None:
        with self._lock:
            self.index = {"version": version, "folder": folder, "model": model,
                          "vectors": int(vectors), "loaded_at": time.time()}

    def render(self) -> str:
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(**labels)} {value}")

        with self._lock:
            metric("remap_requests_total", "counter", "HTTP requests by route, method and status.",
                   [({"route": r, "method": m, "status": s}, n)
                    for (r, m, s), n in sorted(self.requests.items())])
            out.append("# HELP remap_request_duration_seconds HTTP request latency by route.")
            out.append("# TYPE remap_request_duration_seconds histogram")
            for route in sorted(self.latency):
                for bound, n in zip(LATENCY_BUCKETS, self.latency[route]):
                    out.append(f"remap_request_duration_seconds_bucket"
                               f"{_labels(route=route, le=bound)} {n}")
                out.append(f"remap_request_duration_seconds_bucket{_labels(route=route, le='+Inf')} "
                           f"{self.latency_count[route]}")
                out.append(f"remap_request_duration_seconds_sum{_labels(route=route)} "
                           f"{self.latency_sum[route]:.6f}")
                out.append(f"remap_request_duration_seconds_count{_labels(route=route)} "
                           f"{self.latency_count[route]}")
            metric("remap_errors_total", "counter", "Requests answered with an error, by kind.",
                   [({"kind": k}, n) for k, n in sorted(self.errors.items())])
            metric("remap_queries_total", "counter", "Queries answered, by what they searched by.",
                   [({"by": k}, n) for k, n in sorted(self.queries.items())])
            metric("remap_index_reloads_total", "counter",
                   "Index reloads (the CURRENT pointer moved), by outcome.",
                   [({"outcome": k}, n) for k, n in sorted(self.reloads.items())])
            if self.index:
                i = self.index
                metric("remap_index_info", "gauge", "The index being served (value 1).",
                       [({"version": i["version"], "folder": i["folder"], "model": i["model"]},
                         1)])
                metric("remap_index_vectors", "gauge", "Vectors in the index being served.",
                       [({}, i["vectors"])])
                metric("remap_index_loaded_timestamp_seconds", "gauge",
                       "When the index being served was loaded (Unix time).",
                       [({}, f"{i['loaded_at']:.3f}")])
            metric("remap_index_ready", "gauge", "1 when an index is loaded and queries are "
                   "answered.", [({}, 1 if self.index else 0)])
            metric("remap_process_start_time_seconds", "gauge", "When the service started.",
                   [({}, f"{self.started:.3f}")])
        return "\n".join(out) + "\n"
