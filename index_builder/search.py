"""The thin query library: open a built index (local or object storage), search it with vectors
or images, get URIs with scores back.

Imports neither Beam nor torch; torch (via remap_core) is imported only when a query image must
be embedded.

    idx = open_index("gs://bucket/indexes/2026-11-23")
    for hit in idx.search_images(["query.jpg"], k=10)[0]:
        print(hit.rank, hit.score, hit.uri)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import faiss
import fsspec
import numpy as np
import pyarrow.parquet as pq

from index_builder.id_map import IdMap
from index_builder.manifest import MANIFEST_NAME, read_manifest, verify_files
from index_builder.merge import (merge_in_memory, read_ondisk, set_search_params,
                                 sharded_index)
from remap_store.files import join_url


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    uri: str
    score: float

    def as_dict(self) -> dict:
        return {"rank": self.rank, "id": self.id, "uri": self.uri, "score": self.score}


class FingerprintMismatch(ValueError):
    """The query model differs from the model the index was built with."""


class QueryImageError(ValueError):
    """One query image that cannot be read or decoded; names the image and the reason."""

    def __init__(self, query: str, reason: str):
        super().__init__(f"query image {query}: {reason}")
        self.query, self.reason = query, reason


def _read_local(folder: str, name: str, tmp: str) -> str:
    """A local path for `folder/name`: the file itself when local, else a downloaded copy."""
    src = join_url(folder, name)
    fs, path = fsspec.core.url_to_fs(src)
    if "file" in fs.protocol:  # a str or a tuple of names, e.g. ("file", "local")
        return path
    local = os.path.join(tmp, name.replace("/", "_"))
    fs.get_file(path, local)
    return local


class RemapIndex:
    """A built index: FAISS index + id->URI map + manifest."""

    def __init__(self, folder: str, manifest: dict, index: faiss.Index, id_map: IdMap):
        self.folder, self.manifest, self.index = folder, manifest, index
        self.id_map = id_map
        self._model = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str, verify: bool = True) -> "RemapIndex":
        """Load manifest, index and id map; with `verify`, refuse files whose checksums differ."""
        manifest = read_manifest(folder)
        if verify:
            verify_files(folder, manifest["index_files"] + manifest["id_files"])
        with tempfile.TemporaryDirectory() as tmp:
            index = read_faiss_index(folder, manifest, tmp)
            tables = [pq.read_table(_read_local(folder, e["path"], tmp))
                      for e in manifest["id_files"]]
        id_map = IdMap.from_tables(tables)
        if index.d != manifest["dimension"]:
            raise ValueError(f"index at {folder} has dimension {index.d} but its manifest says "
                             f"{manifest['dimension']}; the index is damaged, rebuild it")
        set_search_params(index, manifest.get("search_params") or {})
        return cls(folder, manifest, index, id_map)

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]

    @property
    def dimension(self) -> int:
        return int(self.manifest["dimension"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    # ---------------------------------------------------------------- searching
    def uri_of(self, ids: np.ndarray) -> list[str | None]:
        return self.id_map.lookup(ids)

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """(Q, D) query descriptors -> for each query, up to k hits, best first."""
        xq = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if xq.ndim != 2 or xq.shape[1] != self.dimension:
            raise ValueError(f"query vectors have shape {xq.shape}, this index takes (Q, "
                             f"{self.dimension}) vectors from model {self.fingerprint}")
        if not np.isfinite(xq).all():
            raise ValueError("query vectors contain NaN or infinity")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores, ids = self.index.search(xq, min(k, max(len(self), 1)))
        out = []
        for srow, irow in zip(scores, ids):
            keep = irow != -1
            uris = self.uri_of(irow[keep])
            out.append([Hit(r + 1, int(i), u, float(s))
                        for r, (i, u, s) in enumerate(zip(irow[keep], uris, srow[keep]))])
        return out

    def model(self, model_uri: str | None = "manifest"):
        """The query model (loaded once); refuses one whose fingerprint differs from the index."""
        if self._model is None:
            from remap_core.descriptor.checkpoint import load_model

            uri = self.manifest.get("model_uri") if model_uri == "manifest" else model_uri
            model = load_model(uri)
            if model.fingerprint != self.fingerprint:
                raise FingerprintMismatch(
                    f"index built with model {self.fingerprint} but query model is "
                    f"{model.fingerprint}; pass --model with the checkpoint used to embed the "
                    f"collection, or rebuild the index with this model")
            self._model = model
        return self._model

    def embed_images(self, images, model_uri: str | None = "manifest", denoise: bool = False,
                     autocontrast: bool = False) -> np.ndarray:
        """Paths/URLs or bytes of query images -> (Q, D) descriptors, prepared like the shards.
        Raises QueryImageError naming the first image that cannot be read or decoded."""
        vectors, errors = self._embed_each(images, model_uri, denoise, autocontrast)
        if errors:
            raise next(iter(errors.values()))
        return vectors

    def search_images(self, images, k: int = 10, model_uri: str | None = "manifest",
                      errors: str = "raise", **prep) -> list:
        """Query images -> for each, up to k hits, best first.

        A query image that cannot be read or decoded raises QueryImageError (naming it) by
        default; with errors="return" the other queries are still answered and that query's
        entry is its QueryImageError instead of a hit list. A problem with the whole search
        (the index, the query model) always raises."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        images = list(images)
        vectors, failed = self._embed_each(images, model_uri, **prep)
        if failed and errors == "raise":
            raise next(iter(failed.values()))
        hits = iter(self.search_vectors(vectors, k) if len(vectors) else [])
        return [failed[i] if i in failed else next(hits) for i in range(len(images))]

    def _embed_each(self, images, model_uri, denoise: bool = False, autocontrast: bool = False
                    ) -> tuple[np.ndarray, dict[int, QueryImageError]]:
        """-> ((G, D) descriptors of the images that could be prepared, in order;
        {position: QueryImageError} of those that could not)."""
        from remap_core.data.preprocess import decode_image, enhance_query, resize_for_model

        model = self.model(model_uri)
        arrays, failed = [], {}
        for i, im in enumerate(images):
            name = f"<bytes #{i}>" if isinstance(im, (bytes, bytearray)) else str(im)
            try:
                data = im if isinstance(im, (bytes, bytearray)) else _read_bytes(im)
                img = enhance_query(decode_image(bytes(data)), denoise, autocontrast)
            except QueryImageError as e:
                failed[i] = e
                continue
            except ValueError as e:  # ImageDecodeError: "<reason>: <message>"
                failed[i] = QueryImageError(name, f"not a readable image ({e})")
                continue
            arrays.append(resize_for_model(img, model.config["max_side"], model.config["multiple"]))
        if not arrays:
            return np.zeros((0, self.dimension), np.float32), failed
        return model.embed_arrays(arrays), failed


def _read_bytes(uri: str) -> bytes:
    """The bytes of one query image; QueryImageError naming it when they cannot be read."""
    folder = QueryImageError(uri, "is a folder, not an image; pass the images in it (e.g. "
                                  f"{uri.rstrip('/')}/*.jpg)")
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise folder from None
    except FileNotFoundError:
        if fs.isdir(path):  # object stores: a "folder" is a prefix, not a file
            raise folder from None
        raise QueryImageError(uri, "not found") from None
    except PermissionError:
        raise QueryImageError(uri, "permission denied") from None
    except OSError as e:
        raise QueryImageError(uri, f"cannot be read ({e.strerror or e})") from None


def read_faiss_index(folder: str, manifest: dict, tmp: str) -> faiss.Index:
    """The FAISS index named by the manifest, in any of its layouts:

    single  one file (`index_files[0]`), read into memory;
    ondisk  an IVF index file + its .ivfdata inverted lists, memory-mapped (not read) when the
            folder is local, downloaded into `tmp` first when it is not;
    shards  N index files searched together (merge.ShardedIndex, results merged by score); when
            the manifest names a `quantizer_file` (IVF shards written without their quantizer) the
            shards are joined into that one trained index (merge.merge_in_memory)."""
    layout = manifest.get("layout", "single")
    entries = manifest["index_files"]
    if layout == "single":
        if len(entries) != 1:
            raise ValueError(f"index at {folder} lists {len(entries)} index files for the single "
                             f"layout; the manifest is damaged, rebuild the index")
        return faiss.read_index(_read_local(folder, entries[0]["path"], tmp))
    if layout == "ondisk":
        main = [e for e in entries if not e["path"].endswith(".ivfdata")]
        data = [e for e in entries if e["path"].endswith(".ivfdata")]
        if len(main) != 1 or len(data) != 1:
            raise ValueError(f"index at {folder}: the ondisk layout needs one index file and one "
                             f".ivfdata file; the manifest lists {[e['path'] for e in entries]}")
        local = _read_local(folder, main[0]["path"], tmp)
        data_local = _read_local(folder, data[0]["path"], tmp)
        if os.path.dirname(os.path.abspath(local)) != os.path.dirname(os.path.abspath(data_local)) \
                or os.path.basename(data_local) != os.path.splitext(os.path.basename(local))[0] + ".ivfdata":
            raise ValueError(f"index at {folder}: {data[0]['path']} must sit beside "
                             f"{main[0]['path']} with the same stem")
        return read_ondisk(local)
    if layout == "shards":
        if not entries:
            raise ValueError(f"index at {folder} lists no index shards; rebuild it")
        shared = manifest.get("quantizer_file")
        if shared:
            return merge_in_memory([_read_local(folder, e["path"], tmp) for e in entries
                                    if e["path"] != shared], _read_local(folder, shared, tmp))
        return sharded_index([faiss.read_index(_read_local(folder, e["path"], tmp))
                              for e in entries])
    raise ValueError(f"index at {folder} has layout {layout!r}, which this version of remap "
                     f"does not read; upgrade remap")


POINTER = "CURRENT"


def resolve_index_folder(folder: str) -> str:
    """The index folder `folder` names: itself when it holds a manifest, else the index its
    `CURRENT` pointer file names (one line, the published index's URL, as the nightly re-index
    writes it at an index root). Resolved once per open, so a reader sees one whole index."""
    fs, root = fsspec.core.url_to_fs(folder)
    if fs.exists(join_url(root, MANIFEST_NAME)) or not fs.exists(join_url(root, POINTER)):
        return folder
    target = fs.cat_file(join_url(root, POINTER)).decode("utf-8").strip()
    if not target:
        raise ValueError(f"{folder}/{POINTER} is empty: no index has been published there yet")
    return target


def open_index(folder: str, verify: bool = True) -> RemapIndex:
    """Open a built index from a local folder or an fsspec URL, or the index that an index
    root's `CURRENT` pointer names."""
    return RemapIndex.open(resolve_index_folder(folder), verify)
