"""The results page a person sees: the query and its top-k as a gallery (thumbnail, rank, score,
URI, metadata). One renderer for the service's GET / and for `remap search --html out.html`;
only the thumbnail sources differ (the service's /thumb URLs, or data: URIs in a file that
stands alone).

Every text that comes from the index or the request (URIs, metadata, errors) is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Callable, Iterable

THUMB_SIDE = 256
MAX_SOURCE_BYTES = 64 << 20      # an image larger than this is not thumbnailed

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.5em;word-break:break-all}
form{background:#fff;border:1px solid #ddd;padding:1em;display:flex;gap:1em;flex-wrap:wrap;
align-items:end} label{display:flex;flex-direction:column;font-size:.85em}
.query img{max-width:256px;max-height:256px;border:3px solid #36c}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.hit{background:#fff;border:1px solid #ddd;padding:6px;font-size:.8em;word-break:break-all}
.hit img{width:200px;height:200px;object-fit:contain;background:#eee;display:block}
.score{font-weight:bold} .meta{color:#555} .error{color:#b00;font-weight:bold}
"""


def thumbnail_jpeg(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """Image bytes -> a JPEG whose long side is at most `side` (EXIF orientation applied).
    Raises ValueError when the bytes are not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (side, side))       # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=85)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from None


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _hit_html(hit, thumb_src: Callable, link: Callable | None) -> str:
    e = html.escape
    meta = "".join(f"<div class='meta'>{e(str(k))}: {e(str(v))}</div>"
                   for k, v in (hit.metadata or {}).items() if v not in (None, ""))
    src = thumb_src(hit)
    img = f"<img src='{e(src)}' alt='{e(hit.uri or '')}'>" if src else \
        "<div class='meta'>(no thumbnail)</div>"
    if link:
        img = f"<a href='{e(link(hit))}'>{img}</a>"
    return (f"<div class='hit'>{img}<div>#{hit.rank} <span class='score'>{hit.score:.4f}</span>"
            f"</div><div class='uri'>{e(hit.uri or '')}</div>{meta}</div>")


def render_page(sections: Iterable[dict], thumb_src: Callable, title: str = "remap search",
                form: dict | None = None, link: Callable | None = None,
                info: str = "") -> str:
    """A whole HTML page.

    sections: [{"query": name, "query_src": image src or None, "hits": [Hit], "error": str|None}]
    thumb_src(hit) -> the src of a hit's thumbnail ("" for none); link(hit) -> where a click on
    it goes (None: no link). form: {"action", "k", "filters"} shows the upload form."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"]
    if info:
        parts.append(f"<p class='meta'>{e(info)}</p>")
    if form is not None:
        parts.append(
            f"<form method='post' action='{e(form.get('action', '/'))}' "
            f"enctype='multipart/form-data'>"
            f"<label>Query image<input type='file' name='image' accept='image/*' required></label>"
            f"<label>k<input type='number' name='k' min='1' max='1000' "
            f"value='{int(form.get('k', 10))}'></label>"
            f"<label>Filter (JSON, e.g. {{\"product_id\": \"p1\"}})<input type='text' "
            f"name='filters' value='{e(form.get('filters', ''))}'></label>"
            f"<label>Same bytes once<input type='checkbox' name='dedupe' value='true'></label>"
            f"<button type='submit'>Search</button></form>")
    for s in sections:
        parts.append(f"<section><h2>Query: {e(str(s.get('query', '')))}</h2>")
        if s.get("query_src"):
            parts.append(f"<div class='query'><img src='{e(s['query_src'])}' alt='query'></div>")
        if s.get("error"):
            parts.append(f"<p class='error'>{e(s['error'])}</p>")
        else:
            hits = s.get("hits") or []
            parts.append(f"<p>{len(hits)} results</p><div class='grid'>")
            parts.extend(_hit_html(h, thumb_src, link) for h in hits)
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


def file_thumbnail(uri: str) -> str:
    """A data: URI thumbnail of the image at `uri` (for a page that stands alone); "" when the
    image cannot be read."""
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
        if len(data) > MAX_SOURCE_BYTES:
            return ""
        return data_uri(thumbnail_jpeg(data))
    except (OSError, ValueError):
        return ""


def write_results_page(path: str, queries: list[str], results: list, index,
                       query_images: bool = True) -> None:
    """The results of `remap search` as the page `remap serve` shows, standing alone (thumbnails
    embedded as data: URIs). `results[i]`: the hits of `queries[i]`, or its error."""
    from remap_store.files import write_bytes_atomic

    sections = []
    for name, hits in zip(queries, results):
        section = {"query": name, "query_src": file_thumbnail(name) if query_images else None}
        if isinstance(hits, Exception):
            section["error"] = str(hits)
        else:
            section["hits"] = hits
        sections.append(section)
    page = render_page(sections, lambda hit: file_thumbnail(hit.uri),
                       info=f"index {index.folder} · {len(index)} images · model "
                            f"{index.fingerprint}")
    write_bytes_atomic(path, page.encode("utf-8"))
