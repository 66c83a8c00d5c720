"""The embed pipeline on Beam's own runners: the DirectRunner in multi-processing mode (kept off
Prism's download), and the PortableRunner against the local job service with LOOPBACK workers
and with an EXTERNAL worker pool (how Beam Python runs on Flink). Every runner must give the
same rows as the in-process default."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import image_cases
from objectstore import LOOPBACK, free_port
from pipelines.embed import local_defaults, run
from remap_store.schema import embeddings_to_numpy

VENV_BIN = str(Path(sys.executable).parent)


def _env() -> dict:
    # Workers the job service / pool spawn run `python`: the venv's must come first on PATH,
    # or they die with "No module named 'apache_beam'" and the job hangs.
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return env


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{proc.args} did not listen on {port} in {timeout} s")


def _start(args: list[str], port: int, log: Path):
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", *args], env=_env(), stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc)
    except Exception:
        proc.kill()
        out.close()
        raise
    return proc, out


def _stop(proc, out):
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    out.close()


@pytest.fixture(scope="module")
def job_service(tmp_path_factory):
    port = free_port()
    logs = tmp_path_factory.mktemp("job_service")
    proc, out = _start(["apache_beam.runners.portability.local_job_service_main",
                        f"--port={port}", f"--staging_dir={logs / 'staging'}"], port,
                       logs / "log.txt")
    yield f"{LOOPBACK}:{port}"
    _stop(proc, out)


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    port = free_port()
    logs = tmp_path_factory.mktemp("worker_pool")
    proc, out = _start(["apache_beam.runners.worker.worker_pool_main",
                        f"--service_port={port}"], port, logs / "log.txt")
    yield f"{LOOPBACK}:{port}"
    _stop(proc, out)


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_model_path):
    """A small mixed collection and the rows the in-process default runner makes of it."""
    root = tmp_path_factory.mktemp("runners")
    cases = image_cases.write_collection(root / "images", n_good=4, odd=False, bad=False)
    for name in ("cmyk.jpg", "animated.gif"):
        (root / "images" / name).write_bytes(image_cases.GOOD_ODD[name]())
    (root / "images" / "truncated.jpg").write_bytes(image_cases.truncated_jpeg())
    reference = run([f"--input={root / 'images'}", f"--output={root / 'reference'}",
                     f"--model={tiny_model_path}", "--progress_seconds=0"])
    return root, cases, _rows(root / "reference", reference)


def _rows(store: Path, summary: dict) -> dict:
    folder = store / f"run-{summary['run_id']}"
    t = pa.concat_tables([pq.read_table(folder / s) for s in summary["shards"]])
    return dict(zip(t.column("uri").to_pylist(), embeddings_to_numpy(t.column("embedding"))))


def _check_same_as_reference(store, summary, reference):
    import numpy as np

    assert (summary["read"], summary["embedded"], summary["dead_lettered"]) == (7, 6, 1)
    assert summary["accounted"] and summary["dead_letter_by_reason"] == {"decode.corrupt": 1}
    rows = _rows(store, summary)
    assert sorted(rows) == sorted(reference)
    for uri, vec in rows.items():
        np.testing.assert_allclose(vec, reference[uri], atol=2e-5)


def test_direct_runner_multi_processing_never_tries_prism(collection, tiny_model_path, caplog):
    root, _, reference = collection
    store = root / "direct_mp"
    argv = [f"--input={root / 'images'}", f"--output={store}", f"--model={tiny_model_path}",
            "--progress_seconds=0", "--runner=DirectRunner",
            "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    assert "--allow_unsafe_triggers" in local_defaults(argv)
    with caplog.at_level(logging.INFO, logger="apache_beam.runners.direct.direct_runner"):
        summary = run(argv)
    assert not [r for r in caplog.records if "Prism" in r.getMessage()]
    assert summary["runner"] == "DirectRunner"
    _check_same_as_reference(store, summary, reference)


def test_portable_runner_loopback(collection, tiny_model_path, job_service):
    root, _, reference = collection
    store = root / "portable_loopback"
    summary = run([f"--input={root / 'images'}", f"--output={store}",
                   f"--model={tiny_model_path}", "--progress_seconds=0",
                   "--runner=PortableRunner", f"--job_endpoint={job_service}",
                   "--environment_type=LOOPBACK"])
    _check_same_as_reference(store, summary, reference)


def test_portable_runner_external_worker_pool(collection, tiny_model_path, job_service,
                                              worker_pool):
    root, _, reference = collection
    store = root / "portable_external"
    summary = run([f"--input={root / 'images'}", f"--output={store}",
                   f"--model={tiny_model_path}", "--progress_seconds=0",
                   "--runner=PortableRunner", f"--job_endpoint={job_service}",
                   "--environment_type=EXTERNAL", f"--environment_config={worker_pool}"])
    _check_same_as_reference(store, summary, reference)
