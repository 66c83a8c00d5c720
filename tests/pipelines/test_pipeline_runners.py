"""The embed pipeline on Beam's own runners: the DirectRunner in multi-processing mode (kept off
Prism's download), and the PortableRunner against the local job service with LOOPBACK workers
and with an EXTERNAL worker pool (how Beam Python runs on Flink). Every runner must give the
same rows as the in-process default."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import image_cases
from beam_services import job_service, worker_pool  # noqa: F401  (pytest fixtures)
from pipelines.embed import local_defaults, run
from remap_store.schema import embeddings_to_numpy


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
