"""Where image URIs come from: a folder, a glob, or manifest files (txt, csv, parquet).

Plain functions over fsspec, so they work on local paths, gs:// and s3:// alike and are tested
without a pipeline.
"""

from __future__ import annotations

import csv
from typing import Iterable, Iterator, NamedTuple

import fsspec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet", ".lst")


def _unstrip(fs, path: str, original: str) -> str:
    """Give a path back its protocol prefix the way the user wrote it."""
    proto = original.split("://", 1)[0] + "://" if "://" in original else ""
    return proto + path if proto and not path.startswith(proto) else path


def is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_EXTENSIONS)


def expand_input(spec: str) -> tuple[str, list[str]]:
    """Classify an --input: ("images", [uris]) for a folder/glob of images, or
    ("manifests", [paths]) for one or more manifest files (a glob of manifests is allowed)."""
    fs, path = fsspec.core.url_to_fs(spec)
    if any(c in path for c in "*?["):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"--input {spec!r} matched nothing")
        if all(is_manifest(m) for m in matches):
            return "manifests", [_unstrip(fs, m, spec) for m in matches]
        return "images", [_unstrip(fs, m, spec) for m in matches
                          if m.lower().endswith(IMAGE_EXTENSIONS)]
    if not fs.exists(path):
        raise FileNotFoundError(f"--input {spec!r} does not exist")
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        return "images", [_unstrip(fs, f, spec) for f in files]
    if is_manifest(path):
        return "manifests", [spec]
    return "images", [spec]


def read_manifest(path: str) -> Iterator[str]:
    """URIs listed in one manifest: .txt/.lst (one per line), .csv (a `uri` column, or the first
    column), .parquet (a `uri` column). Blank lines and '#' comments are skipped."""
    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if "uri" not in pf.schema_arrow.names:
                raise ValueError(f"manifest {path} has no 'uri' column "
                                 f"(columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["uri"], batch_size=65536):
                yield from (u for u in batch.column(0).to_pylist() if u)
        return
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        if low.endswith(".csv"):
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            col = header.index("uri") if "uri" in header else 0
            if "uri" not in header and header[0].strip():
                yield header[0].strip()
            for row in reader:
                if len(row) > col and row[col].strip():
                    yield row[col].strip()
            return
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def list_uris(spec: str) -> list[str]:
    """Every image URI an --input names (used by the query side and tests; the pipeline reads
    manifests in parallel instead)."""
    kind, items = expand_input(spec)
    if kind == "images":
        return items
    return [u for m in items for u in read_manifest(m)]


def read_bytes(uri: str) -> bytes:
    """All bytes of one object through fsspec."""
    with fsspec.open(uri, "rb") as f:
        return f.read()


def iter_unique(uris: Iterable[str]) -> Iterator[str]:
    seen = set()
    for u in uris:
        if u not in seen:
            seen.add(u)
            yield u


# --------------------------------------------------------------------------- listing with info

class Source(NamedTuple):
    """One image object as listed: URI plus what tells a changed object from an unchanged one.

    `size` and `version` are None when the listing did not say (a manifest line): a Stat step
    fills them in before the store is compared."""

    uri: str
    size: int | None = None
    version: str | None = None
    replaces: bool = False  # an earlier run embedded this URI: a failure now tombstones that

    def signature(self) -> str | None:
        """`size:version`, or None when either is unknown (then the object is always re-read)."""
        if self.size is None or self.version is None:
            return None
        return f"{self.size}:{self.version}"


# Keys of fsspec `info()` dicts that change when an object's bytes change, most specific first.
VERSION_KEYS = ("generation", "ETag", "etag", "md5Hash", "VersionId", "mtime", "LastModified",
                "updated", "created")


def version_of(info: dict) -> str | None:
    """The first object-version field of an fsspec info dict (GCS generation, S3 ETag, mtime)."""
    for key in VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}={value}"
    return None


def source_from_info(info: dict, like: str) -> Source:
    return Source(_unstrip(None, info["name"], like), info.get("size"), version_of(info))


def list_partitions(spec: str) -> list[tuple[str, str]]:
    """Split an --input into independent listing tasks, so listing spreads across workers:
    ("manifest", path) per manifest file, ("dir", path) per top-level sub-folder,
    ("file", uri) per top-level image, ("glob", pattern) for a glob of images."""
    fs, path = fsspec.core.url_to_fs(spec)
    if any(c in path for c in "*?["):
        kind, items = expand_input(spec)
        if kind == "manifests":
            return [("manifest", m) for m in items]
        return [("glob", spec)]
    if not fs.exists(path):
        raise FileNotFoundError(f"--input {spec!r} does not exist; pass a folder, a glob or "
                                f"manifest file(s) of image URIs")
    if not fs.isdir(path):
        return [("manifest", spec)] if is_manifest(path) else [("file", spec)]
    parts = []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = _unstrip(fs, entry["name"].rstrip("/"), spec)
        if entry["type"] == "directory":
            parts.append(("dir", name))
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            parts.append(("file", name))
    return parts


def split_partition(kind: str, arg: str, *rest) -> list[tuple]:
    """Split a listing task further where the file allows: a Parquet manifest becomes one task
    per row group, so one huge manifest is still read by many workers. (Split huge text/CSV
    manifests into several files, or write them as Parquet.)"""
    if kind == "manifest" and arg.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(arg, "rb") as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        return [("manifest_row_group", arg, i) for i in range(groups)]
    return [(kind, arg, *rest)]


def read_manifest_row_group(path: str, index: int) -> list[str]:
    """URIs of one row group of a Parquet manifest."""
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if "uri" not in pf.schema_arrow.names:
            raise ValueError(f"manifest {path} has no 'uri' column "
                             f"(columns: {pf.schema_arrow.names})")
        return [u for u in pf.read_row_group(index, columns=["uri"]).column(0).to_pylist() if u]


def expand_partition(kind: str, arg: str, *rest) -> Iterator[Source]:
    """The image Sources of one listing task from `list_partitions` / `split_partition`."""
    if kind == "manifest":
        for uri in read_manifest(arg):
            yield Source(uri)
        return
    if kind == "manifest_row_group":
        for uri in read_manifest_row_group(arg, *rest):
            yield Source(uri)
        return
    fs, path = fsspec.core.url_to_fs(arg)
    if kind == "file":
        yield source_from_info(fs.info(path), arg)
        return
    found = fs.glob(path, detail=True) if kind == "glob" else fs.find(path, detail=True)
    for name in sorted(found):
        info = found[name]
        if info.get("type", "file") == "file" and name.lower().endswith(IMAGE_EXTENSIONS):
            yield source_from_info({**info, "name": name}, arg)


def stat(source: Source) -> Source:
    """Fill in size and version from the object store (one metadata request; raises
    FileNotFoundError for a missing object)."""
    if source.size is not None and source.version is not None:
        return source
    fs, path = fsspec.core.url_to_fs(source.uri)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{source.uri} is a folder, not an image")
    return Source(source.uri, info.get("size"), version_of(info))


def apply_fsspec_config(config: dict | None) -> None:
    """Merge per-protocol fsspec options (e.g. {"s3": {"endpoint_url": ...}}) into fsspec's
    global config, in this process (called by every worker before it touches storage)."""
    if not config:
        return
    import fsspec.config

    for protocol, kwargs in config.items():
        fsspec.config.conf.setdefault(protocol, {}).update(kwargs)
