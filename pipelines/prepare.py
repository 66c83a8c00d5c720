"""Per-image work of the embed pipeline as plain functions: fetch, hash, decode, resize.

Nothing here raises for a bad image: every failure comes back as a `Failure`, the row of the
dead-letter table, so one broken object never stops a run of a billion.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from remap_core.data.preprocess import MAX_BYTES, ImageDecodeError, image_for_model
from remap_store.files import redact
from remap_store.schema import stable_id

from pipelines.uris import Source, read_bytes

STAGES = ("list", "fetch", "decode", "embed")


@dataclass
class Failure:
    """Why one URI produced no embedding: the row of the dead-letter table."""

    uri: str
    stage: str        # list | fetch | decode | embed
    error_type: str   # a short tag, e.g. not_found, empty, corrupt, too_large, not_an_image
    message: str
    size: int | None = None       # as listed, for the incremental state
    version: str | None = None
    replaces: bool = False        # an earlier run embedded this URI (its vector is now stale)

    def row(self, run_id: str) -> dict:
        """Credentials in the URI and the message (`user:pass@`, signed-URL signatures) are
        redacted (remap_store.files.redact); the URI's path is kept."""
        return {"uri": redact(self.uri), "stage": self.stage, "error_type": self.error_type,
                "message": redact(self.message)[:2000], "run_id": run_id}

    @property
    def reason(self) -> str:
        return f"{self.stage}.{self.error_type}"


@dataclass
class PreparedImage:
    """A decoded image ready for the network, with the shard columns known before embedding."""

    uri: str
    id: int
    content_sha1: str
    size_bytes: int
    width: int
    height: int
    pixels: np.ndarray  # uint8 (H, W, 3) at the model's input size
    version: str | None = None      # object version as listed (incremental state)
    listed_size: int | None = None  # object size as listed (incremental state)
    metadata: tuple = ()            # (column, value): its URI manifest row's extra columns


def fetch_failure(uri: str, e: BaseException, stage: str = "fetch") -> Failure:
    """Classify a storage error into a dead-letter row."""
    if isinstance(e, FileNotFoundError):
        return Failure(uri, stage, "not_found", str(e) or "no such object")
    if isinstance(e, PermissionError):
        return Failure(uri, stage, "permission_denied", str(e))
    if isinstance(e, IsADirectoryError):
        return Failure(uri, stage, "is_a_directory", str(e))
    return Failure(uri, stage, type(e).__name__, str(e))


def too_large(uri: str, size: int, max_bytes: int) -> Failure:
    return Failure(uri, "fetch", "too_large", f"{size} bytes exceeds the limit of {max_bytes} "
                                              f"bytes")


def fetch(uri: str, max_bytes: int = MAX_BYTES) -> bytes | Failure:
    """The object's bytes; a Failure for a transport error or an object over `max_bytes`
    (never more than `max_bytes` + 1 bytes are read)."""
    try:
        data = read_bytes(uri, max_bytes + 1)
    except Exception as e:  # any transport error: the run goes on, the URI is not lost
        return fetch_failure(uri, e)
    if len(data) > max_bytes:
        return too_large(uri, len(data), max_bytes)
    return data


def prepare(uri: str, data: bytes, max_side: int, multiple: int) -> PreparedImage | Failure:
    """Decode and resize fetched bytes; a failure is returned, never raised."""
    try:
        prepared = image_for_model(data, max_side, multiple)
    except ImageDecodeError as e:
        return Failure(uri, "decode", e.reason, e.message)
    except MemoryError as e:
        return Failure(uri, "decode", "too_large", f"out of memory while decoding: {e}")
    except Exception as e:
        return Failure(uri, "decode", type(e).__name__, str(e))
    return PreparedImage(uri=uri, id=stable_id(uri), content_sha1=hashlib.sha1(data).hexdigest(),
                         size_bytes=len(data), width=prepared.width, height=prepared.height,
                         pixels=prepared.pixels)


def fetch_and_prepare(uri: str, max_side: int, multiple: int) -> PreparedImage | Failure:
    data = fetch(uri)
    if isinstance(data, Failure):
        return data
    return prepare(uri, data, max_side, multiple)


def prepare_source(source: Source, max_side: int, multiple: int) -> PreparedImage | Failure:
    """`fetch_and_prepare` for a listed Source: the result carries its size and version. An
    object listed larger than MAX_BYTES is refused without reading it."""
    if source.size is not None and source.size > MAX_BYTES:
        out = too_large(source.uri, source.size, MAX_BYTES)
    else:
        out = fetch_and_prepare(source.uri, max_side, multiple)
    if isinstance(out, Failure):
        out.size, out.version, out.replaces = source.size, source.version, source.replaces
    else:
        out.version, out.listed_size = source.version, source.size
        out.metadata = source.metadata
    return out
