"""The embed pipeline's composite transforms one at a time, with TestPipeline and assert_that,
and the plain functions they call."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.inference import EmbedImages
from pipelines.prepare import PreparedImage
from pipelines.reconcile import (LIVE_IDS, OUTCOMES, SKIPPED, TOMBSTONES, CheckIdCollisions,
                                 Reconcile, _check_ids, reconcile)
from pipelines.shards import WriteParquetShards, shard_count
from remap_store.runs import table_file_name as shard_name
from pipelines.tables import summarize
from pipelines.uris import Source
from pipelines.workers import DEAD
from remap_store.runs import PreviousState
from remap_core.descriptor.checkpoint import load_model
from remap_store.schema import stable_id

RUNNER = "FnApiRunner"  # in-process; never Prism


def _prev(run, outcome="embedded", size=10, version="v1", uri="u"):
    return PreviousState(run, stable_id(uri), size, version, outcome)


@pytest.mark.parametrize("now,before,expected", [
    ([Source("u", 10, "v1")], [], ("embed", "new")),
    ([Source("u", 10, "v1")], [_prev(0)], ("skip", "unchanged")),
    ([Source("u", 10, "v2")], [_prev(0)], ("embed", "changed")),
    ([Source("u", 11, "v1")], [_prev(0)], ("embed", "changed")),
    ([Source("u")], [_prev(0)], ("embed", "unknown_version")),
    ([Source("u", 10, "v1")], [_prev(0), _prev(1, "deleted", None, None)], ("embed", "new")),
    ([Source("u", 10, "v1")], [_prev(0, "dead_letter:decode")], ("skip", "unchanged_failed")),
    ([Source("u", 10, "v1")], [_prev(0, "dead_letter:fetch")], ("embed", "retry")),
    ([Source("u", 10, "v1")], [_prev(3), _prev(1, "dead_letter:fetch")], ("skip", "unchanged")),
    ([], [_prev(0, "deleted", None, None)], ("none", "")),
])
def test_reconcile_decides_from_the_newest_earlier_state(now, before, expected):
    assert reconcile("u", now, before) == expected


def test_reconcile_tombstones_a_uri_gone_from_the_input():
    action, state = reconcile("u", [], [_prev(0), _prev(2, "dead_letter:decode")])
    assert action == "tombstone" and state.run_index == 2


def test_reconcile_tombstones_only_within_the_input_listed_again():
    from remap_store.runs import InputScope

    same = InputScope("/in/b", folder=False, run_keys=("/in/a", "/in/b"))
    assert reconcile("u", [], [_prev(0)], same) == ("keep", _prev(0))        # listed by /in/a
    assert reconcile("u", [], [_prev(0), _prev(1)], same) == ("tombstone", _prev(1))
    assert reconcile("u", [], [_prev(1, "deleted", None, None)], same) == ("none", "")
    assert reconcile("u", [Source("u", 10, "v1")], [_prev(0)], same) == ("skip", "unchanged")
    folder = InputScope("/in", folder=True, run_keys=("/in/a", "/x"))
    assert reconcile("/in/a/u.jpg", [], [_prev(1)], folder)[0] == "tombstone"    # under /in
    assert reconcile("file:///in/u.jpg", [], [_prev(1)], folder)[0] == "tombstone"
    assert reconcile("/in2/u.jpg", [], [_prev(1)], folder)[0] == "keep"          # not under
    assert reconcile("/x/u.jpg", [], [_prev(1)], folder)[0] == "keep"


def test_store_guards_refuse_an_empty_listing_and_mass_tombstones():
    from remap_store.runs import RunRefused, check_store_guards

    def summary(read, tombstoned, stale, covered):
        return {"run_id": "r", "input": "in", "read": read, "tombstoned": tombstoned,
                "tombstoned_stale": stale, "covered_before": covered}

    check_store_guards(summary(10, 3, 2, 10), 1, 0.5)               # 5 of 10: at the bound
    with pytest.raises(RunRefused, match=r"would tombstone 6 of the 10 live URIs .* \(60%\)"):
        check_store_guards(summary(10, 4, 2, 10), 1, 0.5)
    check_store_guards(summary(10, 4, 2, 10), 1, 0.6)
    check_store_guards(summary(0, 0, 0, 0), 0, 0.5)                 # empty store, allowed
    with pytest.raises(RunRefused, match="listed 0 images, fewer than --min_listed=1"):
        check_store_guards(summary(0, 0, 0, 0), 1, 0.5)
    with pytest.raises(RunRefused, match="listed 99 images, fewer than --min_listed=100"):
        check_store_guards(summary(99, 0, 0, 99), 100, 1)
    with pytest.raises(RunRefused, match="would tombstone 3 of the 3"):
        check_store_guards(summary(0, 3, 0, 3), 0, 0.5)
    check_store_guards(summary(0, 3, 0, 3), 0, 1)


def test_reconcile_transform_dedupes_filters_and_tombstones():
    sources = [Source("a", 1, "v"), Source("a", 1, "v"), Source("b", 2, "v"),
               Source("c", 3, "new")]
    before = [("b", _prev(0, size=2, version="v", uri="b")),
              ("c", _prev(0, size=3, version="old", uri="c")),
              ("gone", _prev(0, uri="gone"))]
    with test_pipeline.TestPipeline(runner=RUNNER) as p:
        out = ((p | "Now" >> beam.Create(sources), p | "Before" >> beam.Create(before))
               | Reconcile("r1"))
        assert_that(out.to_embed, equal_to([Source("a", 1, "v"),
                                            Source("c", 3, "new", replaces=True)]),
                    label="ToEmbed")
        assert_that(out[TOMBSTONES], equal_to([{"uri": "gone", "id": stable_id("gone"),
                                                "run_id": "r1"}]), label="Tombstones")
        assert_that(out[LIVE_IDS], equal_to([(stable_id(u), u) for u in "abc"]), label="Live")
        assert_that(out[SKIPPED], equal_to([]), label="Skipped")
        # covered_before: b, c and gone had a live earlier state (the tombstone bound's base)
        assert_that(out[OUTCOMES], equal_to(["read", "read", "read", ("duplicates", 1),
                                             "to_embed.new", "to_embed.changed", "skipped",
                                             "skipped.unchanged", "tombstoned",
                                             *["covered_before"] * 3]),
                    label="Outcomes")


def test_id_collision_fails_the_run_naming_both_uris():
    assert _check_ids((5, ["a", "a"])) == 5
    with pytest.raises(ValueError, match="'x' and 'y' both hash to id 7"):
        _check_ids((7, ["y", "x"]))
    with pytest.raises(Exception, match="id collision"):
        with test_pipeline.TestPipeline(runner=RUNNER) as p:
            p | beam.Create([(1, "a"), (2, "b"), (1, "c")]) | CheckIdCollisions()


def test_write_parquet_shards_names_row_groups_and_atomicity(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("v", pa.string())],
                       metadata={b"k": b"meta"})
    rows = [{"id": i, "v": str(i)} for i in range(50)]
    with test_pipeline.TestPipeline(runner=RUNNER) as p:
        written = (p | beam.Create(rows)
                   | WriteParquetShards(str(tmp_path), "t", schema, lambda r: r["id"],
                                        shard_rows=20, row_group_rows=8))
        assert_that(written, equal_to([(shard_name("t", i, 3), n)
                                       for i, n in enumerate((17, 17, 16))]))
    for i in range(3):
        pf = pq.ParquetFile(tmp_path / shard_name("t", i, 3))
        assert pf.schema_arrow.metadata[b"k"] == b"meta"
        assert pf.metadata.row_group(0).num_rows == 8
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        assert all(v % 3 == i for v in pf.read().column("id").to_pylist())
    assert list((tmp_path / "_tmp").iterdir()) == []  # every temp file was renamed
    assert shard_name("t", 3, 12) == "t-00003-of-00012.parquet"
    assert (shard_count(0, 10), shard_count(10, 10), shard_count(11, 10), shard_count(5, 1, 4)) \
        == (1, 1, 2, 4)


def test_empty_input_writes_no_shard(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64())])
    with test_pipeline.TestPipeline(runner=RUNNER) as p:
        written = (p | beam.Create([]) | WriteParquetShards(str(tmp_path), "t", schema,
                                                             lambda r: r["id"]))
        assert_that(written, equal_to([]))
    assert not list(tmp_path.glob("*.parquet"))


def test_summary_accounts_and_groups_reasons():
    s = summarize({"read": 5, "embedded": 2, "dead_lettered": 1, "skipped": 2,
                   "skipped.unchanged": 2, "dead_letter.decode.corrupt": 1,
                   "to_embed.new": 3, "tombstoned": 4})
    assert s["accounted"] and s["tombstoned"] == 4
    assert s["dead_letter_by_reason"] == {"decode.corrupt": 1}
    assert s["skipped_by_reason"] == {"unchanged": 2} and s["to_embed_by_reason"] == {"new": 3}
    assert not summarize({"read": 2, "embedded": 1})["accounted"]


def _prepared(uri, shape, seed=0):
    rng = np.random.default_rng(seed)
    return PreparedImage(uri=uri, id=stable_id(uri), content_sha1="0" * 40, size_bytes=1,
                         width=shape[1], height=shape[0],
                         pixels=rng.integers(0, 256, shape, dtype=np.uint8),
                         version="v", listed_size=1)


def test_embed_images_buckets_by_shape_and_dead_letters_a_failing_forward(tiny_model_path):
    model = load_model(tiny_model_path, device="cpu")
    good = [_prepared(f"g{i}", (64, 32, 3) if i % 2 else (32, 64, 3), i) for i in range(5)]
    bad = _prepared("bad", (64, 64, 4))  # four channels: the network refuses it
    bad_twin = _prepared("bad_twin", (64, 64, 4), 9)

    reference = {p.uri: model.embed_arrays([p.pixels])[0] for p in good}  # one at a time
    fingerprint = model.fingerprint

    def check_rows(rows):  # (pickled into the pipeline: holds arrays, not the model)
        assert sorted(r["uri"] for r in rows) == sorted(reference)
        for r in rows:
            np.testing.assert_allclose(r["embedding"], reference[r["uri"]], atol=2e-5)
            assert r["model"] == fingerprint and r["id"] == stable_id(r["uri"])

    with test_pipeline.TestPipeline(runner=RUNNER) as p:
        out = (p | beam.Create(good + [bad, bad_twin])
               | EmbedImages(tiny_model_path, fingerprint, batch_size=2,
                             progress_seconds=0))
        assert_that(out["rows"], check_rows, label="Rows")
        assert_that(out[DEAD] | beam.Map(lambda f: (f.uri, f.stage, f.size, f.version)),
                    equal_to([("bad", "embed", 1, "v"), ("bad_twin", "embed", 1, "v")]),
                    label="Dead")


def test_model_is_loaded_once_per_process_and_shared_by_threads(tiny_model_path):
    from concurrent.futures import ThreadPoolExecutor

    from apache_beam.utils.shared import Shared

    from pipelines.inference import EmbedModelHandler

    # what RunInference does with the handler in each worker process: one Shared handle, the
    # model loaded by the first thread that asks and handed to every other one
    fingerprint = load_model(tiny_model_path, device="cpu").fingerprint
    handler, shared = EmbedModelHandler(tiny_model_path, fingerprint, device="cpu"), Shared()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: shared.acquire(handler.load_model, tag="m"), range(8)))
    assert all(m is models[0] for m in models)
    assert models[0].device.type == "cpu" and not models[0].training


def test_batch_by_shape_keeps_one_shape_per_batch_and_every_image_once():
    from pipelines.inference import BatchByShape

    shapes = [(64, 32, 3), (32, 64, 3), (64, 64, 3)]
    images = [_prepared(f"u{i}", shapes[i % 3 if i < 20 else 0], i) for i in range(25)]

    def check(batches):
        assert sorted(p.uri for b in batches for p in b) == sorted(p.uri for p in images)
        for b in batches:
            assert 1 <= len(b) <= 4 and len({p.pixels.shape for p in b}) == 1
        # fewest batches a shape can take: only the last of each shape may be short
        counts = {s: sum(1 for p in images if p.pixels.shape == s) for s in shapes}
        assert len(batches) == sum(-(-n // 4) for n in counts.values())

    with test_pipeline.TestPipeline(runner=RUNNER) as p:
        batches = p | beam.Create(images, reshuffle=False) | beam.ParDo(BatchByShape(4))
        assert_that(batches | beam.combiners.ToList(), lambda got: check(got[0]))


def test_a_batch_failing_whole_is_dead_lettered_image_by_image():
    """What RunInference.with_exception_handling hands back for a batch whose inference raised
    (the batch, (type, repr, traceback)) becomes one embed failure per image."""
    from pipelines.inference import failed_batch_failures

    batch = [_prepared("a", (32, 32, 3)), _prepared("b", (32, 32, 3), 1)]
    failures = failed_batch_failures((batch, (MemoryError, "MemoryError('oom')", ["tb"])))
    assert [(f.uri, f.stage, f.error_type, f.message, f.size, f.version) for f in failures] == [
        ("a", "embed", "MemoryError", "MemoryError('oom')", 1, "v"),
        ("b", "embed", "MemoryError", "MemoryError('oom')", 1, "v")]
