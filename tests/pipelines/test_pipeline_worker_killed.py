"""A killed SDK worker: `remap embed` on the PortableRunner (Beam's local job service) with an
EXTERNAL worker pool, how Beam Python runs on Flink. The pool's SDK harness process is
SIGKILLed while it runs the job's bundles (once it has loaded torch: it is past connecting to the
runner and embeds; the job then still has seconds of images to embed, so the kill lands inside
the job on a slow or a fast machine alike); the run must fail (the local job service does not
retry a bundle) without a run.json, with the store's lease given back and one line from
`remap embed` that says so, and the next `remap embed` must remove the killed run's remains and
embed every image exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import image_cases
import remap_cli
from beam_services import _start, _stop, job_service, service_env  # noqa: F401  (fixture)
from objectstore import LOOPBACK, free_port
from remap_store.lease import LEASE

REPO = Path(__file__).parents[2]
N_GOOD = 24      # small photos of image_cases.write_collection
N_LARGE = 24     # and larger ones: seconds of embedding after the worker has loaded torch


def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of `pid`, read from /proc."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(d.name))
    return kids


def _loaded_torch(pid: int) -> bool:
    """The process has mapped torch's library: an SDK harness does that when it sets up the
    job's embed step (after it connected to the runner and took the job's bundles)."""
    try:
        return "libtorch" in (Path("/proc") / str(pid) / "maps").read_text()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
def pool(tmp_path):
    """An EXTERNAL SDK worker pool whose process this test can see: (address, pool process).
    Its workers are `python -c "...SdkHarness(...).run()"` children of the pool process."""
    port = free_port()
    proc, out = _start(["apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
                       port, tmp_path / "worker_pool.log")
    yield f"{LOOPBACK}:{port}", proc
    _stop(proc, out)


def _embed_args(images, store, model, job_endpoint, pool_address) -> list[str]:
    return ["embed", f"--input={images}", f"--output={store}", f"--model={model}",
            f"--num_shards={N_GOOD + N_LARGE}", "--progress_seconds=0", "--runner=PortableRunner",
            f"--job_endpoint={job_endpoint}", "--environment_type=EXTERNAL",
            f"--environment_config={pool_address}"]


def test_a_killed_sdk_worker_fails_the_run_and_the_next_run_embeds_every_image_once(
        tmp_path, tiny_model_path, job_service, pool, capsys):
    images = tmp_path / "images"
    cases = image_cases.write_collection(images, n_good=N_GOOD, odd=False, bad=False)
    for i in range(N_LARGE):
        large = images / f"large_{i:03d}.jpg"
        large.write_bytes(image_cases.jpeg(1024, 768, seed=500 + i))
        cases["good"].append(str(large))
    (images / "truncated.jpg").write_bytes(image_cases.truncated_jpeg())
    n_images = N_GOOD + N_LARGE
    store = tmp_path / "store"
    pool_address, pool_proc = pool

    # a real process: its exit status and what it prints are the point
    first = subprocess.Popen(
        [sys.executable, "-m", "remap_cli",
         *_embed_args(images, store, tiny_model_path, job_service, pool_address)],
        env={**service_env(), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        worker, killed_at = None, None
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline:
            if worker is None:
                harnesses = [k for k in _children(pool_proc.pid) if "SdkHarness" in _cmdline(k)]
                worker = harnesses[0] if harnesses else None
            elif _loaded_torch(worker):   # the worker runs the job's embed step
                os.kill(worker, signal.SIGKILL)
                killed_at = time.monotonic()
                break
            time.sleep(0.01)
        assert killed_at is not None, "the job ended (or never started a worker) before the kill"
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    failed_after = time.monotonic() - killed_at
    err = err.decode(errors="replace")

    # no retry on this runner: the job fails (FnApiRunner inside the job service: "Channel
    # closed prematurely"), and remap embed says so in one line, exit 1: no traceback
    assert first.returncode == 1, err[-2000:]
    # the launcher's INFO lines, then the one error line
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("INFO pipelines.")]
    assert len(lines) == 1, err[-2000:]
    (line,) = lines
    assert line.startswith("remap embed: error: the job of run "), line
    assert "failed on the runner (RuntimeError: Channel closed prematurely.)" in line, line
    assert "nothing of it was published" in line and "lease was released" in line, line
    assert line.endswith("run the same command again to finish the work"), line
    assert "Traceback" not in err
    assert failed_after < 60
    assert out == b""
    killed = list(store.glob("run-*"))     # the killed run's folder, if it got to write one
    assert len(killed) <= 1
    assert not any((k / "run.json").exists() for k in killed)   # never completed
    assert not (store / LEASE).exists()                         # the lease was given back

    # the same command again, in-process this time (same job service and pool: the pool
    # starts a new worker)
    capsys.readouterr()
    assert remap_cli.main(_embed_args(images, store, tiny_model_path, job_service,
                                      pool_address)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert not any(k.exists() for k in killed)             # the killed run's remains removed
    assert not (store / LEASE).exists()
    (folder,) = list(store.glob("run-*"))
    assert folder.name == f"run-{printed['run_id']}"
    summary = json.loads((folder / "run.json").read_text())
    assert summary["accounted"]
    assert (summary["read"], summary["embedded"], summary["dead_lettered"],
            summary["skipped"]) == (n_images + 1, n_images, 1, 0)
    assert summary["dead_letter_by_reason"] == {"decode.corrupt": 1}
    ids, uris = [], []
    for shard in summary["shards"]:
        t = pq.read_table(folder / shard, columns=["id", "uri"])
        ids += t.column("id").to_pylist()
        uris += t.column("uri").to_pylist()
    assert len(ids) == len(set(ids)) == n_images
    assert sorted(uris) == sorted(cases["good"])
