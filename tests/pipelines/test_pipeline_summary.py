"""run.json is written by the pipeline's last step (on any runner, with nothing waiting for the
job), a run that loses track of a URI writes none, `--dry_run` reads nothing from the store, and
`--torch_threads` reaches torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import image_cases
from pipelines import decode, embed
from remap_store import lease, runs
from remap_core.descriptor.checkpoint import load_model


def argv(inp, out, model, *extra):
    return [f"--input={inp}", f"--output={out}", f"--model={model}", "--progress_seconds=0",
            *extra]


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    image_cases.write_collection(folder, n_good=4, odd=False, bad=False)
    (folder / "broken.jpg").write_bytes(image_cases.truncated_jpeg())
    return folder


def test_run_json_is_written_by_the_pipeline_not_by_the_launcher(images, tmp_path,
                                                                tiny_model_path):
    store = tmp_path / "store"
    prepared = embed.prepare_run(argv(images, store, tiny_model_path))
    folder = Path(prepared.run_dir)
    assert not (folder / "run.json").exists()
    # the pipeline object alone, on the in-process runner: no post-processing of run()
    prepared.pipeline.run().wait_until_finish()
    s = json.loads((folder / "run.json").read_text())
    assert s["run_id"] == prepared.run_id and s["accounted"]
    assert (s["read"], s["embedded"], s["dead_lettered"], s["skipped"]) == (5, 4, 1, 0)
    assert s["dead_letter_by_reason"] == {"decode.corrupt": 1}
    assert s["shards"] == ["embeddings-00000-of-00001.parquet"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["run.json", *s["shards"], *s["dead_letter"], *s["sources"]])
    assert s["runner"] == embed.LOCAL_RUNNER and s["incremental"] and s["previous_runs"] == []
    assert s["pipeline_version"] == embed.PIPELINE_VERSION and s["seconds"] >= 0

    # the next run sees it as complete and builds on it (nothing to embed)
    again = embed.run(argv(images, store, tiny_model_path))
    assert again["previous_runs"] == [prepared.run_id] and folder.exists()
    assert (again["read"], again["embedded"], again["skipped"]) == (5, 0, 5)
    assert json.loads((Path(store) / f"run-{again['run_id']}" / "run.json").read_text()) == again


def test_no_wait_returns_submitted_and_the_job_still_completes_the_run(images, tmp_path,
                                                                       tiny_model_path):
    store = tmp_path / "store"
    out = embed.run(argv(images, store, tiny_model_path, "--no_wait_until_finish"))
    assert out == {"run_id": out["run_id"], "submitted": True}
    # the in-process runner finishes inside pipeline.run(): its last step wrote run.json
    s = json.loads((store / f"run-{out['run_id']}" / "run.json").read_text())
    assert (s["read"], s["embedded"], s["dead_lettered"]) == (5, 4, 1) and s["accounted"]


def test_a_run_that_loses_a_uri_fails_and_writes_no_run_json(images, tmp_path, tiny_model_path,
                                                             monkeypatch):
    real = decode._FetchAndDecodeFn.process

    def lossy(self, source):          # drops one URI without a trace: the accounting must see it
        if source.uri.endswith("broken.jpg"):
            return
        yield from real(self, source)

    monkeypatch.setattr(decode._FetchAndDecodeFn, "process", lossy)
    store = tmp_path / "store"
    prepared = embed.prepare_run(argv(images, store, tiny_model_path))
    with pytest.raises(Exception, match="lost track of URIs: read 5 but"):
        prepared.pipeline.run().wait_until_finish()
    assert Path(prepared.run_dir).exists() and not (Path(prepared.run_dir) / "run.json").exists()
    # the failed job kept the store's lease; whoever runs a prepared pipeline gives it back
    assert lease.read_lease(str(store))["run_id"] == prepared.run_id
    assert lease.release(str(store), prepared.run_id)
    with pytest.raises(Exception, match="run.json not written"):
        embed.run(argv(images, store, tiny_model_path))
    complete, incomplete = runs.scan_store(str(store))
    assert complete == [] and len(incomplete) == 1   # the next run removes and redoes it


def test_summary_step_with_nothing_to_do_still_writes_run_json(tmp_path, tiny_model_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    s = embed.run(argv(empty, tmp_path / "store", tiny_model_path, "--min_listed=0"))
    assert (s["read"], s["embedded"], s["accounted"], s["shards"]) == (0, 0, True, [])
    assert s["listed_not_images"] == 1


def test_dry_run_reads_nothing_from_the_store_and_runs_nothing(images, tmp_path, tiny_model_path,
                                                                monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a dry run must not touch the store")

    monkeypatch.setattr(runs, "scan_store", refuse)
    monkeypatch.setattr(runs, "remove_incomplete", refuse)
    store = tmp_path / "store"
    out = embed.run(argv(images, store, tiny_model_path, "--dry_run=True"))   # local runner
    assert out["submitted"] and out["dry_run"] and out["graph_built"]
    assert {"ListSources", "Reconcile", "EmbedImages", "WriteRunTables",
            "WriteRunSummary"} <= set(out["transforms"])
    assert not store.exists()                                              # nothing ran

    flags = ["--runner=DataflowRunner", "--dry_run=True", "--no_auth", "--project=remap-dry-run",
             "--region=europe-west1", "--temp_location=gs://remap-dry-run/tmp",
             "--sdk_location=container", "--sdk_container_image=remap-worker:test"]
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    out = embed.run(argv(images, "gs://remap-dry-run/store", tiny_model_path, *flags))
    assert out["dry_run"] and out["run_dir"].startswith("gs://remap-dry-run/store/run-")
    assert "WriteRunSummary" in out["transforms"]


def test_dry_run_false_is_not_a_dry_run():
    from apache_beam.options.pipeline_options import PipelineOptions

    assert not embed.is_dry_run(PipelineOptions(["--dry_run=False"]))
    assert not embed.is_dry_run(PipelineOptions([]))
    assert embed.is_dry_run(PipelineOptions(["--dry_run=True"]))


def test_torch_threads_reaches_torch(images, tmp_path, tiny_model_path):
    import torch

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    try:
        s = embed.run(argv(images, tmp_path / "store", tiny_model_path,
                       f"--torch_threads={target}"))
        assert s["embedded"] == 4
        assert torch.get_num_threads() == target     # set in the worker (this process here)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--torch_threads must be at least 1"):
        embed.run(argv(images, tmp_path / "store2", tiny_model_path, "--torch_threads=0"))


def test_torch_threads_unset_leaves_torch_alone(monkeypatch, tiny_model_path):
    import torch

    from pipelines.inference import EmbedModelHandler

    fingerprint = load_model(tiny_model_path, device="cpu").fingerprint
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    EmbedModelHandler(tiny_model_path, fingerprint, device="cpu").load_model()
    assert calls == []
    EmbedModelHandler(tiny_model_path, fingerprint, device="cpu",
                      torch_threads=torch.get_num_threads() + 1).load_model()
    assert calls == [torch.get_num_threads() + 1]
