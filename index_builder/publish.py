"""Copy a locally built index folder to object storage (gs://, s3://, any fsspec URL).

FAISS builds and merges in local files, so `remap index --output gs://...` builds in a local
staging folder and then uploads it here. The order is what keeps readers safe:

1. the destination's old `manifest.json` (if any) is deleted first: from then on a reader finds
   no index there (a clear "no index" error), never an old manifest over new files;
2. the files the new manifest lists are uploaded, and each uploaded size checked;
3. files of an earlier index that the new manifest does not list are deleted;
4. `manifest.json` is uploaded last: a reader that sees it sees every file it names.

A failed upload leaves no manifest at the destination; running it again completes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Callable

import fsspec

from index_builder.manifest import MANIFEST_NAME, manifest_files
from remap_store.files import atomic_open, join_url, redact

log = logging.getLogger(__name__)


def upload_file(local: str, url: str) -> int:
    """Copy one local file to `url` (any fsspec URL) through a temporary name beside it, so a
    killed or retried writer never leaves half a file under the final name. -> bytes"""
    with open(local, "rb") as src, atomic_open(url, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return os.path.getsize(local)


def upload_index(local: str, dest: str, keep: tuple[str, ...] = ()) -> dict:
    """Upload the index built in the local folder `local` to `dest`, manifest last. Files under
    `dest` whose relative path starts with one of `keep` are not removed as stale.
    -> {"to", "uploaded" (files), "bytes", "removed" (stale files of an earlier index)}"""
    manifest_path = os.path.join(local, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"{local} has no {MANIFEST_NAME}: the build did not finish")
    with open(manifest_path) as f:
        manifest = json.load(f)
    # the files the manifest names (index files, then id files, once each) and their sizes
    sizes = {e["path"]: e["bytes"] for e in manifest_files(manifest)}
    files = list(sizes)
    fs, root = fsspec.core.url_to_fs(dest)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    if fs.exists(join_url(root, MANIFEST_NAME)):
        fs.rm(join_url(root, MANIFEST_NAME))
    total = 0
    for rel in files:
        target = join_url(root, rel)
        if "file" in fs.protocol:        # a local destination: make the sub-folders
            os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.put_file(os.path.join(local, rel), target)
        fs.invalidate_cache(target)
        got = fs.info(target)["size"]
        if got != sizes[rel]:
            raise OSError(f"uploaded {target} has {got} bytes, the manifest says {sizes[rel]}; "
                          f"the upload was cut short: run it again")
        total += got
    fs.invalidate_cache(root)
    stale = sorted(rel for rel in {p[len(root):].lstrip("/") for p in fs.find(root)}
                   - set(files) - {MANIFEST_NAME} if not rel.startswith(keep))
    for rel in stale:
        fs.rm(join_url(root, rel))
    fs.put_file(manifest_path, join_url(root, MANIFEST_NAME))
    fs.invalidate_cache(root)
    return {"to": dest, "uploaded": len(files) + 1,
            "bytes": total + os.path.getsize(manifest_path), "removed": len(stale)}


def build_and_upload(build: Callable[[str], dict], dest: str, staging: str | None = None
                     ) -> tuple[dict, dict]:
    """Run `build(local_folder)` in `staging` (default: a temporary folder, removed after),
    then upload the folder's index to `dest`, manifest last. -> (manifest, upload summary)"""
    folder = staging or tempfile.mkdtemp(prefix="remap-index-")
    try:
        manifest = build(folder)
        log.info("upload: %s -> %s (manifest.json last)", folder, redact(dest))
        summary = upload_index(folder, dest)
        log.info("upload: %d files, %.1f MiB, %d stale files of an earlier index removed",
                 summary["uploaded"], summary["bytes"] / 2**20, summary["removed"])
        return manifest, summary
    finally:
        if staging is None:
            shutil.rmtree(folder, ignore_errors=True)
