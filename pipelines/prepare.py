"""Per-image work of the embed pipeline as plain functions: fetch, hash, decode, resize."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from remap_core.preprocess import ImageDecodeError, decode_image, resize_for_model
from remap_core.shard_schema import stable_id

from .uris import read_bytes


@dataclass
class Failure:
    """Why one URI produced no embedding: the row of the dead-letter table."""

    uri: str
    stage: str        # fetch | decode | embed
    error_type: str   # a short tag, e.g. not_found, empty, corrupt, too_large
    message: str

    def row(self, run_id: str) -> dict:
        return {"uri": self.uri, "stage": self.stage, "error_type": self.error_type,
                "message": self.message[:2000], "run_id": run_id}


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


def fetch(uri: str) -> bytes | Failure:
    try:
        return read_bytes(uri)
    except FileNotFoundError as e:
        return Failure(uri, "fetch", "not_found", str(e) or "no such object")
    except PermissionError as e:
        return Failure(uri, "fetch", "permission_denied", str(e))
    except Exception as e:  # any transport error: the run goes on, the URI is not lost
        return Failure(uri, "fetch", type(e).__name__, str(e))


def prepare(uri: str, data: bytes, max_side: int, multiple: int) -> PreparedImage | Failure:
    """Decode and resize fetched bytes; a failure is returned, never raised."""
    try:
        img = decode_image(data)
        pixels = resize_for_model(img, max_side, multiple)
    except ImageDecodeError as e:
        return Failure(uri, "decode", e.reason, e.message)
    except Exception as e:
        return Failure(uri, "decode", type(e).__name__, str(e))
    return PreparedImage(uri=uri, id=stable_id(uri), content_sha1=hashlib.sha1(data).hexdigest(),
                         size_bytes=len(data), width=img.width, height=img.height, pixels=pixels)


def fetch_and_prepare(uri: str, max_side: int, multiple: int) -> PreparedImage | Failure:
    data = fetch(uri)
    if isinstance(data, Failure):
        return data
    return prepare(uri, data, max_side, multiple)
