"""Where image URIs come from: a folder, a glob, or URI lists (txt, csv, parquet files naming
image URIs; not to be confused with an index's manifest).

Plain functions over fsspec, so they work on local paths, gs:// and s3:// alike and are tested
without a pipeline.
"""

from __future__ import annotations

import csv
from typing import Iterable, Iterator, NamedTuple

import fsspec

from remap_store.files import normalize_uri, with_protocol

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
URI_LIST_EXTENSIONS = (".txt", ".csv", ".parquet", ".lst")


def is_uri_list(path: str) -> bool:
    return path.lower().endswith(URI_LIST_EXTENSIONS)


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)




def _is_glob(fs, path: str) -> bool:
    """A path with `*`, `?` or `[` is a glob unless it exists: a path that exists is a path
    (`photos [2024]`, `what?`)."""
    return any(c in path for c in "*?[") and not fs.exists(path)


def expand_input(spec: str) -> tuple[str, list[str]]:
    """Classify an --input: ("images", [uris]) for a folder/glob of images, or
    ("uri_lists", [paths]) for one or more URI lists (a glob of them is allowed).
    An existing path is taken literally even when its name has `*`, `?` or `[`."""
    fs, path = fsspec.core.url_to_fs(spec)
    if _is_glob(fs, path):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"--input {spec!r} matched nothing")
        if all(is_uri_list(m) for m in matches):
            return "uri_lists", [with_protocol(spec, m) for m in matches]
        return "images", [normalize_uri(with_protocol(spec, m)) for m in matches
                          if is_image_name(m)]
    if not fs.exists(path):
        raise FileNotFoundError(f"--input {spec!r} does not exist")
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if is_image_name(f))
        return "images", [normalize_uri(with_protocol(spec, f)) for f in files]
    if is_uri_list(path):
        return "uri_lists", [spec]
    return "images", [normalize_uri(spec)]


def _extra_column(name: str) -> bool:
    """A URI manifest column other than `uri` that travels to the shards: not an unnamed CSV
    column (a spreadsheet's row numbers) nor a pandas index (`__index_level_0__`)."""
    return name != "uri" and name != "" and not name.startswith("__index_level_")


def _check_unique(path: str, names: list[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"URI list {path} has two columns named {n!r}; rename one")
        seen.add(n)


def manifest_fields(path: str) -> list:
    """The extra columns of one URI list (pa.Field each, in the file's order) that travel into
    the embedding shards: a .parquet list's columns besides `uri`, with their Parquet types; a
    .csv list's header names besides `uri`, all strings (CSV values are not type-inferred);
    none for .txt/.lst. A list without a `uri` column is refused (ValueError)."""
    import pyarrow as pa

    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            schema = pq.ParquetFile(f, pre_buffer=False).schema_arrow
        if "uri" not in schema.names:
            raise ValueError(f"URI list {path} has no 'uri' column (columns: {schema.names})")
        fields = [f for f in schema if _extra_column(f.name)]
    elif low.endswith(".csv"):
        with fsspec.open(path, "rt", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
        names = [h.strip() for h in header or []]
        if header is not None and "uri" not in names:
            raise ValueError(f"URI list {path} has no 'uri' column (header: {names}); a .csv "
                             f"URI list starts with a header row naming a 'uri' column")
        fields = [pa.field(n, pa.string()) for n in names if _extra_column(n)]
    else:
        return []
    _check_unique(path, [f.name for f in fields])
    return fields


def partition_manifest_fields(parts: list[tuple]) -> list:
    """The extra columns of every URI list among listing tasks (`list_partitions`), merged: a
    column in several lists once, in first-seen order; one column with two types in two lists
    is refused, naming it."""
    merged: dict = {}
    for part in parts:
        if part[0] != "uri_list":
            continue
        for f in manifest_fields(part[1]):
            seen = merged.setdefault(f.name, (f, part[1]))
            if seen[0].type != f.type:
                raise ValueError(f"column {f.name!r} is {seen[0].type} in URI list {seen[1]} but "
                                 f"{f.type} in {part[1]}; give it one type in every list")
    return [f for f, _ in merged.values()]


def read_manifest_rows(path: str) -> Iterator[tuple[str, tuple]]:
    """(uri, extra columns) of every entry of one URI list, as written: .txt/.lst (one URI per
    line; blank lines and '#' comments skipped; no extra columns), .csv (a header row with a
    `uri` column; the other cells as strings, a missing cell None), .parquet (a `uri` column;
    the other columns' values). Extra columns are a tuple of (name, value) pairs
    (`manifest_fields` names them). Rows with an empty URI are skipped."""
    low = path.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f, pre_buffer=False)
            for i in range(pf.metadata.num_row_groups):
                yield from _parquet_rows(path, pf, i)
        return
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
    with fsspec.open(path, "rt", encoding="utf-8-sig") as f:
        if low.endswith(".csv"):
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            names = [h.strip() for h in header]
            if "uri" not in names:
                raise ValueError(f"URI list {path} has no 'uri' column (header: {names}); a "
                                 f".csv URI list starts with a header row naming a 'uri' column")
            _check_unique(path, [n for n in names if _extra_column(n)])
            col = names.index("uri")
            extra = [(j, n) for j, n in enumerate(names) if _extra_column(n)]
            for row in reader:
                if len(row) > col and row[col].strip():
                    yield row[col].strip(), tuple((n, row[j] if j < len(row) else None)
                                                  for j, n in extra)
            return
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line, ()


def _parquet_rows(path: str, pf, index: int) -> Iterator[tuple[str, tuple]]:
    names = pf.schema_arrow.names
    if "uri" not in names:
        raise ValueError(f"URI list {path} has no 'uri' column (columns: {names})")
    extra = [n for n in names if _extra_column(n)]
    cols = pf.read_row_group(index, columns=["uri", *extra]).to_pydict()
    for j, uri in enumerate(cols["uri"]):
        if uri:
            yield uri, tuple((n, cols[n][j]) for n in extra)


def read_uri_list(path: str) -> Iterator[str]:
    """URIs listed in one URI list, as written (see read_manifest_rows). A .csv or .parquet URI
    list without a `uri` column is refused (ValueError)."""
    for uri, _ in read_manifest_rows(path):
        yield uri


def list_uris(spec: str) -> list[str]:
    """Every image URI an --input names (used by the query side and tests; the pipeline reads
    URI lists in parallel instead)."""
    kind, items = expand_input(spec)
    if kind == "images":
        return items
    return [normalize_uri(u) for m in items for u in read_uri_list(m)]


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """All bytes of one object through fsspec (at most `limit` of them when given)."""
    with fsspec.open(uri, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def iter_unique(uris: Iterable[str]) -> Iterator[str]:
    seen = set()
    for u in uris:
        if u not in seen:
            seen.add(u)
            yield u


# --------------------------------------------------------------------------- listing with info

class Source(NamedTuple):
    """One image object as listed: URI plus what tells a changed object from an unchanged one.

    `size` and `version` are None when the listing did not say (a URI-list line): a Stat step
    fills them in before the store is compared."""

    uri: str
    size: int | None = None
    version: str | None = None
    replaces: bool = False  # an earlier run embedded this URI: a failure now tombstones that
    metadata: tuple = ()    # (column, value) pairs: the URI manifest row's extra columns

    def metadata_sha1(self) -> str | None:
        """A digest of `metadata` (None without any): a change re-embeds an unchanged image, so
        its shard row carries the new values."""
        return metadata_sha1(self.metadata)

    def signature(self) -> str | None:
        """`size:version`, or None when either is unknown (then the object is always re-read)."""
        if self.size is None or self.version is None:
            return None
        return f"{self.size}:{self.version}"


def metadata_sha1(metadata: tuple) -> str | None:
    if not metadata:
        return None
    import hashlib
    import json

    text = json.dumps(sorted(metadata), default=str, ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


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


class NotAnImage(NamedTuple):
    """A file a folder or glob listing met whose name has no image extension: not read, counted
    (`listed_not_images` in run.json)."""

    uri: str


def source_from_info(info: dict, like: str) -> Source:
    return Source(normalize_uri(with_protocol(like, info["name"])), info.get("size"),
                  version_of(info))


def list_partitions(spec: str) -> list[tuple[str, str]]:
    """Split an --input into independent listing tasks, so listing spreads across workers:
    ("uri_list", path) per URI list file, ("dir", path) per top-level sub-folder,
    ("file", uri) per top-level image, ("glob", pattern) for a glob of images, ("other", uri)
    per top-level file that is not an image (counted, not read). No task names an image when
    the input holds none (e.g. `[]` for an empty folder). An existing path is never a glob."""
    fs, path = fsspec.core.url_to_fs(spec)
    if _is_glob(fs, path):
        kind, items = expand_input(spec)
        if kind == "uri_lists":
            return [("uri_list", m) for m in items]
        if items:
            return [("glob", spec)]
        return [("other", with_protocol(spec, m)) for m in sorted(fs.glob(path))
                if fs.isfile(m)]
    if not fs.exists(path):
        raise FileNotFoundError(f"--input {spec!r} does not exist; pass a folder, a glob or "
                                f"URI list file(s) of image URIs")
    if not fs.isdir(path):
        return [("uri_list", spec)] if is_uri_list(path) else [("file", spec)]
    parts = []
    for entry in sorted(fs.ls(path, detail=True), key=lambda e: e["name"]):
        name = with_protocol(spec, entry["name"].rstrip("/"))
        if entry["type"] == "directory":
            parts.append(("dir", name))
        else:
            parts.append(("file" if is_image_name(name) else "other", name))
    return parts


def lists_no_image(parts: list[tuple]) -> bool:
    """True when listing tasks from `list_partitions` can yield no image at all (an empty
    folder, one of only non-image files): known before anything runs."""
    return all(p[0] == "other" for p in parts)


def split_partition(kind: str, arg: str, *rest) -> list[tuple]:
    """Split a listing task further where the file allows: a Parquet URI list becomes one task
    per row group, so one huge URI list is still read by many workers. (Split huge text/CSV
    URI lists into several files, or write them as Parquet.)"""
    if kind == "uri_list" and arg.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(arg, "rb") as f:
            groups = pq.ParquetFile(f, pre_buffer=False).metadata.num_row_groups
        return [("uri_list_row_group", arg, i) for i in range(groups)]
    return [(kind, arg, *rest)]


def read_uri_list_row_group(path: str, index: int) -> list[tuple[str, tuple]]:
    """(uri, extra columns) of one row group of a Parquet URI list (see read_manifest_rows)."""
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        return list(_parquet_rows(path, pq.ParquetFile(f, pre_buffer=False), index))


def expand_partition(kind: str, arg: str, *rest,
                     with_others: bool = False) -> Iterator[Source | NotAnImage]:
    """The image Sources of one listing task from `list_partitions` / `split_partition`, local
    paths normalised (`normalize_uri`). `with_others`: also a NotAnImage for each file of a
    folder or glob whose name is not an image's."""
    if kind == "uri_list":
        for uri, metadata in read_manifest_rows(arg):
            yield Source(normalize_uri(uri), metadata=metadata)
        return
    if kind == "uri_list_row_group":
        for uri, metadata in read_uri_list_row_group(arg, *rest):
            yield Source(normalize_uri(uri), metadata=metadata)
        return
    if kind == "other":
        if with_others:
            yield NotAnImage(normalize_uri(arg))
        return
    fs, path = fsspec.core.url_to_fs(arg)
    if kind == "file":
        yield source_from_info(fs.info(path), arg)
        return
    found = fs.glob(path, detail=True) if kind == "glob" else fs.find(path, detail=True)
    for name in sorted(found):
        info = found[name]
        if info.get("type", "file") != "file":
            continue
        if is_image_name(name):
            yield source_from_info({**info, "name": name}, arg)
        elif with_others:
            yield NotAnImage(normalize_uri(with_protocol(arg, name)))


def stat(source: Source) -> Source:
    """Fill in size and version from the object store (one metadata request; raises
    FileNotFoundError for a missing object)."""
    if source.size is not None and source.version is not None:
        return source
    fs, path = fsspec.core.url_to_fs(source.uri)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{source.uri} is a folder, not an image")
    return source._replace(size=info.get("size"), version=version_of(info))


def apply_fsspec_config(config: dict | None) -> None:
    """Merge per-protocol fsspec options (e.g. {"s3": {"endpoint_url": ...}}) into fsspec's
    global config, in this process (called by every worker before it touches storage)."""
    if not config:
        return
    import fsspec.config

    for protocol, kwargs in config.items():
        fsspec.config.conf.setdefault(protocol, {}).update(kwargs)
