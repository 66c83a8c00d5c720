"""The HTTP face of the query library (FastAPI): search by image or by vectors, a results page,
health, readiness and Prometheus metrics. It owns no retrieval logic: every answer comes from
index_builder.search (RemapIndex.search_vectors / embed_images) on the index IndexHolder serves.

    POST /search           JSON {"vectors": [[...], ...], "k", "filters", "dedupe", "min_score",
                           "qe"} or multipart/form-data (field `image`, optional `k`, `filters`
                           JSON, `dedupe`, `qe`) or a raw image body (Content-Type image/*;
                           ?k=&filters=&qe=). `qe`: alpha query expansion over the top qe
                           results (0: off); absent: the index's default (manifest `rerank`)
                           -> {"index": {...}, "results": [{"query", "hits": [...]}], "took_ms"}
    GET  /                 the upload form; POST / (the form) and GET /?like=<id> show results
    GET  /thumb?id=|uri=   a JPEG thumbnail of an image the index holds (nothing else)
    GET  /index            what is served: version, folder, model, dimension, vectors, columns
    GET  /healthz          the process answers (200)
    GET  /readyz           200 once an index is served, else 503
    GET  /metrics          Prometheus text format

Bad input gets a 4xx JSON body {"error": {"kind", "message"}}: too_large (413),
unsupported_media_type (415), bad_request / bad_vectors / undecodable_image (400),
decode_timeout (408), not_found (404); not_ready is 503. An unexpected error is a 500 with the
same shape, logged; the process keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from remap_serve import gallery
from remap_serve.metrics import CONTENT_TYPE, Metrics
from remap_serve.reload import IndexHolder

log = logging.getLogger(__name__)


@dataclass
class Settings:
    max_upload_mb: float = 20.0           # request bodies (uploads, JSON) above this: 413
    decode_timeout: float = 10.0          # seconds to decode + embed one query image: 408
    max_k: int = 1000
    max_queries: int = 256                # vectors in one request
    image_threads: int = 2                # query images decoded + embedded at once
    thumb_source_bytes: int = gallery.MAX_SOURCE_BYTES

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def error_body(kind: str, message: str) -> dict:
    return {"error": {"kind": kind, "message": message}}


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` (declared or streamed) is refused
    with 413 before the application reads more of it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = ApiError(413, "too_large", f"the request body is larger than the limit of "
                                               f"{self.max_bytes} bytes; send a smaller image "
                                               f"(or fewer vectors)")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(error_body(too_large.kind, too_large.message), 413)
            scope.setdefault("state", {})["error_kind"] = too_large.kind
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)


def _parse_k(value, settings: Settings) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", f"k must be an integer, got {value!r}") from None
    if not 1 <= k <= settings.max_k:
        raise ApiError(400, "bad_request", f"k must be between 1 and {settings.max_k}, got {k}")
    return k


def _parse_filters(value) -> dict | None:
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ApiError(400, "bad_request", f"filters must be a JSON object like "
                                               f"{{\"product_id\": \"p1\"}} ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ApiError(400, "bad_request", "filters must be a JSON object {column: value or "
                                           "[values]}")
    return value


def _parse_qe(value) -> int | None:
    """The request's query expansion (None: the index's default; 0: off)."""
    if value in (None, ""):
        return None
    try:
        qe = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_request", f"qe must be an integer (0: no query expansion), "
                                           f"got {value!r}") from None
    if qe < 0 or isinstance(value, bool):
        raise ApiError(400, "bad_request", f"qe must be an integer >= 0 (0: no query "
                                           f"expansion), got {value!r}")
    return qe


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes", "on")


def create_app(holder: IndexHolder, settings: Settings | None = None,
               metrics: Metrics | None = None, start_holder: bool = True) -> FastAPI:
    """The FastAPI application over `holder`; with `start_holder`, the app's startup starts it
    (first open in the background, then following CURRENT) and its shutdown stops it."""
    settings = settings or Settings()
    metrics = metrics or holder.metrics or Metrics()
    holder.metrics = metrics
    images = ThreadPoolExecutor(settings.image_threads, thread_name_prefix="remap-query-image")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_holder:
            holder.start()
        try:
            yield
        finally:
            if start_holder:
                holder.stop()
            images.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="remap serve", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.holder, app.state.settings, app.state.metrics = holder, settings, metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        request.scope.setdefault("state", {})["error_kind"] = kind
        return JSONResponse(error_body(kind, str(e.detail)), e.status_code)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        request.scope.setdefault("state", {})["error_kind"] = e.kind
        return JSONResponse(error_body(e.kind, e.message), e.status)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)   # inside _measure

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except ApiError as e:       # raised while the body was streamed (BodyLimit)
            request.scope.setdefault("state", {})["error_kind"] = e.kind
            response = JSONResponse(error_body(e.kind, e.message), e.status)
        except Exception as e:      # noqa: BLE001  (a 500, never a dead process)
            log.exception("internal error on %s %s", request.method, request.url.path)
            request.scope.setdefault("state", {})["error_kind"] = "internal"
            response = JSONResponse(error_body("internal", f"{type(e).__name__}: {e}"), 500)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        kind = request.scope.get("state", {}).get("error_kind")
        if kind is None and response.status_code >= 400:
            kind = {404: "not_found", 405: "method_not_allowed",
                    413: "too_large"}.get(response.status_code,
                                                                     "other")
        if kind:
            metrics.error(kind)
        metrics.observe(path, request.method, response.status_code, time.perf_counter() - t0)
        return response

    def served():
        idx = holder.current
        if idx is None:
            raise ApiError(503, "not_ready", "no index is loaded yet" + (
                f" (last error: {holder.last_error})" if holder.last_error else "") +
                "; retry when /readyz answers 200")
        return idx

    def index_info(idx) -> dict:
        return {"version": idx.version, "folder": idx.folder, "model": idx.fingerprint,
                "dimension": idx.dimension, "vectors": len(idx), "factory": idx.factory,
                "columns": idx.id_map.columns}

    async def embed_image(idx, data: bytes) -> np.ndarray:
        from index_builder.search import FingerprintMismatch, QueryImageError

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(images, idx.embed_images, [data]), settings.decode_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, "decode_timeout", f"the query image took longer than "
                                                  f"{settings.decode_timeout:g} s to decode and "
                                                  f"embed; send a smaller image") from None
        except QueryImageError as e:
            raise ApiError(400, "undecodable_image", f"the uploaded file is {e.reason}; send a "
                                                     f"JPEG, PNG, WebP, GIF, BMP or TIFF image") \
                from None
        except FingerprintMismatch as e:
            raise ApiError(400, "no_query_model", f"this service cannot search by image: {e}; "
                                                  f"search by vectors instead") from None

    async def search(idx, vectors: np.ndarray, k: int, filters, dedupe: bool,
                     min_score=None, qe: int | None = None) -> list:
        try:
            results = await run_in_threadpool(idx.search_vectors, vectors, k, filters, dedupe,
                                              qe)
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        if min_score is not None:
            results = [[h for h in hits if h.score >= float(min_score)] for hits in results]
        return results

    def parse_vectors(idx, raw) -> np.ndarray:
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "bad_vectors", "vectors must be a non-empty list of lists of "
                                               f"{idx.dimension} numbers")
        try:
            with np.errstate(over="ignore"):      # too large for float32: inf, refused below
                xq = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            raise ApiError(400, "bad_vectors", f"vectors must be lists of {idx.dimension} "
                                               f"numbers each, of equal length") from None
        xq = np.atleast_2d(xq)
        if xq.ndim != 2 or xq.shape[1] != idx.dimension:
            raise ApiError(400, "bad_vectors", f"vectors have shape {list(xq.shape)}; this index "
                                               f"takes vectors of dimension {idx.dimension} "
                                               f"(model {idx.fingerprint})")
        if len(xq) > settings.max_queries:
            raise ApiError(400, "bad_vectors", f"{len(xq)} vectors in one request; send at most "
                                               f"{settings.max_queries}")
        if not np.isfinite(xq).all():
            raise ApiError(400, "bad_vectors", "vectors contain NaN or infinity")
        return xq

    # ------------------------------------------------------------------ probes
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        idx = holder.current
        if idx is None:
            return JSONResponse({"ready": False, "error": holder.last_error}, 503)
        return {"ready": True, "version": idx.version, "vectors": len(idx)}

    @app.get("/metrics")
    def metrics_text():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/index")
    def index_summary():
        return index_info(served())

    # ------------------------------------------------------------------ search
    @app.post("/search")
    async def search_endpoint(request: Request):
        idx = served()          # one index for the whole request, even if a reload swaps
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = request.query_params
        if ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, "bad_request", f"the body is not valid JSON ({e})") from None
            if not isinstance(body, dict) or "vectors" not in body:
                raise ApiError(400, "bad_request", 'send {"vectors": [[...], ...], "k": 10} '
                                                   "or upload an image (multipart field "
                                                   "'image', or a body of type image/*)")
            xq = parse_vectors(idx, body["vectors"])
            k = _parse_k(body.get("k", 10), settings)
            filters, dedupe = _parse_filters(body.get("filters")), _parse_bool(
                body.get("dedupe", False))
            min_score, by, names = body.get("min_score"), "vectors", list(range(len(xq)))
            qe = _parse_qe(body.get("qe"))
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=16)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "bad_request", "multipart upload without a file field "
                                                   "named 'image'")
            if upload.content_type and not upload.content_type.startswith(
                    ("image/", "application/octet-stream")):
                raise ApiError(415, "unsupported_media_type",
                               f"the uploaded file has type {upload.content_type}; upload an "
                               f"image (image/jpeg, image/png, ...)")
            data = await upload.read()
            xq = await embed_image(idx, data)
            k = _parse_k(form.get("k", params.get("k", 10)), settings)
            filters = _parse_filters(form.get("filters", params.get("filters")))
            dedupe = _parse_bool(form.get("dedupe", params.get("dedupe", False)))
            min_score, by, names = None, "image", [upload.filename or "upload"]
            qe = _parse_qe(form.get("qe", params.get("qe")))
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            data = await request.body()
            xq = await embed_image(idx, data)
            k = _parse_k(params.get("k", 10), settings)
            filters, dedupe = _parse_filters(params.get("filters")), _parse_bool(
                params.get("dedupe", False))
            min_score, by, names = None, "image", ["body"]
            qe = _parse_qe(params.get("qe"))
        else:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {ctype or '(none)'} is not accepted; send "
                           f"application/json with vectors, multipart/form-data with an "
                           f"'image' file, or an image/* body")
        results = await search(idx, xq, k, filters, dedupe, min_score, qe)
        metrics.query(by, len(names))
        return {"index": {"version": idx.version, "model": idx.fingerprint, "vectors": len(idx)},
                "results": [{"query": n, "hits": [h.as_dict() for h in hits]}
                            for n, hits in zip(names, results)],
                "took_ms": round((time.perf_counter() - t0) * 1000, 3)}

    # ------------------------------------------------------------------ page + thumbnails
    def page(idx, sections, k=10, filters="") -> HTMLResponse:
        body = gallery.render_page(
            sections, thumb_src=lambda h: f"thumb?id={h.id}", link=lambda h: f"?like={h.id}",
            form={"action": "./", "k": k, "filters": filters},
            info=f"index {idx.folder} · version {idx.version} · {len(idx)} images · "
                 f"model {idx.fingerprint}")
        return HTMLResponse(body, headers={
            "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; "
                                       "style-src 'unsafe-inline'; form-action 'self'"})

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request):
        idx = served()
        like = request.query_params.get("like")
        if like is None:
            return page(idx, [])
        k = _parse_k(request.query_params.get("k", 10), settings)
        data, uri = await run_in_threadpool(held_image, idx, like, None)
        section = {"query": uri, "query_src": f"thumb?id={int(like)}"}
        try:
            xq = await embed_image(idx, data)
            section["hits"] = (await search(idx, xq, k, None, False))[0]
        except ApiError as e:
            section["error"] = e.message
        return page(idx, [section], k)

    @app.post("/", response_class=HTMLResponse)
    async def home_upload(request: Request):
        idx = served()
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "bad_request", "the form has no image file")
        data = await upload.read()
        k = _parse_k(form.get("k") or 10, settings)
        filters_text = form.get("filters") or ""
        section = {"query": upload.filename or "upload"}
        try:
            section["query_src"] = gallery.data_uri(
                await run_in_threadpool(gallery.thumbnail_jpeg, data))
            xq = await embed_image(idx, data)
            section["hits"] = (await search(idx, xq, k, _parse_filters(filters_text),
                                            _parse_bool(form.get("dedupe") or False)))[0]
            metrics.query("image")
        except (ApiError, ValueError) as e:
            section["error"] = getattr(e, "message", str(e))
        return page(idx, [section], k, filters_text)

    def held_image(idx, id_text, uri) -> tuple[bytes, str]:
        """The bytes of an image the index holds, by id or by exact URI; 404 otherwise."""
        import fsspec

        if id_text is not None:
            try:
                ids = np.array([int(id_text)], np.int64)
            except (ValueError, OverflowError):
                raise ApiError(400, "bad_request", f"id must be an integer, got {id_text!r}") \
                    from None
            held = idx.uri_of(ids)[0]
        else:
            from remap_store.schema import stable_id

            held = idx.uri_of(np.array([stable_id(uri)], np.int64))[0]
            if held != uri:
                held = None
        if held is None:
            raise ApiError(404, "not_found", "the index holds no such image; thumbnails are "
                                             "served only for images the index holds")
        try:
            with fsspec.open(held, "rb") as f:
                data = f.read(settings.thumb_source_bytes + 1)
        except OSError as e:
            raise ApiError(404, "not_found", f"the image {held} cannot be read now ({e})") \
                from None
        if len(data) > settings.thumb_source_bytes:
            raise ApiError(413, "too_large", f"the image {held} is too large to thumbnail")
        return data, held

    @app.get("/thumb")
    def thumb(request: Request):
        idx = served()
        id_text, uri = request.query_params.get("id"), request.query_params.get("uri")
        if (id_text is None) == (uri is None):
            raise ApiError(400, "bad_request", "give ?id=<id> or ?uri=<uri> of an image the "
                                               "index holds")
        data, _ = held_image(idx, id_text, uri)
        try:
            jpeg = gallery.thumbnail_jpeg(data)
        except ValueError as e:
            raise ApiError(404, "not_found", f"the held image cannot be decoded ({e})") from None
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})

    return app
