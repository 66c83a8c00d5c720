"""One writer per embedding store: the store lease (remap_store/lease.py), on the local filesystem
and on real object-storage servers on 127.0.0.1, and `remap embed` honouring it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import image_cases as C
from objectstore import fake_gcs, moto_s3  # noqa: F401  (pytest fixtures)
from pipelines import decode, launch
from remap_store import lease as L


def lease_for(run_id: str, seconds: float = 600, *, local: bool = True, **kw) -> dict:
    return L.new_lease(run_id, seconds, local=local, renewed=True, **kw)


def embed(inp, out, model, *extra):
    return launch.run([f"--input={inp}", f"--output={out}", f"--model={model}",
                  "--progress_seconds=0", *extra])


@pytest.fixture(params=["local", "gs", "s3"])
def store(request, tmp_path):
    """A store URL on the local filesystem, fake-gcs-server or moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("fake_gcs" if request.param == "gs" else "moto_s3")
    return server.bucket(f"lease-{request.node.callspec.id}-{time.monotonic_ns() % 10**9}") \
        + "/store"


def test_one_writer_at_a_time_and_the_refusal_names_the_holder(store):
    first = L.acquire(store, lease_for("20260101T000000Z-aaaaaa"))
    with pytest.raises(L.LeaseHeld, match=r"run 20260101T000000Z-aaaaaa \(host .*--break_lease"):
        L.acquire(store, lease_for("20260101T000001Z-bbbbbb"))
    assert L.read_lease(store) == first
    assert not L.release(store, "20260101T000001Z-bbbbbb")      # not the holder: nothing done
    assert L.release(store, "20260101T000000Z-aaaaaa")
    assert L.read_lease(store) is None
    second = L.acquire(store, lease_for("20260101T000001Z-bbbbbb"))
    assert L.read_lease(store)["token"] == second["token"]


def test_runs_starting_together_get_exactly_one_lease(store):
    n = 6
    barrier = threading.Barrier(n)
    won, refused, errors = [], [], []

    def contend(i):
        barrier.wait()
        try:
            won.append(L.acquire(store, lease_for(f"run{i}"))["run_id"])
        except L.LeaseHeld:
            refused.append(i)
        except Exception as e:            # anything else is a bug of the exclusive create
            errors.append(repr(e))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(won) == 1 and len(refused) == n - 1
    assert L.read_lease(store)["run_id"] == won[0]


def test_stale_leases_are_taken_over_and_live_ones_are_not(tmp_path):
    store = str(tmp_path / "store")
    # expired: its launcher stopped renewing it
    L.acquire(store, lease_for("old", seconds=60, now=time.time() - 120))
    assert L.acquire(store, lease_for("new"))["run_id"] == "new"

    # its run completed (run.json written) but the job died before giving the lease back
    done = tmp_path / "store" / "run-new"
    done.mkdir(parents=True)
    (done / "run.json").write_text("{}")
    assert L.stale_reason(store, L.read_lease(store)) == "its run completed"
    assert L.acquire(store, lease_for("after-done"))["run_id"] == "after-done"
    L.release(store, "after-done")

    # a local run on this host whose process is gone (a killed `remap embed`)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = lease_for("killed")
    dead["pid"] = int(gone.stdout)
    L.acquire(store, dead)
    assert "is gone" in L.stale_reason(store, L.read_lease(store))
    assert L.acquire(store, lease_for("next"))["run_id"] == "next"
    L.release(store, "next")

    # the same, but its job runs on a remote runner: a dead launcher says nothing of the job
    remote = lease_for("remote", local=False)
    remote["pid"] = int(gone.stdout)
    L.acquire(store, remote)
    assert L.stale_reason(store, L.read_lease(store)) is None
    with pytest.raises(L.LeaseHeld, match="a remote runner"):
        L.acquire(store, lease_for("next"))

    # --break_lease takes over a live lease, with a warning
    assert L.acquire(store, lease_for("forced"), break_lease=True)["run_id"] == "forced"


def test_renewal_extends_the_lease_and_notices_a_takeover(tmp_path):
    store = str(tmp_path / "store")
    mine = L.acquire(store, lease_for("mine", seconds=60, now=time.time() - 30))
    before = L.read_lease(store)["expires_at"]
    assert L.renew(store, mine) == "renewed"
    assert L.read_lease(store)["expires_at"] > before + 25

    with L.Renewer(store, mine, every=0.5) as renewer:
        # take over right after a renewal, while the renewer sleeps (renewal is read-then-write:
        # a takeover inside that window would be overwritten, and caught at the job's end)
        last = L.read_lease(store)["renewed_at"]
        deadline = time.monotonic() + 10
        while L.read_lease(store)["renewed_at"] == last and time.monotonic() < deadline:
            time.sleep(0.01)
        L.acquire(store, lease_for("thief"), break_lease=True)
        deadline = time.monotonic() + 10
        while renewer.outcome != "taken" and time.monotonic() < deadline:
            time.sleep(0.02)
    assert renewer.outcome == "taken"
    assert L.read_lease(store)["run_id"] == "thief"             # the renewer did not overwrite it
    assert L.release(store, "thief") and L.renew(store, mine) == "released"


def test_an_unreadable_lease_is_refused_with_a_clear_error(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / L.LEASE).write_text("not json")
    with pytest.raises(L.LeaseHeld, match="is not a lease remap wrote"):
        L.acquire(str(store), lease_for("r"))


# --------------------------------------------------------------------------- remap embed

def test_a_second_run_leaves_a_live_runs_folder_alone(tmp_path, tiny_model_path):
    """The bug the lease fixes: a run started while another was writing took the other's
    unfinished folder for a killed run's remains and deleted it."""
    images = tmp_path / "images"
    C.write_collection(images, n_good=3, odd=False, bad=False)
    store = tmp_path / "store"
    live = store / "run-20260101T000000000Z-live00"
    live.mkdir(parents=True)
    (live / "embeddings-00000-of-00001.parquet").write_bytes(b"being written")
    L.acquire(str(store), lease_for("20260101T000000000Z-live00", local=False))

    with pytest.raises(L.LeaseHeld, match="20260101T000000000Z-live00"):
        embed(images, store, tiny_model_path)
    assert live.exists() and L.read_lease(str(store))["run_id"] == "20260101T000000000Z-live00"

    # the operator knows that run is dead: --break_lease, and its remains are removed as usual
    s = embed(images, store, tiny_model_path, "--break_lease")
    assert (s["read"], s["embedded"]) == (3, 3)
    assert not live.exists()
    assert L.read_lease(str(store)) is None                    # the job gave the lease back
    assert [p.name for p in store.iterdir()] == [f"run-{s['run_id']}"]


def test_a_job_that_lost_its_lease_does_not_complete_its_run(tmp_path, tiny_model_path):
    images = tmp_path / "images"
    C.write_collection(images, n_good=2, odd=False, bad=False)
    store = tmp_path / "store"
    prepared = launch.prepare_run([f"--input={images}", f"--output={store}",
                              f"--model={tiny_model_path}", "--progress_seconds=0"])
    assert L.read_lease(str(store))["run_id"] == prepared.run_id
    # while its job runs, its lease lapses and another run takes the store over
    L.acquire(str(store), lease_for("99991231T000000000Z-other0"), break_lease=True)
    with pytest.raises(Exception, match="no longer holds the lease"):
        prepared.pipeline.run().wait_until_finish()
    assert not (Path(prepared.run_dir) / "run.json").exists()
    assert L.read_lease(str(store))["run_id"] == "99991231T000000000Z-other0"   # untouched


def test_a_failed_run_gives_the_lease_back(tmp_path, tiny_model_path, monkeypatch):
    images = tmp_path / "images"
    C.write_collection(images, n_good=2, odd=False, bad=False)
    store = tmp_path / "store"

    def boom(self, *a, **k):
        raise RuntimeError("worker crashed")

    monkeypatch.setattr(decode._FetchAndDecodeFn, "process", boom)
    with pytest.raises(Exception, match="worker crashed"):
        embed(images, store, tiny_model_path)
    assert L.read_lease(str(store)) is None          # a retry need not wait for it to lapse
    monkeypatch.undo()
    s = embed(images, store, tiny_model_path)
    assert (s["read"], s["embedded"]) == (2, 2)
    assert len(list(store.glob("run-*"))) == 1       # the failed run's folder was removed


def test_lease_options_are_checked(tmp_path, tiny_model_path):
    with pytest.raises(ValueError, match="--lease_minutes must be positive"):
        embed(tmp_path, tmp_path / "store", tiny_model_path, "--lease_minutes=0")
    assert not (tmp_path / "store").exists()         # refused before the store was touched


def test_remap_embed_refusal_is_one_line_with_a_retryable_exit_status(tmp_path, tiny_model_path,
                                                                      capsys):
    from remap_cli import main

    store = tmp_path / "store"
    L.acquire(str(store), lease_for("20260101T000000000Z-live00", local=False))
    rc = main(["embed", f"--input={tmp_path}", f"--output={store}", f"--model={tiny_model_path}"])
    err = capsys.readouterr().err
    assert rc == 75                                  # EX_TEMPFAIL: a scheduler may retry later
    assert err.startswith("remap embed: error: store ") and "20260101T000000000Z-live00" in err
    assert "Traceback" not in err
