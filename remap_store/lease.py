"""One writer per embedding store at a time: the store lease `<store>/_lease.json`.

Two `remap embed` runs on one store would each take the other's unfinished run folder for the
remains of a killed run and delete it, and both would hand out the same new ids. So a run takes
the store's lease before it reads or cleans the store, and its job gives it back as its last
step, after `run.json`:

- Taken by an exclusive create (a hard link of a complete file locally; `If-None-Match: *` on
  S3; `ifGenerationMatch=0` on GCS): of two runs starting together exactly one gets it, and the
  other is refused with the holder's run id, host, runner and expiry.
- It expires. A launcher that waits for its job renews it (a quarter of the lease's time at a
  time); a job nobody waits for (Flex Template, `--no_wait_until_finish`) holds it for its
  whole, longer, time.
- A lease is stale, and taken over with a warning, when its run completed (its run.json
  exists), when it expired, or when it was taken by a local runner on this host whose process is
  gone (a killed `remap embed`). `--break_lease` takes over a live one.
- The job's last step checks that its run still holds the lease before and after it writes
  run.json: a job whose lease was taken over fails, and removes its run.json, rather than
  complete a run folder the new holder may have removed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import threading
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

from remap_store import runs
from remap_store.files import atomic_path, join_url, redact, temporary_name

LEASE = "_lease.json"
log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live run holds the store's lease. `remap embed` exits with 75 (EX_TEMPFAIL: try
    again later), which a scheduler can treat as retryable."""

    exit_status = 75


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it expired, or --break_lease) while its job ran."""


def lease_url(store: str) -> str:
    return join_url(store, LEASE)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def new_lease(run_id: str, seconds: float, *, local: bool, renewed: bool,
              now: float | None = None) -> dict:
    """The lease body of a run starting now. `local`: its job runs in this process (a killed
    process means a dead job); `renewed`: a launcher renews it while it waits."""
    now = time.time() if now is None else now
    return {"run_id": run_id, "token": secrets.token_hex(8), "host": socket.gethostname(),
            "pid": os.getpid(), "local": local, "renewed": renewed, "seconds": float(seconds),
            "acquired_at": now, "expires_at": now + seconds}


def describe(lease: dict) -> str:
    how = "a local runner" if lease.get("local") else "a remote runner"
    renew = "renewed while its launcher waits" if lease.get("renewed") else "not renewed"
    return (f"run {lease.get('run_id')} (host {lease.get('host')}, pid {lease.get('pid')}, "
            f"{how}) since {_iso(lease.get('acquired_at', 0))}, expires "
            f"{_iso(lease.get('expires_at', 0))} ({renew})")


# --------------------------------------------------------------------------- storage

def _create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` at `url` unless something is there; False if something was."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        # fsspec's local mode="create" checks, then writes: not atomic. A hard link is, and
        # readers never see a half-written lease: the lease is written whole under a temporary
        # name, then linked to its own (which fails if something is there), never renamed.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = temporary_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    finally:
        fs.invalidate_cache(path)
    return True


def _overwrite(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)


def read_lease(store: str) -> dict | None:
    """The store's lease, or None if nobody holds it."""
    fs, path = fsspec.core.url_to_fs(lease_url(store))
    fs.invalidate_cache(path)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(raw)
        if not isinstance(lease, dict) or "run_id" not in lease:
            raise ValueError("not a lease")
        return lease
    except ValueError:
        raise LeaseHeld(f"{lease_url(store)} is not a lease remap wrote ({raw[:80]!r}); if no "
                        f"run is writing to the store, delete it or pass --break_lease") from None


def _remove(store: str) -> None:
    fs, path = fsspec.core.url_to_fs(lease_url(store))
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def _run_completed(store: str, run_id: str) -> bool:
    fs, path = fsspec.core.url_to_fs(runs.run_summary_url(runs.run_folder(store, run_id)))
    fs.invalidate_cache(path)
    return fs.exists(path)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def stale_reason(store: str, lease: dict, now: float | None = None) -> str | None:
    """Why `lease` no longer protects a live run, or None if it may."""
    now = time.time() if now is None else now
    if _run_completed(store, lease["run_id"]):
        return "its run completed"
    if now >= float(lease.get("expires_at", 0)):
        return f"it expired at {_iso(float(lease.get('expires_at', 0)))}"
    if (lease.get("local") and lease.get("host") == socket.gethostname()
            and isinstance(lease.get("pid"), int) and _process_gone(lease["pid"])):
        return f"its process (pid {lease['pid']} on this host) is gone"
    return None


# --------------------------------------------------------------------------- the protocol

def acquire(store: str, lease: dict, *, break_lease: bool = False) -> dict:
    """Take the store's lease for `lease` (a `new_lease` body), taking over a stale one (or,
    with break_lease, the live one held now). Raises LeaseHeld, naming the holder."""
    url = lease_url(store)
    data = json.dumps(lease, sort_keys=True).encode()
    broken = None
    for _ in range(5):
        if _create_exclusive(url, data):
            return lease
        current = read_lease(store)
        if current is None:
            continue                      # released between our create and our read
        why = stale_reason(store, current)
        if why is None and break_lease and broken in (None, current.get("token")):
            why = "--break_lease"
        if why is None:
            raise LeaseHeld(
                f"store {store} is being written by {describe(current)}. Wait for that run to "
                f"finish; if it is dead (its job failed or was cancelled), rerun with "
                f"--break_lease, or wait until the lease expires")
        log.warning("taking over the lease of store %s from %s: %s", redact(store),
                    describe(current), why)
        broken = current.get("token")
        if read_lease(store) == current:  # unchanged since we judged it
            _remove(store)
    raise LeaseHeld(f"could not take the lease of store {store}: other runs keep taking it")


def renew(store: str, lease: dict, now: float | None = None) -> str:
    """Extend `lease` by its own time. Returns "renewed", "released" (nobody holds it: the
    job gave it back) or "taken" (another run holds it now)."""
    current = read_lease(store)
    if current is None:
        return "released"
    if current.get("token") != lease["token"]:
        return "taken"
    now = time.time() if now is None else now
    lease["renewed_at"] = now
    lease["expires_at"] = now + lease["seconds"]
    _overwrite(lease_url(store), json.dumps(lease, sort_keys=True).encode())
    return "renewed"


def release(store: str, run_id: str) -> bool:
    """Give the lease back if `run_id` holds it; False if it did not."""
    try:
        current = read_lease(store)
    except LeaseHeld:
        return False
    if current is None or current.get("run_id") != run_id:
        return False
    _remove(store)
    return True


def check_held(store: str, run_id: str) -> None:
    """Raise LeaseLost unless `run_id` holds the store's lease."""
    current = read_lease(store)
    if current is None or current.get("run_id") != run_id:
        holder = "nobody" if current is None else describe(current)
        raise LeaseLost(f"run {run_id} no longer holds the lease of store {store} (held by "
                        f"{holder}): its lease expired or was broken while the job ran, and "
                        f"another run may have removed its files. run.json not written; the "
                        f"next run redoes this work")


class Renewer:
    """Renews a lease in a background thread while the launcher waits for its job."""

    def __init__(self, store: str, lease: dict, every: float | None = None):
        self.store, self.lease = store, lease
        self.every = every if every is not None else max(1.0, lease["seconds"] / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="remap-lease", daemon=True)
        self.outcome = "renewing"

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.outcome = renew(self.store, self.lease)
            except Exception as e:        # a passing storage error: try again next time
                log.warning("could not renew the lease of store %s: %s", redact(self.store),
                            redact(str(e)))
                continue
            if self.outcome == "taken":
                log.error("run %s lost the lease of store %s to another run; its job will "
                          "fail at its last step", self.lease["run_id"], redact(self.store))
                return
            if self.outcome == "released":
                return

    def __enter__(self) -> "Renewer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
