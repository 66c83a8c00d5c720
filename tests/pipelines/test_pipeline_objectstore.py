"""The embed pipeline reading images from and writing runs to real object-storage servers on
127.0.0.1: fake-gcs-server for gs:// and moto's S3 server for s3://."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

import image_cases
from objectstore import fake_gcs, moto_s3  # noqa: F401  (pytest fixtures)
from pipelines.embed import run
from remap_store.schema import META_MODEL, read_tombstone_uris, stable_id


def _upload(store, bucket_url: str, files: dict[str, bytes]) -> list[str]:
    fs = store.fs
    for name, data in files.items():
        with fs.open(f"{bucket_url}/{name}", "wb") as f:
            f.write(data)
    fs.invalidate_cache()
    return [f"{bucket_url}/{name}" for name in files]


def _run(store, inp, out, model, *extra):
    return run([f"--input={inp}", f"--output={out}", f"--model={model}", "--progress_seconds=0",
                f"--fsspec_config={json.dumps(store.fsspec_config)}", *extra])


def _read(store, url):
    with store.fs.open(url, "rb") as f:
        return pq.read_table(io.BytesIO(f.read()))


def test_gcs_folder_to_gcs_store_then_incremental(fake_gcs, tiny_model_path):  # noqa: F811
    bucket = fake_gcs.bucket("photos-gcs")
    files = {f"cams/a/img_{i}.jpg": image_cases.jpeg(96, 64, seed=i) for i in range(3)}
    files.update({f"cams/b/img_{i}.jpg": image_cases.jpeg(64, 96, seed=10 + i) for i in range(2)})
    files["cams/b/broken.jpg"] = image_cases.truncated_jpeg()
    files["cams/top.png"] = image_cases.GOOD_ODD["alpha.png"]()
    uris = _upload(fake_gcs, bucket, files)
    out = fake_gcs.bucket("embeddings-gcs") + "/store"

    first = _run(fake_gcs, f"{bucket}/cams", out, tiny_model_path)
    assert (first["read"], first["embedded"], first["dead_lettered"]) == (7, 6, 1)
    folder = f"{out}/run-{first['run_id']}"
    assert fake_gcs.fs.exists(f"{folder}/run.json")
    t = pa.concat_tables([_read(fake_gcs, f"{folder}/{s}") for s in first["shards"]])
    assert sorted(t.column("uri").to_pylist()) == sorted(u for u in uris if "broken" not in u)
    assert t.column("id").to_pylist() == [stable_id(u) for u in t.column("uri").to_pylist()]
    assert _read(fake_gcs, f"{folder}/{first['shards'][0]}").schema.metadata[META_MODEL] \
        .decode() == first["model"]
    assert not fake_gcs.fs.exists(f"{folder}/_tmp")
    assert not fake_gcs.fs.exists(f"{out}/_lease.json")   # the job gave the store's lease back

    # nightly: one object rewritten (new generation), one deleted. Run in worker processes,
    # which reach the server only through --fsspec_config (as Dataflow workers would).
    _upload(fake_gcs, bucket, {"cams/a/img_0.jpg": image_cases.jpeg(96, 64, seed=500)})
    fake_gcs.fs.rm(f"{bucket}/cams/b/img_1.jpg")
    fake_gcs.fs.invalidate_cache()
    assert "STORAGE_EMULATOR_HOST" not in os.environ
    second = _run(fake_gcs, f"{bucket}/cams", out, tiny_model_path, "--runner=DirectRunner",
                  "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    assert (second["read"], second["embedded"], second["skipped"], second["tombstoned"]) == \
        (6, 1, 5, 1)
    assert second["to_embed_by_reason"] == {"changed": 1}
    folder2 = f"{out}/run-{second['run_id']}"
    assert read_tombstone_uris([f"{folder2}/{n}" for n in second["tombstones"]]) == \
        {f"{bucket}/cams/b/img_1.jpg"}
    fake_gcs.fs.invalidate_cache()
    assert not fake_gcs.fs.exists(f"{out}/_lease.json")   # released by a worker process


def test_s3_parquet_manifests_to_s3_store(moto_s3, tiny_model_path):  # noqa: F811
    bucket = moto_s3.bucket("photos-s3")
    uris = _upload(moto_s3, bucket, {f"p/{i:02d}.jpg": image_cases.jpeg(80, 60, seed=i) for i in range(5)})
    uris += _upload(moto_s3, bucket, {"p/cmyk.jpg": image_cases.cmyk_jpeg(), "p/empty.jpg": b""})
    manifests = [uris[:4], uris[4:] + [f"{bucket}/p/missing.jpg"]]
    for i, part in enumerate(manifests):
        buf = io.BytesIO()
        pq.write_table(pa.table({"uri": part, "label": ["x"] * len(part)}), buf)
        _upload(moto_s3, bucket, {f"manifests/part-{i}.parquet": buf.getvalue()})
    out = moto_s3.bucket("embeddings-s3") + "/store"

    s = _run(moto_s3, f"{bucket}/manifests/part-*.parquet", out, tiny_model_path)
    assert s["read"] == sum(len(m) for m in manifests) == 8
    assert (s["embedded"], s["dead_lettered"]) == (6, 2)
    assert s["dead_letter_by_reason"] == {"decode.empty": 1, "fetch.not_found": 1}
    folder = f"{out}/run-{s['run_id']}"
    dead = pa.concat_tables([_read(moto_s3, f"{folder}/{n}") for n in s["dead_letter"]])
    assert sorted(dead.column("uri").to_pylist()) == sorted([f"{bucket}/p/empty.jpg",
                                                             f"{bucket}/p/missing.jpg"])
    again = _run(moto_s3, f"{bucket}/manifests/part-*.parquet", out, tiny_model_path)
    assert again["skipped_by_reason"] == {"unchanged": 6, "unchanged_failed": 1}
    assert again["dead_letter_by_reason"] == {"fetch.not_found": 1}
