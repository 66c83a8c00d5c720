"""What the embed pipeline's worker-side steps share: storage configured (--fsspec_config)
and log records redacted (remap_store.files.redact_logs) before a step first touches storage,
counters in one namespace, a per-worker progress line."""

from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from remap_store.files import redact_logs
from pipelines.uris import apply_fsspec_config

NAMESPACE = "remap.embed"      # Beam counters of every step (RunInference's included)
DEAD = "dead_letter"           # the tag of every step's failures output
log = logging.getLogger(__name__)


class StorageDoFn(beam.DoFn):
    """A DoFn that applies --fsspec_config in its worker before touching storage."""

    def __init__(self, fsspec_config: dict | None):
        self.fsspec_config = fsspec_config

    def setup(self):
        redact_logs()
        apply_fsspec_config(self.fsspec_config)


def count(name: str, n: int = 1) -> None:
    """Add `n` to the pipeline counter `name` (namespace remap.embed)."""
    Metrics.counter(NAMESPACE, name).inc(n)


class Progress:
    """Per-worker progress line: at most every `every` seconds."""

    def __init__(self, what: str, every: float):
        self.what, self.every = what, every
        self.n, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last = now
            log.info("%s %d images (%.1f img/s) in this worker", self.what, self.n,
                     self.n / max(now - self.t0, 1e-9))
