"""A persistent local cache of remote indexes, keyed by the manifest's checksums: a remote index
is downloaded once, not at every open.

    CACHE/objects/<sha256>                   one file per content (the manifest's sha256 of it)
    CACHE/indexes/<key>/manifest.json        one folder per manifest (key: sha256 of the manifest
    CACHE/indexes/<key>/<path>               JSON), its files hard links to the objects, laid out
                                             as in the index folder (FAISS finds index.ivfdata
                                             beside index.faiss)

A file's checksum is verified once, when it enters the cache (downloaded to a temporary name,
hashed, then renamed); later opens compare sizes only. Two indexes that share files (an index
shard a nightly did not change) share the object, downloaded once. `prune` removes the folders
of indexes no longer wanted and the objects no folder links to.

The default location is $REMAP_INDEX_CACHE, else ~/.cache/remap/indexes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import fsspec

from index_builder.manifest import MANIFEST_NAME
from remap_store.files import join_url, temporary_name, write_bytes_atomic

log = logging.getLogger(__name__)

CACHE_ENV = "REMAP_INDEX_CACHE"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "remap",
                                                     "indexes")


def manifest_key(manifest: dict) -> str:
    """The cache key of an index: sha256 of its manifest (canonical JSON), 32 hex digits."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest()[:32]


def _download_verified(folder: str, entry: dict, objects: str) -> str:
    """Download `folder/entry.path` into objects/<sha256>, hashing as it streams; refuses a
    file whose size or checksum differs from the manifest's. -> the object path."""
    target = os.path.join(objects, entry["sha256"])
    tmp = temporary_name(target)
    h, size = hashlib.sha256(), 0
    src = join_url(folder, entry["path"])
    try:
        with fsspec.open(src, "rb") as f, open(tmp, "wb") as out:
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                h.update(block)
                size += len(block)
                out.write(block)
        if size != entry["bytes"] or h.hexdigest() != entry["sha256"]:
            raise ValueError(f"index file {src} does not match its manifest checksum (damaged or "
                             f"half-copied); copy or rebuild the index")
        os.replace(tmp, target)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"index file {src} listed in the manifest is missing") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _link(obj: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        if os.path.samefile(obj, path):
            return
        os.remove(path)
    tmp = temporary_name(path)
    try:
        os.link(obj, tmp)
    except OSError:       # a file system without hard links
        shutil.copyfile(obj, tmp)
    os.replace(tmp, path)


def cached_index(folder: str, manifest: dict, entries: list[dict],
                 cache: str | None = None) -> tuple[str, dict]:
    """The local folder in the cache holding `entries` of the index at `folder` (downloading
    only files the cache does not hold). -> (folder, {"cache", "downloaded", "downloaded_bytes",
    "reused", "seconds"})"""
    started = time.time()
    cache = cache or default_cache_dir()
    objects = os.path.join(cache, "objects")
    view = os.path.join(cache, "indexes", manifest_key(manifest))
    os.makedirs(objects, exist_ok=True)
    downloaded, nbytes, reused = [], 0, 0
    for e in entries:
        obj = os.path.join(objects, e["sha256"])
        if os.path.exists(obj) and os.path.getsize(obj) == e["bytes"]:
            reused += 1
        else:
            _download_verified(folder, e, objects)
            downloaded.append(e["path"])
            nbytes += e["bytes"]
        _link(obj, os.path.join(view, e["path"]))
    write_bytes_atomic(os.path.join(view, MANIFEST_NAME), json.dumps(manifest).encode())
    stats = {"cache": view, "downloaded": downloaded, "downloaded_bytes": nbytes,
             "reused": reused, "seconds": round(time.time() - started, 3)}
    if downloaded:
        log.info("cache: %d files (%.1f MiB) of %s downloaded into %s, %d already there",
                 len(downloaded), nbytes / 2**20, folder, view, reused)
    return view, stats


def prune(cache: str | None = None, keep: list[str] = ()) -> int:
    """Remove the cached index folders not in `keep` (folders cached_index returned) and the
    objects no remaining folder links to. -> bytes freed. Files an open index maps stay
    readable until it is closed (the OS keeps removed files while they are mapped)."""
    cache = cache or default_cache_dir()
    keep = {os.path.abspath(k) for k in keep}
    root = os.path.join(cache, "indexes")
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.abspath(os.path.join(root, name))
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    freed = 0
    objects = os.path.join(cache, "objects")
    for name in os.listdir(objects) if os.path.isdir(objects) else []:
        path = os.path.join(objects, name)
        st = os.stat(path)
        if st.st_nlink <= 1:        # no index folder links to it (copies: see _link)
            freed += st.st_size
            os.remove(path)
    return freed
