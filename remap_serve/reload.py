"""Follow an index root's CURRENT pointer and swap indexes atomically.

    holder = IndexHolder("gs://bucket/indexes", interval=30)
    holder.start()                 # first open in the background; then polls every 30 s
    idx = holder.current           # one reference per request: a query runs on one index

A new index is opened beside the one being served, checked (dimension and model as the
manifest says, a probe search answers), and only then swapped in by replacing one reference.
Requests that took the old reference finish on it; it is freed when the last one lets go. A new
index that fails to open or to pass the check is not served: the old one stays, the failure is
logged and counted, and the next poll tries again.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from index_builder.cache import prune
from index_builder.manifest import read_manifest
from index_builder.search import RemapIndex, open_index, resolve_index_folder

log = logging.getLogger(__name__)


class IndexHolder:
    def __init__(self, root: str, interval: float = 30.0, verify: bool = True,
                 cache: str | None = None, metrics=None):
        self.root, self.interval, self.verify, self.cache = root, interval, verify, cache
        self.metrics = metrics
        self._index: RemapIndex | None = None
        self._key: tuple | None = None        # (folder, built_at) being served
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()         # one open at a time

    @property
    def current(self) -> RemapIndex | None:
        return self._index

    @property
    def ready(self) -> bool:
        return self._index is not None

    def _target(self) -> tuple[str, tuple]:
        folder = resolve_index_folder(self.root)
        built_at = read_manifest(folder).get("built_at")
        return folder, (folder.rstrip("/"), built_at)

    def check(self) -> bool:
        """Open the index CURRENT names if it is not the one served, check it, swap it in.
        -> True when a new index is now served. Errors are logged, counted and kept in
        `last_error`; the served index stays."""
        with self._lock:
            try:
                folder, key = self._target()
                if key == self._key:
                    return False
                t0 = time.time()
                new = open_index(folder, verify=self.verify, cache=self.cache)
                check_index(new)
            except Exception as e:  # noqa: BLE001  (a bad new index must never stop serving)
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("reload of %s failed, still serving %s: %s", self.root,
                          self._key[0] if self._key else "nothing", self.last_error)
                if self.metrics:
                    self.metrics.reload("failed")
                return False
            old = self._index
            self._index, self._key, self.last_error = new, key, None     # the atomic swap
            if self.metrics:
                self.metrics.reload("first" if old is None else "swapped")
                self.metrics.set_index(new.version, new.folder, new.fingerprint, len(new))
            log.info("serving %s (%d vectors, version %s), opened in %.1fs", new.folder,
                     len(new), new.version, time.time() - t0)
            if old is not None and new.open_stats.get("cache"):
                keep = [new.open_stats["cache"], old.open_stats.get("cache") or ""]
                prune(self.cache, keep)     # older cached indexes; the previous one stays
            return True

    def start(self) -> None:
        """Open the first index and poll CURRENT every `interval` seconds, in a thread."""
        self._thread = threading.Thread(target=self._run, name="remap-index-reload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval if self.ready else min(self.interval, 5.0))

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


def check_index(idx: RemapIndex) -> None:
    """Refuse an index that cannot answer: no vectors, an id map that does not cover the index,
    or a probe search that fails or returns an id the map does not hold. (The dimension is
    checked against the manifest when the index opens.)"""
    if len(idx) == 0:
        raise ValueError(f"index at {idx.folder} holds no vectors")
    if len(idx.id_map) != len(idx):
        raise ValueError(f"index at {idx.folder} has {len(idx)} vectors but its id map "
                         f"{len(idx.id_map)} ids; the index is damaged, rebuild it")
    probe = np.full((1, idx.dimension), idx.dimension ** -0.5, np.float32)
    for hit in idx.search_vectors(probe, k=10)[0]:
        if hit.uri is None:
            raise ValueError(f"index at {idx.folder} returned id {hit.id}, which its id map "
                             f"does not hold; the index is damaged, rebuild it")
