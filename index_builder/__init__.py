"""FAISS index building and the thin query library (no Beam; torch only to embed query images).

Modules, each a few functions over numpy arrays and FAISS indexes (the FAISS contrib style):
    embeddings  read embedding runs: streamed shard batches, which rows are live (re-embeds,
                tombstones), model/dimension checks
    train       choose a factory (size + memory budget, as autofaiss), reservoir sample, train,
                quantisation error
    add         add embedding shards to copies of the trained index in a process pool
    merge       merge shards (in memory or on disk) or search them together (ShardedIndex)
    recall      exact k-NN over a stream, leave-one-out recall, nprobe/efSearch tuning
    manifest    the index manifest (DESIGN.md section 4): checksums, atomic write, verification
    build       the train / add / merge steps over an index folder, and the one-shot build
    publish     upload a built index folder to object storage, manifest.json last
    search      open_index / RemapIndex: the query library
    id_map      the query library's id -> URI map (sorted ids + one Arrow string buffer)
    synthetic   clustered synthetic embedding runs for tests and benchmarks
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

# Every module logs to `logging.getLogger(__name__)` (as faiss.contrib does); nothing prints.


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (so a redirected or captured
    stderr gets the lines)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _SummaryFormatter(logging.Formatter):
    """Progress lines as they are (`train: ...`), warnings and errors prefixed with their
    level (`WARNING: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname}: {msg}"


@contextlib.contextmanager
def log_to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """For the console: index_builder's log lines at `level` and above go to stderr as plain
    lines (`train: ...`, `WARNING: ...`) while the block runs, and only there (not also through
    the root logger's handlers). Restores the logger when the block ends."""
    logger = logging.getLogger(__name__)
    handler = _StderrHandler()
    handler.setFormatter(_SummaryFormatter("%(message)s"))
    saved = logger.level, logger.propagate
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
