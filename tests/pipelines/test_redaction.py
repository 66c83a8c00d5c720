"""URIs that carry credentials (`user:pass@host`, signed-URL query strings) never reach a log
line, a dead-letter row or the console: `remap_store.files.redact`, checked on its own and
through a real `remap embed` run over HTTP (a loopback server) whose URIs carry secrets."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import threading

import pyarrow.parquet as pq
import pytest

import image_cases
import remap_cli
from remap_store.files import redact

SECRETS = ("s3cretpw", "AKIAEXAMPLEKEY", "sigv4deadbeef", "googsig0123", "azuresig99",
           "oauthtok77")


@pytest.mark.parametrize("uri,expected", [
    ("https://alice:s3cretpw@cdn.example/p/a.jpg",
     "https://REDACTED@cdn.example/p/a.jpg"),
    ("https://b.s3.amazonaws.com/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=AKIAEXAMPLEKEY%2F20261127&X-Amz-Date=20261127T000000Z"
     "&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=sigv4deadbeef",
     "https://b.s3.amazonaws.com/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=REDACTED&X-Amz-Date=20261127T000000Z"
     "&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=REDACTED"),
    ("https://storage.googleapis.com/b/a.jpg?x-goog-signature=googsig0123&x-goog-expires=60",
     "https://storage.googleapis.com/b/a.jpg?x-goog-signature=REDACTED&x-goog-expires=60"),
    ("https://acct.blob.core.windows.net/c/a.jpg?sv=2024&sp=r&sig=azuresig99",
     "https://acct.blob.core.windows.net/c/a.jpg?sv=2024&sp=r&sig=REDACTED"),
    ("https://api.example/img?id=7&token=oauthtok77#top",
     "https://api.example/img?id=7&token=REDACTED#top"),
    ("https://TOKENONLY@git.example/x.png", "https://REDACTED@git.example/x.png"),
    ("https://u:p@ss@host/x.jpg", "https://REDACTED@host/x.jpg"),   # '@' in the password
    # nothing secret: unchanged (an '@' in an object key is not user-info)
    ("gs://bucket/people/ann@example.com.jpg", "gs://bucket/people/ann@example.com.jpg"),
    ("s3://bucket/a.jpg", "s3://bucket/a.jpg"),
    ("/data/photos/x=1/a.jpg", "/data/photos/x=1/a.jpg"),
    ("https://h/a.jpg?width=200&page=2", "https://h/a.jpg?width=200&page=2"),
])
def test_redact_blanks_credentials_and_keeps_the_rest(uri, expected):
    assert redact(uri) == expected
    assert redact(expected) == expected                       # idempotent


def test_redact_finds_uris_inside_messages():
    msg = ("ClientResponseError: 404, message='Not Found', url='http://bob:s3cretpw@"
           "127.0.0.1:9/x.jpg?X-Amz-Signature=sigv4deadbeef'")
    out = redact(msg)
    assert "s3cretpw" not in out and "sigv4deadbeef" not in out
    assert out.startswith("ClientResponseError: 404") and "127.0.0.1:9/x.jpg" in out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):   # the test's own server: not part of remap's logs
        pass


@pytest.fixture()
def http_images(tmp_path):
    """A loopback HTTP server over a folder: two good JPEGs and a truncated one (query strings
    and user-info are ignored by the server, as a CDN ignores a signature it accepts)."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "good1.jpg").write_bytes(image_cases.jpeg(90, 60, seed=1))
    (root / "good2.jpg").write_bytes(image_cases.jpeg(60, 90, seed=2))
    (root / "broken.jpg").write_bytes(image_cases.truncated_jpeg())
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_embed_run_over_signed_urls_leaks_no_credential(http_images, tmp_path, tiny_model_path,
                                                        caplog, capsys):
    base = http_images.replace("http://", "")
    uris = {
        "good1": f"http://alice:s3cretpw@{base}/good1.jpg",
        "good2": f"http://{base}/good2.jpg?X-Amz-Credential=AKIAEXAMPLEKEY&"
                 f"X-Amz-Signature=sigv4deadbeef",
        "broken": f"http://{base}/broken.jpg?x-goog-signature=googsig0123",
        "missing": f"http://alice:s3cretpw@{base}/missing.jpg?sv=1&sig=azuresig99",
        "also_missing": f"http://{base}/gone.jpg?token=oauthtok77",
    }
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(uris.values()) + "\n")
    store = tmp_path / "store"
    caplog.set_level(logging.DEBUG)
    status = remap_cli.main(["embed", f"--input={listing}", f"--output={store}",
                             f"--model={tiny_model_path}", "--progress_seconds=0.001"])
    out, err = capsys.readouterr()
    assert status == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["read"], summary["embedded"], summary["dead_lettered"]) == (5, 2, 3)

    run_dir = next(store.glob("run-*"))
    dead = pq.read_table(next(run_dir.glob("dead_letter*.parquet"))).to_pylist()
    assert len(dead) == 3
    by_path = {row["uri"].split("?")[0].rsplit("/", 1)[1]: row for row in dead}
    assert by_path["broken.jpg"]["uri"] == (f"http://{base}/broken.jpg?"
                                            f"x-goog-signature=REDACTED")
    assert by_path["broken.jpg"]["error_type"] == "corrupt"
    assert by_path["missing.jpg"]["uri"] == f"http://REDACTED@{base}/missing.jpg?sv=1&sig=REDACTED"
    assert by_path["gone.jpg"]["uri"] == f"http://{base}/gone.jpg?token=REDACTED"
    assert {by_path[n]["error_type"] for n in ("missing.jpg", "gone.jpg")} == {"not_found"}

    everything = [json.dumps(dead), out, err, *(r.getMessage() for r in caplog.records)]
    for secret in SECRETS:
        leaks = [text for text in everything if secret in text]
        assert not leaks, (secret, leaks[:1])
    # the logs were not empty: the run logged its progress and summary
    assert any("complete" in r.getMessage() for r in caplog.records)


def test_console_error_naming_a_credentialed_input_is_redacted(http_images, tmp_path, capsys):
    base = http_images.replace("http://", "")
    status = remap_cli.main(["embed", f"--input=http://alice:s3cretpw@{base}/nothing/*.jpg"
                                      f"?token=oauthtok77", f"--output={tmp_path / 'store'}"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("remap embed: error: ")
    assert "s3cretpw" not in err and "oauthtok77" not in err
    assert f"http://REDACTED@{base}/nothing/" in err
