"""The index manifest (DESIGN.md §4): written last and atomically; verified on open."""

from __future__ import annotations

import hashlib
import json

import fsspec

from remap_store.files import join_url, write_json_atomic

MANIFEST_NAME = "manifest.json"
# 2: adds `id_map` (the id-sorted, memory-mappable id -> URI/metadata map, index_builder.id_map).
# 3: as 2, and a `shards` index whose IVF shards hold only inverted lists and share
#    `quantizer_file` (the trained quantizer stored once).
# Version 1 manifests (no id_map; readers use the per-shard id_files) are still read.
FORMAT_VERSION = 2
SHARED_QUANTIZER_VERSION = 3
READ_VERSIONS = (1, 2, 3)


def file_sha256(path: str, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of any fsspec file, streamed."""
    h, size = hashlib.sha256(), 0
    with fsspec.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size


def file_entry(folder: str, name: str) -> dict:
    sha, size = file_sha256(join_url(folder, name))
    return {"path": name, "bytes": size, "sha256": sha}


def write_manifest(folder: str, manifest: dict) -> str:
    """Write `manifest.json` into `folder` via a temporary name and rename (atomic locally).
    -> its path as fsspec names it."""
    fs, root = fsspec.core.url_to_fs(folder)
    version = SHARED_QUANTIZER_VERSION if manifest.get("quantizer_file") else FORMAT_VERSION
    write_json_atomic(join_url(folder, MANIFEST_NAME), {"format_version": version, **manifest})
    return join_url(root, MANIFEST_NAME)


def read_manifest(folder: str) -> dict:
    path = join_url(folder, MANIFEST_NAME)
    try:
        with fsspec.open(path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no index at {folder}: {MANIFEST_NAME} is missing (the build did "
                                f"not finish, or the path is wrong)") from e
    except NotADirectoryError:
        raise FileNotFoundError(f"no index at {folder}: it is a file, not an index folder "
                                f"(pass --index the folder `remap index --output` wrote)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); the index was cut short "
                         f"while copied or written: copy it again, or rebuild it with "
                         f"`remap index`") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not an index manifest (a JSON object); copy the index "
                         f"again, or rebuild it with `remap index`")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"index at {folder} has manifest format {manifest.get('format_version')}, "
                         f"this library reads {', '.join(map(str, READ_VERSIONS))}; rebuild or "
                         f"upgrade remap")
    return manifest


def manifest_files(manifest: dict) -> list[dict]:
    """Every file entry the manifest lists (index files, id files, id map, re-ranking vectors),
    once each."""
    seen, out = set(), []
    refine = [manifest["refine"]["file"]] if manifest.get("refine") else []
    for e in manifest["index_files"] + manifest["id_files"] + manifest.get("id_map", []) + refine:
        if e["path"] not in seen:
            seen.add(e["path"])
            out.append(e)
    return out


def reader_files(manifest: dict) -> list[dict]:
    """The file entries a query reader needs: the index files and the id map (format 2), or the
    per-shard id files (format 1, no id map), and the re-ranking vectors when the index has them."""
    refine = [manifest["refine"]["file"]] if manifest.get("refine") else []
    return manifest["index_files"] + (manifest.get("id_map") or manifest["id_files"]) + refine


def verify_files(folder: str, entries: list[dict]) -> None:
    """Refuse an index whose files are missing or differ from the manifest's checksums."""
    for e in entries:
        path = join_url(folder, e["path"])
        try:
            sha, size = file_sha256(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"index file {path} listed in the manifest is missing") from err
        if size != e["bytes"] or sha != e["sha256"]:
            raise ValueError(f"index file {path} does not match its manifest checksum "
                             f"(damaged or half-copied); copy or rebuild the index")
