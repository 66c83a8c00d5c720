"""Beam's portable services on 127.0.0.1 for tests, started and stopped by pytest fixtures: the
local job service (`job_service` -> "127.0.0.1:PORT" for --job_endpoint) and an EXTERNAL SDK
worker pool (`worker_pool` -> "127.0.0.1:PORT" for --environment_config), how Beam Python runs on
Flink. Import the fixtures into a test module:

    from beam_services import job_service, worker_pool  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from objectstore import LOOPBACK, free_port

VENV_BIN = str(Path(sys.executable).parent)


def service_env() -> dict:
    """Workers the job service / pool spawn run `python`: the venv's must come first on PATH,
    or they die with "No module named 'apache_beam'" and the job hangs."""
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return env


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
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
    proc = subprocess.Popen([sys.executable, "-m", *args], env=service_env(), stdout=out,
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
