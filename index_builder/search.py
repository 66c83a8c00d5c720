"""The thin query library: open a built index (local or object storage), search it with vectors
or images, get URIs with scores back.

Imports neither Beam nor torch; torch (via remap_core) is imported only when a query image must
be embedded.

    idx = open_index("gs://bucket/indexes/2026-11-23")
    for hit in idx.search_images(["query.jpg"], k=10)[0]:
        print(hit.rank, hit.score, hit.uri, hit.metadata)

Opening: a local folder is read in place; a remote one through a persistent local cache keyed by
the manifest's checksums (index_builder.cache: downloaded and verified once). The `single` and
`shards` index files are memory-mapped read-only (faiss IO_FLAG_MMAP_IFC), the `ondisk` lists
too, and the id -> URI/metadata map of a format-2 index is memory-mapped (index_builder.id_map):
a reader's memory does not grow with the number of URIs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index_builder.cache import cached_index
from index_builder.id_map import IdMap
from index_builder.manifest import MANIFEST_NAME, read_manifest, reader_files, verify_files
from index_builder.refine import RefinedIndex, open_refine_vectors, unwrap
from index_builder.train import hnsw_quantizer
from index_builder.merge import (ShardedIndex, merge_in_memory, read_ondisk, set_search_params,
                                 sharded_index)
from remap_store.files import join_url

log = logging.getLogger(__name__)

# FAISS reads index files with the codes mapped in place, read-only (no copy in memory)
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    uri: str
    score: float
    metadata: dict = field(default_factory=dict)   # content_sha1, width, height, URI-list columns

    def as_dict(self) -> dict:
        out = {"rank": self.rank, "id": self.id, "uri": self.uri, "score": self.score}
        if self.metadata:
            out["metadata"] = self.metadata
        return out


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


def local_folder(folder: str) -> str | None:
    """The local path of `folder`, None when it is remote (gs://, s3://, ...)."""
    fs, path = fsspec.core.url_to_fs(folder)
    return path if "file" in fs.protocol else None


class RemapIndex:
    """A built index: FAISS index + id->URI map + manifest."""

    def __init__(self, folder: str, manifest: dict, index: faiss.Index, id_map: IdMap,
                 open_stats: dict | None = None):
        self.folder, self.manifest, self.index = folder, manifest, index
        self.id_map = id_map
        self.open_stats = open_stats or {}
        self._model = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str, verify: bool = True, cache: str | bool | None = None,
             mmap: bool = True) -> "RemapIndex":
        """Load manifest, index and id map.

        A local folder is read in place (with `verify`, files whose checksums differ are
        refused). A remote folder goes through the local cache `cache` (default
        index_builder.cache.default_cache_dir(); False: download into a temporary folder and
        read into memory), where each file is verified once, when it is downloaded. With `mmap`,
        index files and the id map are memory-mapped where they are local."""
        started = time.time()
        manifest = read_manifest(folder)
        entries = reader_files(manifest)
        local, stats = local_folder(folder), {}
        if local is None and cache is not False:
            local, stats = cached_index(folder, manifest, entries,
                                        cache if isinstance(cache, str) else None)
        elif local is not None and verify:
            verify_files(folder, entries)
        refine = manifest.get("refine")
        vectors = None
        if local is not None:
            index = read_faiss_index(local, manifest, local, mmap=mmap)
            id_map = _open_id_map(local, manifest, mapped=mmap)
            if refine:
                vectors = open_refine_vectors(local, mapped=mmap, name=refine["file"]["path"])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                if verify:
                    verify_files(folder, entries)
                index = read_faiss_index(folder, manifest, tmp)
                for e in manifest.get("id_map", []):
                    _read_local(folder, e["path"], tmp)
                id_map = _open_id_map(tmp, manifest, mapped=False, remote=folder)
                if refine:
                    path = _read_local(folder, refine["file"]["path"], tmp)
                    vectors = open_refine_vectors(os.path.dirname(path), mapped=False,
                                                  name=os.path.basename(path))
        if index.d != manifest["dimension"]:
            raise ValueError(f"index at {folder} has dimension {index.d} but its manifest says "
                             f"{manifest['dimension']}; the index is damaged, rebuild it")
        set_search_params(index, manifest.get("search_params") or {})
        if refine:      # candidates re-ranked on the stored vectors (index_builder.refine)
            index = RefinedIndex(index, np.asarray(id_map.ids), vectors, refine["k_factor"])
        stats = {**stats, "mmap": bool(mmap and local is not None),
                 "open_seconds": round(time.time() - started, 3)}
        return cls(folder, manifest, index, id_map, stats)

    @property
    def version(self) -> str:
        """What tells one build from another: the manifest's `built_at`, else the folder."""
        return str(self.manifest.get("built_at") or self.folder)

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

    def search_vectors(self, vectors: np.ndarray, k: int = 10, filters: dict | None = None,
                       dedupe: bool = False, qe: int | None = None,
                       qe_alpha: float | None = None) -> list[list[Hit]]:
        """(Q, D) query descriptors -> for each query, up to k hits, best first.

        `filters` {column: value or [values]}: only hits whose metadata column holds one of the
        values (several columns: all must match), applied inside the FAISS search (an id
        selector), so k hits come back whenever k match among the probed lists. `dedupe`:
        hits with the same bytes (`content_sha1`) are kept once, the best.
        `qe`: alpha query expansion (`index_builder.rerank`) over the top `qe` results of a
        first, unfiltered search, weighted by score ** qe_alpha; 0 turns it off; None: the
        index's default (its manifest's `rerank.qe`: 2 for indexes built since it became the
        default; a manifest without `rerank` means 0). `qe_alpha` None: the manifest's
        `rerank.qe_alpha`, else 3. The reported scores are those of the expanded query."""
        xq = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if xq.ndim != 2 or xq.shape[1] != self.dimension:
            raise ValueError(f"query vectors have shape {xq.shape}, this index takes (Q, "
                             f"{self.dimension}) vectors from model {self.fingerprint}")
        if not np.isfinite(xq).all():
            raise ValueError("query vectors contain NaN or infinity")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        rerank = self.manifest.get("rerank") or {}
        if qe is None:
            qe = int(rerank.get("qe", 0))
        if qe_alpha is None:
            qe_alpha = float(rerank.get("qe_alpha", 3.0))
        if qe < 0:
            raise ValueError(f"qe must be >= 0 (0: no query expansion), got {qe}")
        if qe > 0 and len(self):
            xq = self._expand(xq, qe, qe_alpha)
        if dedupe and "content_sha1" not in self.id_map.columns:
            raise ValueError("dedupe needs the content_sha1 of each image, which this index "
                             "does not hold (built before format 2); rebuild it")
        fetch = min(max(4 * k, k + 16), max(len(self), 1)) if dedupe else min(k, max(len(self), 1))
        if filters:
            allowed = self.allowed_ids(filters)
            if not len(allowed):
                return [[] for _ in xq]
            scores, ids = search_selected(self.index, xq, fetch, allowed, self.factory)
        else:
            scores, ids = self.index.search(xq, fetch)
        columns = self.id_map.columns
        out = []
        for srow, irow in zip(scores, ids):
            keep = irow != -1
            uris = self.uri_of(irow[keep])
            meta = self.id_map.rows(irow[keep], columns) if columns else [{}] * len(uris)
            hits, seen = [], set()
            for i, u, s, m in zip(irow[keep], uris, srow[keep], meta):
                sha = (m or {}).get("content_sha1")
                if dedupe and sha:
                    if sha in seen:
                        continue
                    seen.add(sha)
                hits.append(Hit(len(hits) + 1, int(i), u, float(s), m or {}))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _expand(self, xq: np.ndarray, qe: int, alpha: float) -> np.ndarray:
        """alpha-QE: a first search that also returns the (decoded) vectors of its results."""
        from index_builder.merge import search_and_reconstruct
        from index_builder.rerank import alpha_query_expansion

        n = min(qe, len(self))
        try:
            scores, ids, vecs = search_and_reconstruct(self.index, xq, n)
        except RuntimeError as e:
            raise ValueError(f"query expansion needs an index that can decode its vectors; "
                             f"{self.manifest.get('factory')} cannot ({e}); search with qe=0") from e
        scores = np.where(ids == -1, np.nan, scores)
        return alpha_query_expansion(xq, vecs, scores, k=n, alpha=alpha)

    @property
    def factory(self) -> str:
        return str(self.manifest.get("factory", "?"))

    def allowed_ids(self, filters: dict) -> np.ndarray:
        """Sorted ids whose metadata matches every {column: value or [values]} of `filters`."""
        allowed = None
        for column, values in filters.items():
            values = list(values) if isinstance(values, (list, tuple, set)) else [values]
            ids = self.id_map.ids_where(column, values)
            allowed = ids if allowed is None else np.intersect1d(allowed, ids)
        return np.zeros(0, np.int64) if allowed is None else allowed

    def model(self, model_uri: str | None = "manifest"):
        """The query model (loaded once); refuses one whose fingerprint differs from the index."""
        if self._model is None:
            from remap_core.descriptor.checkpoint import load_model

            uri = self.manifest.get("model_uri") if model_uri == "manifest" else model_uri
            model = load_model(uri)
            if model.fingerprint != self.fingerprint:
                from remap_core.descriptor.checkpoint import model_hint

                hint = model_hint(self.fingerprint)
                hint = f" (here: --model {hint})" if hint else ""
                raise FingerprintMismatch(
                    f"index built with model {self.fingerprint} but query model is "
                    f"{model.fingerprint}; pass --model with the checkpoint used to embed the "
                    f"collection{hint}, or rebuild the index with this model")
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
                      errors: str = "raise", filters: dict | None = None, dedupe: bool = False,
                      qe: int | None = None, qe_alpha: float | None = None,
                      **prep) -> list:
        """Query images -> for each, up to k hits, best first.

        A query image that cannot be read or decoded raises QueryImageError (naming it) by
        default; with errors="return" the other queries are still answered and that query's
        entry is its QueryImageError instead of a hit list. A problem with the whole search
        (the index, the query model) always raises. `filters`, `dedupe`: as search_vectors."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        images = list(images)
        vectors, failed = self._embed_each(images, model_uri, **prep)
        if failed and errors == "raise":
            raise next(iter(failed.values()))
        hits = iter(self.search_vectors(vectors, k, filters, dedupe, qe, qe_alpha)
                    if len(vectors) else [])
        return [failed[i] if i in failed else next(hits) for i in range(len(images))]

    def _embed_each(self, images, model_uri, denoise: bool = False, autocontrast: bool = False
                    ) -> tuple[np.ndarray, dict[int, QueryImageError]]:
        """-> ((G, D) descriptors of the images that could be prepared, in order;
        {position: QueryImageError} of those that could not). Every image is read (and, while
        the query model is not loaded yet, decoded) before the model is loaded, so bad queries
        are refused as such even where no query model can be loaded."""
        from remap_core.data.preprocess import decode_image, enhance_query, image_for_model

        def name(i):
            return f"<bytes #{i}>" if isinstance(images[i], (bytes, bytearray)) else str(images[i])

        read, failed = [], {}
        for i, im in enumerate(images):
            try:
                data = bytes(im) if isinstance(im, (bytes, bytearray)) else _read_bytes(im)
                if self._model is None:
                    decode_image(data)
                read.append((i, data))
            except QueryImageError as e:
                failed[i] = e
            except ValueError as e:  # ImageDecodeError: "<reason>: <message>"
                failed[i] = QueryImageError(name(i), f"not a readable image ({e})")
        if not read:
            return np.zeros((0, self.dimension), np.float32), failed
        model = self.model(model_uri)
        arrays = []
        for i, data in read:
            try:
                prepared = image_for_model(
                    data, model.config["max_side"], model.config["multiple"],
                    enhance=lambda img: enhance_query(img, denoise, autocontrast))
            except ValueError as e:  # ImageDecodeError: "<reason>: <message>"
                failed[i] = QueryImageError(name(i), f"not a readable image ({e})")
                continue
            arrays.append(prepared.pixels)
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


def _read_index_file(path: str, mmap: bool) -> faiss.Index:
    """One FAISS index file: codes mapped in place read-only with `mmap` (FAISS falls back to
    reading when an index type cannot be mapped), else read into memory."""
    if mmap:
        try:
            return faiss.read_index(path, MMAP_FLAGS)
        except RuntimeError as e:
            log.info("%s cannot be memory-mapped (%s); reading it into memory", path,
                     str(e).splitlines()[0])
    return faiss.read_index(path)


def _open_id_map(folder: str, manifest: dict, mapped: bool, remote: str | None = None) -> IdMap:
    """The id map of an index whose files are in the local `folder`: the format-2 id map
    (memory-mapped when `mapped`), else the per-shard id files (format 1)."""
    if manifest.get("id_map"):
        if mapped:
            return IdMap.open_mapped(folder)
        from index_builder.id_map import ID_MAP_IDS, ID_MAP_TABLE

        names = {os.path.basename(e["path"]): e["path"] for e in manifest["id_map"]}
        local = (lambda n: os.path.join(folder, names[n].replace("/", "_"))) if remote \
            else (lambda n: os.path.join(folder, names[n]))
        ids = np.load(local(ID_MAP_IDS), allow_pickle=False)
        with pa.OSFile(local(ID_MAP_TABLE), "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        return IdMap(ids, table)
    return IdMap.from_tables([pq.read_table(_read_local(remote or folder, e["path"], folder))
                              for e in manifest["id_files"]])


def search_selected(index, xq: np.ndarray, k: int, allowed: np.ndarray, factory: str = "?"):
    """index.search restricted to the sorted ids `allowed` (a FAISS IDSelector in the search
    parameters, with the index's own nprobe/efSearch kept). -> (scores (Q, k), ids (Q, k))"""
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    outer, index = index, unwrap(index)     # a RefinedIndex filters its base's candidates
    try:
        if isinstance(index, ShardedIndex):
            params = [search_parameters(p, selector) for p in index.parts]
            return outer.search(xq, k, params=[p for p, _ in params])
        params, _keep = search_parameters(index, selector)
        return outer.search(xq, k, params=params)
    except RuntimeError as e:
        raise ValueError(f"this index ({factory}) cannot filter during the search "
                         f"({str(e).splitlines()[0][:120]}); rebuild it with an IVF, HNSW or "
                         f"Flat factory to filter") from None


def search_parameters(index, selector) -> tuple:
    """FAISS SearchParameters of the right kind for `index` (IVF, HNSW, other) carrying
    `selector` and the index's current nprobe / efSearch. -> (params, objects to keep alive)"""
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    keep = [selector]
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = ivf.nprobe
        params.max_codes = ivf.max_codes
        quantizer = hnsw_quantizer(ivf)
        if quantizer is not None:
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = quantizer.hnsw.efSearch
            params.quantizer_params = qp
            keep.append(qp)
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = inner.hnsw.efSearch
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    return params, keep


def read_faiss_index(folder: str, manifest: dict, tmp: str, mmap: bool = False) -> faiss.Index:
    """The FAISS index named by the manifest, in any of its layouts:

    single  one file (`index_files[0]`), read into memory (codes memory-mapped with `mmap`,
            for a local folder);
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
        return _read_index_file(_read_local(folder, entries[0]["path"], tmp), mmap)
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
        return sharded_index([_read_index_file(_read_local(folder, e["path"], tmp), mmap)
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


def open_index(folder: str, verify: bool = True, cache: str | bool | None = None,
               mmap: bool = True) -> RemapIndex:
    """Open a built index from a local folder or an fsspec URL, or the index that an index
    root's `CURRENT` pointer names (see RemapIndex.open for `cache` and `mmap`)."""
    return RemapIndex.open(resolve_index_folder(folder), verify, cache, mmap)
