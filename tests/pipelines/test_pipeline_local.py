"""`remap embed` end to end on the local in-process runner: accounting, dead letter, shard
contract, incremental nightly runs with tombstones, resuming after a killed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import image_cases
from pipelines.embed import run
from pipelines.prepare import prepare
from remap_core.descriptor.checkpoint import load_model
from remap_store.schema import (META_DIM, META_MODEL, ROW_GROUP_ROWS, embeddings_to_numpy,
                                     read_tombstone_uris, stable_id)


def embed(inp, out, model, *extra):
    return run([f"--input={inp}", f"--output={out}", f"--model={model}",
                "--progress_seconds=0", *extra])


def run_dir(store, summary) -> Path:
    return Path(store) / f"run-{summary['run_id']}"


def read_table(folder: Path, names: list[str]):
    import pyarrow as pa

    tables = [pq.read_table(folder / n) for n in names]
    return pa.concat_tables(tables) if tables else None


def live_embeddings(store) -> dict[str, np.ndarray]:
    """Reference reader of a store: complete runs oldest first, shards add/replace URIs,
    tombstones remove them (what index_builder's load_embeddings is to do)."""
    live = {}
    for manifest in sorted(Path(store).glob("run-*/run.json")):
        summary = json.loads(manifest.read_text())
        folder = manifest.parent
        for shard in summary["shards"]:
            t = pq.read_table(folder / shard)
            for u, v in zip(t.column("uri").to_pylist(),
                            embeddings_to_numpy(t.column("embedding"))):
                live[u] = v
        for u in read_tombstone_uris([str(folder / n) for n in summary["tombstones"]]):
            live.pop(u, None)
    return live


@pytest.fixture()
def collection(tmp_path):
    images = tmp_path / "images"
    cases = image_cases.write_collection(images, n_good=6)
    return images, cases


def test_every_input_uri_is_accounted_for(collection, tmp_path, tiny_model_path):
    images, cases = collection
    missing = str(images / "deleted_before_read.jpg")
    manifest = tmp_path / "manifest.txt"
    listed = cases["good"] + cases["odd"] + list(cases["bad"]) + [missing]
    manifest.write_text("\n".join(listed + cases["good"][:2]) + "\n")  # two duplicates
    store = tmp_path / "store"

    s = embed(manifest, store, tiny_model_path)

    n_ok = len(cases["good"]) + len(cases["odd"])
    assert s["read"] == len(listed) and s["duplicates"] == 2
    assert (s["embedded"], s["dead_lettered"], s["skipped"]) == (n_ok, len(cases["bad"]) + 1, 0)
    assert s["embedded"] + s["dead_lettered"] + s["skipped"] == s["read"] and s["accounted"]
    expected_reasons = {}
    for reason in list(cases["bad"].values()) + ["fetch.not_found"]:
        expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
    assert s["dead_letter_by_reason"] == expected_reasons

    folder = run_dir(store, s)
    rows = read_table(folder, s["shards"])
    dead = read_table(folder, s["dead_letter"])
    assert sorted(rows.column("uri").to_pylist()) == sorted(cases["good"] + cases["odd"])
    got_dead = {(r["uri"], f"{r['stage']}.{r['error_type']}") for r in dead.to_pylist()}
    assert got_dead == {*cases["bad"].items(), (missing, "fetch.not_found")}
    assert set(dead.column("run_id").to_pylist()) == {s["run_id"]}
    # every URI read is in exactly one place
    assert set(rows.column("uri").to_pylist()).isdisjoint(dead.column("uri").to_pylist())
    assert not (folder / "_tmp").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["run.json", *s["shards"], *s["dead_letter"], *s["sources"]])


def test_shards_follow_the_contract_and_match_the_model(collection, tmp_path, tiny_model_path):
    images, cases = collection
    store = tmp_path / "store"
    s = embed(images, store, tiny_model_path, "--num_shards=3", "--batch_size=4")
    # shard = stable id mod 3, and the ids hash this test's tmp path: with 15 rows a shard is
    # empty in ~0.7% of tmp paths, and an empty shard is not written
    expected = [f"embeddings-{i:05d}-of-00003.parquet" for i in range(3)]
    good = [*cases["good"], *cases["odd"]]
    assert s["shards"] == [n for i, n in enumerate(expected)
                           if any(stable_id(u) % 3 == i for u in good)]
    folder = run_dir(store, s)
    model = load_model(tiny_model_path, device="cpu")
    seen = []
    for name in s["shards"]:
        pf = pq.ParquetFile(folder / name)
        meta = pf.schema_arrow.metadata
        assert meta[META_MODEL].decode() == model.fingerprint == s["model"]
        assert int(meta[META_DIM]) == model.dim
        for rg in range(pf.metadata.num_row_groups):
            assert pf.metadata.row_group(rg).num_rows <= ROW_GROUP_ROWS
            assert pf.metadata.row_group(rg).column(0).compression.lower() == "zstd"
        t = pf.read()
        ids = t.column("id").to_pylist()
        uris = t.column("uri").to_pylist()
        assert ids == [stable_id(u) for u in uris]
        assert all(i % 3 == int(name.split("-")[1]) for i in ids)  # shard = id mod N
        X = embeddings_to_numpy(t.column("embedding"))
        # reference: the model on the same decoded image, outside Beam, one image at a time
        for u, x, w, h in zip(uris, X, t.column("width").to_pylist(),
                              t.column("height").to_pylist()):
            p = prepare(u, Path(u).read_bytes(), model.config["max_side"],
                        model.config["multiple"])
            ref = model.embed_arrays([p.pixels])[0]
            np.testing.assert_allclose(x, ref, atol=2e-5)
            assert (w, h) == (p.width, p.height)
        np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
        seen += uris
    assert len(seen) == len(set(seen)) == len(cases["good"]) + len(cases["odd"])


def test_nightly_run_embeds_only_new_and_changed_and_tombstones_deleted(tmp_path,
                                                                         tiny_model_path):
    images = tmp_path / "images"
    cases = image_cases.write_collection(images, n_good=6, odd=False, bad=False)
    store = tmp_path / "store"
    first = embed(images, store, tiny_model_path)
    assert (first["embedded"], first["skipped"]) == (6, 0)

    unchanged = embed(images, store, tiny_model_path)
    assert (unchanged["read"], unchanged["embedded"], unchanged["skipped"]) == (6, 0, 6)
    assert unchanged["shards"] == [] and unchanged["accounted"]

    changed, deleted = cases["good"][0], cases["good"][1]
    Path(changed).write_bytes(image_cases.jpeg(150, 100, seed=999))
    Path(deleted).unlink()
    added = images / "new_photo.jpg"
    added.write_bytes(image_cases.jpeg(90, 90, seed=1234))
    nightly = embed(images, store, tiny_model_path)
    assert nightly["read"] == 6
    assert (nightly["embedded"], nightly["skipped"], nightly["tombstoned"]) == (2, 4, 1)
    assert nightly["to_embed_by_reason"] == {"changed": 1, "new": 1}
    folder = run_dir(store, nightly)
    assert read_tombstone_uris([str(folder / n) for n in nightly["tombstones"]]) == {deleted}
    assert sorted(read_table(folder, nightly["shards"]).column("uri").to_pylist()) == \
        sorted([changed, str(added)])

    live = live_embeddings(store)
    assert sorted(live) == sorted(set(cases["good"]) - {deleted} | {str(added)})
    model = load_model(tiny_model_path, device="cpu")
    p = prepare(changed, Path(changed).read_bytes(), 64, 32)
    np.testing.assert_allclose(live[changed], model.embed_arrays([p.pixels])[0], atol=2e-5)

    again = embed(images, store, tiny_model_path)  # tombstone is not repeated
    assert (again["embedded"], again["skipped"], again["tombstoned"]) == (0, 6, 0)
    Path(changed).write_bytes(image_cases.truncated_jpeg())  # replaced by a broken file: old vector goes
    broken = embed(images, store, tiny_model_path)
    assert (broken["dead_lettered"], broken["tombstoned_stale"]) == (1, 1) and broken["accounted"]
    assert changed not in live_embeddings(store)
    Path(deleted).write_bytes(image_cases.jpeg(64, 64, seed=77))  # comes back: embedded as new
    back = embed(images, store, tiny_model_path)
    assert back["to_embed_by_reason"] == {"new": 1} and deleted in live_embeddings(store)
    assert back["skipped_by_reason"] == {"unchanged": 5, "unchanged_failed": 1}


def test_undecodable_unchanged_uri_is_not_retried_but_missing_one_is(tmp_path, tiny_model_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(image_cases.jpeg())
    (images / "broken.jpg").write_bytes(image_cases.truncated_jpeg())
    gone = images / "gone.jpg"
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label\n" + "".join(f"{images / n},x\n"
                                               for n in ("ok.jpg", "broken.jpg", "gone.jpg")))
    store = tmp_path / "store"
    first = embed(manifest, store, tiny_model_path)
    assert first["dead_letter_by_reason"] == {"decode.corrupt": 1, "fetch.not_found": 1}
    second = embed(manifest, store, tiny_model_path)
    assert second["skipped_by_reason"] == {"unchanged": 1, "unchanged_failed": 1}
    assert second["dead_letter_by_reason"] == {"fetch.not_found": 1}  # retried
    gone.write_bytes(image_cases.jpeg(seed=5))
    third = embed(manifest, store, tiny_model_path)
    assert (third["embedded"], third["skipped"]) == (1, 2)


def test_rerun_after_a_killed_run_cleans_it_and_loses_nothing(tmp_path, tiny_model_path):
    images = tmp_path / "images"
    cases = image_cases.write_collection(images, n_good=6, odd=False, bad=False)
    store = tmp_path / "store"
    first = embed(images, store, tiny_model_path)
    # A later run was killed half-way: it wrote a shard (and a temp file) but no run.json.
    for i in range(3):
        (images / f"late_{i}.jpg").write_bytes(image_cases.jpeg(80, 80, seed=500 + i))
    killed = store / "run-29991231T000000000Z-dead00"
    (killed / "_tmp").mkdir(parents=True)
    shutil.copy(run_dir(store, first) / first["shards"][0],
                killed / "embeddings-00000-of-00001.parquet")
    (killed / "_tmp" / "sources-00000-of-00001.parquet.abc").write_bytes(b"PAR1 half")

    # the killed run's id sorts after anything new: only complete runs order the store
    rerun = embed(images, store, tiny_model_path)
    assert not killed.exists()
    assert (rerun["read"], rerun["embedded"], rerun["skipped"]) == (9, 3, 6)
    ids = []
    for manifest in store.glob("run-*/run.json"):
        s = json.loads(manifest.read_text())
        for shard in s["shards"]:
            ids += pq.read_table(manifest.parent / shard, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9
    assert sorted(live_embeddings(store)) == sorted(cases["good"] +
                                                    [str(images / f"late_{i}.jpg")
                                                     for i in range(3)])


def test_run_refuses_another_model_in_the_same_store(tmp_path, tiny_model_path):
    from remap_core.descriptor.checkpoint import save_checkpoint
    from remap_core.descriptor.model import build_model

    images = tmp_path / "images"
    image_cases.write_collection(images, n_good=2, odd=False, bad=False)
    store = tmp_path / "store"
    embed(images, store, tiny_model_path)
    other = tmp_path / "other.pt"
    save_checkpoint(build_model({"max_side": 64, "head": "mac", "head_args": {}}), str(other))
    with pytest.raises(ValueError, match="write to a new --output"):
        embed(images, store, str(other))
    with pytest.raises(ValueError, match="does not sort after"):
        embed(images, store, tiny_model_path, "--run_id=00000000T000000Z")


@pytest.mark.slow  # a second interpreter importing Beam and torch: ~20 s idle, 90 s on a busy box
def test_run_killed_mid_way_is_redone_by_the_next_run(tmp_path, tiny_model_path):
    """A real `remap embed` process is SIGKILLed while it writes its run folder; the next run
    removes the remains and ends with every URI embedded exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    images = tmp_path / "images"
    cases = image_cases.write_collection(images, n_good=12, odd=False, bad=False)
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "remap_cli", "embed",
                             f"--input={images}", f"--output={store}",
                             f"--model={tiny_model_path}", "--num_shards=6",
                             "--progress_seconds=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(store.glob("run-*")):  # it has started writing its run folder
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    (killed,) = list(store.glob("run-*"))
    assert not (killed / "run.json").exists(), "the run finished before it could be killed"

    rerun = embed(images, store, tiny_model_path)
    assert not killed.exists()
    assert (rerun["read"], rerun["embedded"], rerun["skipped"]) == (12, 12, 0)
    ids = []
    for manifest in store.glob("run-*/run.json"):
        for shard in json.loads(manifest.read_text())["shards"]:
            ids += pq.read_table(manifest.parent / shard, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert sorted(live_embeddings(store)) == sorted(cases["good"])
