"""Writing files so that no reader ever sees half of one, and URLs that keep their protocol.

Every file remap writes (shards, run summaries, leases, index files, index manifests, checkpoints,
benchmark caches) goes through one of the writers here: the bytes go to a temporary name beside
the target, then a rename puts them in place. Locally the rename is atomic; on object stores an
object only becomes visible once whole, and the temporary name keeps a killed writer's remains
out of every listing that matches the final names.

fsspec strips the protocol from the paths it lists (`gs://b/x` is listed as `b/x`):
`with_protocol` gives it back, `join_url` joins a root and names.

URIs can carry credentials (`https://user:pass@host/x.jpg`, signed URLs' `X-Amz-Signature=`,
`X-Goog-Signature=`, `sig=`, `token=`): `redact` blanks them out of any text; dead-letter rows
and remap's own log lines call it, and `redact_logs` passes every log record of the process
(other libraries' included) through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from typing import IO, Iterator

import fsspec

TMP_SUFFIX = ".tmp"
LOCAL_PROTOCOLS = ("file", "local")


def protocol_of(url: str) -> str:
    """`"gs://"` for `gs://bucket/x`, `""` for a local path."""
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def is_remote(url: str) -> bool:
    """An object-store (or any non-local fsspec) URL, as opposed to a local path."""
    return "://" in url and not url.startswith("file://")


def with_protocol(like: str, path: str) -> str:
    """A path as fsspec listed it, given back the protocol prefix of `like` (the URL the user
    wrote): `with_protocol("gs://b/root", "b/root/x") == "gs://b/root/x"`."""
    proto = protocol_of(like)
    return path if not proto or path.startswith(proto) else proto + path


def join_url(root: str, *names: str) -> str:
    """`root/name/...` with exactly one slash between the parts (root may be a URL)."""
    return "/".join([root.rstrip("/"), *(n.strip("/") for n in names)])


def normalize_uri(uri: str) -> str:
    """One spelling per local file: a local path (plain, or `file://`) is made absolute and
    normalised (`dir/./x.jpg`, `dir//x.jpg` and `/cwd/dir/x.jpg` are one URI), keeping the
    protocol prefix as written. Object-store URIs are left alone (`./` is a valid key there)."""
    if "://" not in uri:
        return os.path.abspath(uri)
    proto, rest = uri.split("://", 1)
    if proto in LOCAL_PROTOCOLS:
        return f"{proto}://{os.path.abspath(rest)}"
    return uri


def input_key(spec: str) -> str:
    """The --input as a store remembers it (run.json `input_key`): local paths absolute and
    normalised, no trailing '/' (so `photos`, `./photos/` and `/abs/photos` are one source)."""
    key = normalize_uri(spec)
    return key.rstrip("/") or key


def input_is_folder(spec: str) -> bool:
    """True when the --input is an existing folder (which its listing covers completely)."""
    fs, path = fsspec.core.url_to_fs(spec)
    return fs.isdir(path)


def comparable_uri(uri: str) -> str:
    """A URI spelt for comparison with another: `file://` dropped from local paths."""
    if "://" in uri and uri.split("://", 1)[0] in LOCAL_PROTOCOLS:
        return uri.split("://", 1)[1]
    return uri


def temporary_name(path: str) -> str:
    """A fresh temporary name beside `path` (unique, so concurrent writers never share one)."""
    return f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def is_temporary(name: str) -> bool:
    return name.endswith(TMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """For writers that take a local file name (faiss.write_index, np.savez, pq.write_table):
    yields a temporary path beside `path`; when the block ends without an error the file is
    renamed to `path`, otherwise it is removed.

        with atomic_path(out) as tmp:
            faiss.write_index(index, tmp)
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """`fsspec.open(url, mode)` through a temporary name, renamed to `url` when the block ends
    without an error (else removed). Local paths and any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with fs.open(tmp, mode, **kwargs) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise
    finally:
        fs.invalidate_cache(parent or path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_json_atomic(url: str, data) -> None:
    """JSON (indented, sorted keys) through a temporary name."""
    with atomic_open(url, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------- redaction

REDACTED = "REDACTED"
# Query parameters whose value is a secret (compared case-insensitively): signed-URL signatures
# and credentials (S3 SigV4, GCS V4 and V2, Azure SAS), OAuth and API tokens, passwords.
SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "signature", "sig",
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization", "code",
    "key", "api_key", "apikey", "secret", "client_secret", "password", "passwd", "pwd"})
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s'\"]+@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[^=&;#?\s'\"]+)=)[^&;#\s'\"]*")


def redact(text: str) -> str:
    """`text` (a URI, or a message naming URIs) with credentials blanked: the user-info part
    (`scheme://user:pass@host` -> `scheme://REDACTED@host`) and the values of secret query
    parameters (SECRET_PARAMS: `?X-Amz-Signature=...` -> `?X-Amz-Signature=REDACTED`).
    Everything else, the object's path included, is kept, so the line still says which object."""
    if not text or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY_PARAM.sub(lambda m: f"{m['lead']}{REDACTED}"
                            if m["name"].lower() in SECRET_PARAMS else m[0], text)


_plain_record_factory = None


def redact_logs() -> None:
    """Make every log record of this process go through `redact` (message and traceback),
    whatever library logs it (fsspec and aiohttp name URIs at DEBUG, Beam logs elements):
    installed once as the process's LogRecord factory, so handlers added later are covered too.
    Called by the console (`remap`), the pipeline's launcher and each worker-side step."""
    global _plain_record_factory
    if _plain_record_factory is not None:
        return
    _plain_record_factory = logging.getLogRecordFactory()

    def make_redacted_record(*args, **kwargs):
        record = _plain_record_factory(*args, **kwargs)
        try:
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        except Exception:  # a record that cannot be formatted is the handler's to report
            pass
        return record

    logging.setLogRecordFactory(make_redacted_record)
