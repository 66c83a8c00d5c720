"""The shard contract: stable ids, explicit schema, metadata, vectorised read-back."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq

from remap_store.schema import (embedding_schema, embedding_table, embeddings_to_numpy,
                                     stable_id, stable_ids)


def test_stable_id_is_the_first_8_bytes_of_sha1_as_signed_int64():
    uri = "gs://bucket/a/b.jpg"
    ref = int.from_bytes(hashlib.sha1(uri.encode()).digest()[:8], "big", signed=True)
    assert stable_id(uri) == ref
    assert stable_ids([uri, "s3://x/y.png"]).dtype == np.int64
    assert stable_id(uri) != stable_id(uri + " ")


def test_table_round_trip_keeps_vectors_and_metadata(tmp_path):
    schema = embedding_schema(4, "fp123")
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, 4)).astype(np.float32)
    rows = [{"id": i, "uri": f"u{i}", "embedding": v, "content_sha1": "x", "size_bytes": 1,
             "width": 2, "height": 3, "model": "fp123"} for i, v in enumerate(vecs)]
    pq.write_table(embedding_table(rows, schema), tmp_path / "s.parquet", compression="zstd")
    back = pq.read_table(tmp_path / "s.parquet")
    np.testing.assert_array_equal(embeddings_to_numpy(back.column("embedding")), vecs)
    assert back.schema.metadata[b"remap.model_fingerprint"] == b"fp123"
    assert back.schema.field("embedding").type.list_size == 4
