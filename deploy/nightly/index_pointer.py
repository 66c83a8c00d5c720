"""The nightly re-index's bookkeeping: which index is CURRENT, whether a new one is needed,
whether a freshly built one may be published, and which old ones to delete.

    INDEX_ROOT/
      CURRENT              one line: the URL of the published index folder
      2026-11-22/          index folders (index.faiss, ids.parquet, manifest.json written last)
      2026-11-23/

Works on any fsspec URL (local folder, gs://, s3://). Called by reindex.sh, one subcommand per
step, each printing one JSON line on stdout and exiting non-zero with a message on refusal:

    python index_pointer.py current --index-root ROOT
    python index_pointer.py plan    --index-root ROOT --store STORE --date 2026-11-23
    python index_pointer.py check   --index-root ROOT --index URL [--min-recall 0.95 ...]
    python index_pointer.py upload  --from LOCAL_FOLDER --to URL
    python index_pointer.py publish --index-root ROOT --index URL
    python index_pointer.py prune   --index-root ROOT --keep 7

The pointer is only ever replaced by `publish`, after `check` passed: a failed night leaves it on
the previous index. Readers resolve it once per (re)load: `remap search --index "$(cat CURRENT)"`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys

import fsspec

from index_builder.manifest import MANIFEST_NAME as MANIFEST
from index_builder.manifest import manifest_files, read_manifest, verify_files
from index_builder.search import POINTER
from remap_store.files import join_url, write_bytes_atomic
from remap_store.runs import list_completed_runs

# index folder names the nightly writes (and prune may delete): 2026-11-23 or 2026-11-23T041500Z
INDEX_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{6}Z)?$")


class Refused(Exception):
    """A check failed: the index must not be published (exit status 3)."""


# --------------------------------------------------------------------------- small helpers

def _read_json(url: str) -> dict:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def read_current(index_root: str) -> str | None:
    """URL of the published index, or None before the first publish."""
    fs, root = fsspec.core.url_to_fs(index_root)
    path = join_url(root, POINTER)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        value = f.read().strip()
    return value or None


def write_current(index_root: str, index_url: str) -> None:
    """Point CURRENT at `index_url`. Locally: a temporary file renamed over CURRENT. On object
    storage: one object write, which replaces the object atomically (readers see the old or the
    new pointer, never a mix)."""
    fs, root = fsspec.core.url_to_fs(index_root)
    fs.makedirs(root, exist_ok=True)
    body = (index_url.rstrip("/") + "\n").encode()
    if "file" in fs.protocol or "local" in fs.protocol:
        write_bytes_atomic(join_url(root, POINTER), body)
    else:
        fs.pipe_file(join_url(root, POINTER), body)


def store_runs(store: str) -> list[dict]:
    """The run summary (run.json) of every completed run of an embedding store (a run without
    one is unfinished and not counted), oldest first."""
    return [run.summary for run in list_completed_runs(store)]


def changes_anything(run: dict) -> bool:
    """Whether a run changed the store's content (something embedded or tombstoned)."""
    return bool(run.get("embedded", 0) or run.get("tombstoned", 0))


# --------------------------------------------------------------------------- the steps

def plan(index_root: str, store: str, date: str, now: _dt.datetime | None = None) -> dict:
    """Decide whether tonight needs a new index and where to build it.

    "keep": CURRENT already covers every run of the store that changed something (a night
    with nothing new, or a rerun after a successful night). "build": build into
    INDEX_ROOT/<date>, or INDEX_ROOT/<date>T<HHMMSS>Z when <date> is already the published
    index (a second publish the same day). A leftover <date> folder that is not published
    (an earlier attempt that failed or was refused) is deleted first, so the build starts clean.
    """
    runs = store_runs(store)
    if not runs:
        raise FileNotFoundError(f"no completed embedding runs under {store}; the embed step "
                                f"failed or wrote elsewhere")
    current = read_current(index_root)
    if current is not None:
        try:
            covered = set(_read_json(join_url(current, MANIFEST)).get("source_runs", []))
        except FileNotFoundError:
            covered = set()   # pointer to a vanished index: rebuild
        pending = [r["run_id"] for r in runs if r["run_id"] not in covered
                   and changes_anything(r)]
        if covered and not pending:
            return {"action": "keep", "current": current,
                    "reason": "the published index already holds every embedded or tombstoned "
                              "URI of the store"}
    else:
        pending = [r["run_id"] for r in runs]
    target = join_url(index_root, date)
    if current is not None and current.rstrip("/") == target.rstrip("/"):
        stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("T%H%M%SZ")
        target = join_url(index_root, date + stamp)
    fs, path = fsspec.core.url_to_fs(target)
    removed = False
    if fs.exists(path):
        fs.rm(path, recursive=True)
        removed = True
    return {"action": "build", "target": target, "current": current, "pending_runs": pending,
            "removed_leftover": removed}


def check(index_url: str, index_root: str, min_recall: float, recall_k: int,
          max_shrink: float) -> dict:
    """Refuse to publish an index that did not build completely, whose files do not match its
    manifest, whose measured recall@k is below `min_recall`, or which lost more than
    `max_shrink` of the published index's vectors (a listing that came back nearly empty
    tombstones everything; better to keep yesterday's index and alert)."""
    manifest = read_manifest(index_url)          # raises when the build did not finish
    verify_files(index_url, manifest_files(manifest))
    n = int(manifest.get("num_vectors", 0))
    if n <= 0:
        raise Refused(f"index {index_url} holds no vectors")
    recall = manifest.get("recall") or {}
    ks = sorted(int(k.split("@", 1)[1]) for k in recall if k.startswith("recall@"))
    usable = [k for k in ks if k <= recall_k]
    if not usable or not recall.get("queries"):
        raise Refused(f"index {index_url} has no measured recall@k for k <= {recall_k} "
                      f"(manifest recall: {recall}); rebuild with --recall-queries > 0")
    k = usable[-1]   # recall@k: with fewer vectors than k, the largest k measured
    value = float(recall[f"recall@{k}"])
    if value < min_recall:
        raise Refused(f"index {index_url}: recall@{k} = {value:.4f} < {min_recall}; not "
                      f"published (CURRENT stays). Raise nprobe / pick another --factory, or "
                      f"lower --min-recall if this is expected")
    current = read_current(index_root)
    before = None
    if current is not None and current.rstrip("/") != index_url.rstrip("/"):
        try:
            before = int(_read_json(join_url(current, MANIFEST)).get("num_vectors", 0))
        except FileNotFoundError:
            before = None
    if before and n < (1.0 - max_shrink) * before:
        raise Refused(f"index {index_url} has {n} vectors, the published one {before}: a drop of "
                      f"more than {max_shrink:.0%}; not published. If the collection really "
                      f"shrank, publish by hand: index_pointer.py publish --index {index_url}")
    return {"index": index_url, "vectors": n, f"recall@{k}": value, "previous_vectors": before,
            "model": manifest.get("model")}


def upload(local: str, dest: str) -> dict:
    """Copy a locally built index folder to object storage, manifest.json last (the old one
    removed first): a reader (and `check`) that sees the manifest sees every file it names.
    `index_builder.publish.upload_index`, which `remap index --output gs://...` uses too."""
    from index_builder.publish import upload_index

    return upload_index(local, dest)


def publish(index_root: str, index_url: str) -> dict:
    previous = read_current(index_root)
    write_current(index_root, index_url)
    return {"current": index_url.rstrip("/"), "previous": previous}


def prune(index_root: str, keep: int) -> dict:
    """Delete index folders beyond the newest `keep` (by name, i.e. by date); the published one
    is never deleted. Only folders named like the nightly's (YYYY-MM-DD[THHMMSSZ]) are touched."""
    if keep < 1:
        raise ValueError("--keep must be at least 1")
    fs, root = fsspec.core.url_to_fs(index_root)
    if not fs.exists(root):
        return {"kept": [], "deleted": []}
    current = read_current(index_root)
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True)
                   if e["type"] == "directory")
    names = [n for n in names if INDEX_NAME.match(n)]
    kept = set(names[-keep:])
    current_name = current.rstrip("/").rsplit("/", 1)[-1] if current else None
    if current_name in names:
        kept.add(current_name)
    deleted = []
    for name in names:
        if name not in kept:
            fs.rm(join_url(root, name), recursive=True)
            deleted.append(name)
    return {"kept": sorted(kept), "deleted": deleted}


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="index_pointer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("current", help="print the published index URL")
    s.add_argument("--index-root", required=True)
    s = sub.add_parser("plan", help="decide keep/build and the build folder")
    s.add_argument("--index-root", required=True)
    s.add_argument("--store", required=True)
    s.add_argument("--date", required=True, help="logical date of the run, YYYY-MM-DD")
    s = sub.add_parser("check", help="gate a built index before publishing")
    s.add_argument("--index-root", required=True)
    s.add_argument("--index", required=True)
    s.add_argument("--min-recall", type=float, default=0.9)
    s.add_argument("--recall-k", type=int, default=10)
    s.add_argument("--max-shrink", type=float, default=0.5)
    s = sub.add_parser("upload", help="copy a local index folder to object storage")
    s.add_argument("--from", dest="local", required=True)
    s.add_argument("--to", dest="dest", required=True)
    s = sub.add_parser("publish", help="point CURRENT at an index")
    s.add_argument("--index-root", required=True)
    s.add_argument("--index", required=True)
    s = sub.add_parser("prune", help="delete old index folders")
    s.add_argument("--index-root", required=True)
    s.add_argument("--keep", type=int, default=7)
    a = p.parse_args(argv)
    try:
        if a.step == "current":
            out = {"current": read_current(a.index_root)}
        elif a.step == "plan":
            if not re.match(r"^\d{4}-\d{2}-\d{2}$", a.date):
                p.error(f"--date {a.date!r} is not YYYY-MM-DD")
            out = plan(a.index_root, a.store, a.date)
        elif a.step == "check":
            out = check(a.index, a.index_root, a.min_recall, a.recall_k, a.max_shrink)
        elif a.step == "upload":
            out = upload(a.local, a.dest)
        elif a.step == "publish":
            out = publish(a.index_root, a.index)
        else:
            out = prune(a.index_root, a.keep)
    except Refused as e:
        print(f"index_pointer {a.step}: refused: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"index_pointer {a.step}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
