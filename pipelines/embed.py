"""`remap embed`: image URIs -> fetch + decode -> batched embedding -> Parquet shards.

    ListSources | Reconcile (with the store's earlier runs) | FetchAndDecode | EmbedImages
      | WriteParquetShards          (+ dead letter, tombstones, sources, counts)

Runs on any Beam runner (Dataflow, Flink through the portable runner, the local runners). The
local default is the in-process FnApiRunner; `--runner=DirectRunner` is kept off Beam 2.77's
Prism download. Every listed URI ends in exactly one of: embedded, dead-lettered, skipped
(unchanged since an earlier run); URIs of this run's input gone since the last run become
tombstones (URIs of other inputs are kept: runs.InputScope). The counts go into run.json, which
is what makes a run folder complete: the pipeline's last step (WriteRunSummary) writes it on the
workers, after every table, the id-collision check and the store's guards (--min_listed,
--max_tombstone_fraction), so a run completes on any runner even when nothing waits for the job
(Flex Templates, --no_wait_until_finish).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import secrets
import time
from collections import defaultdict
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions, TestOptions)
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.window import GlobalWindows

from remap_store.schema import (DEAD_LETTER_SCHEMA, SOURCE_SCHEMA, TOMBSTONE_SCHEMA,
                                     embedding_schema, embedding_table, stable_id)

from remap_store import lease as L
from remap_store import runs as R
from pipelines import uris as U
from pipelines.model_cache import shared_model
from pipelines.prepare import Failure, PreparedImage, prepare_source
from pipelines.shards import TMP_FOLDER, WriteParquetShards

PIPELINE_VERSION = "0.2.0"
NAMESPACE = "remap.embed"
DEAD = "dead_letter"
LOCAL_RUNNER = "FnApiRunner"
# Runners whose job runs inside the launcher's process: a dead launcher is a dead job.
IN_PROCESS_RUNNERS = ("FnApiRunner", "DirectRunner", "direct", "BundleBasedDirectRunner",
                      "SwitchingDirectRunner")
log = logging.getLogger(__name__)


class EmbedOptions(PipelineOptions):
    """Options of `remap embed` (see `remap embed --help`)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Not argparse-required: Beam parses every registered options class for every pipeline
        # in the process; `run` checks them instead.
        parser.add_argument("--input", default=None,
                            help="folder, glob, or manifest file(s) (.txt, .csv or .parquet "
                                 "with a 'uri' column; a glob of them allowed) of image URIs; "
                                 "local, gs:// or s3://. A path that exists is never a glob")
        parser.add_argument("--output", default=None,
                            help="embedding store (local, gs://, s3://): each run writes "
                                 "run-<id>/ with shards, dead letter, tombstones and run.json")
        parser.add_argument("--model", default=None,
                            help="checkpoint path or fsspec URL (default: bundled EfficientNet-"
                                 "Lite0 + GeM)")
        parser.add_argument("--run_id", default=None,
                            help="run id: letters, digits, '.', '_', '-' (at most 128, no '..'); "
                                 "must sort after the store's earlier runs (default: UTC "
                                 "timestamp)")
        parser.add_argument("--batch_size", type=int, default=32,
                            help="images of one shape per forward pass")
        parser.add_argument("--num_shards", type=int, default=0,
                            help="embedding shards per run; 0 (default): one per --shard_rows")
        parser.add_argument("--shard_rows", type=int, default=500_000,
                            help="target rows per embedding shard when --num_shards is 0")
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
        parser.add_argument("--full", action="store_true", default=False,
                            help="embed every URI, ignoring what earlier runs in --output did "
                                 "(default: only new or changed URIs; deleted ones tombstoned)")
        parser.add_argument("--min_listed", type=int, default=1,
                            help="refuse the run (nothing tombstoned, no run.json) when --input "
                                 "lists fewer images than this (default 1: an empty listing is "
                                 "refused; 0 accepts one)")
        parser.add_argument("--max_tombstone_fraction", type=float, default=0.5,
                            help="refuse the run (nothing tombstoned, no run.json) when it would "
                                 "tombstone more than this share of the live URIs its input "
                                 "covers (default 0.5; 1: no bound)")
        parser.add_argument("--fsspec_config", default=None,
                            help='JSON of per-protocol fsspec options applied on every worker, '
                                 'e.g. \'{"s3": {"endpoint_url": "http://host:9000"}}\'')
        parser.add_argument("--progress_seconds", type=float, default=15.0,
                            help="log progress per worker at most this often (0: never)")
        parser.add_argument("--lease_minutes", type=float, default=10.0,
                            help="a run holds the store's lease (one writer at a time); while "
                                 "the launcher waits for the job it renews it, and it lapses "
                                 "this long after the launcher dies")
        parser.add_argument("--unattended_lease_hours", type=float, default=20.0,
                            help="the lease of a job nobody waits for (Flex Template, "
                                 "--no_wait_until_finish): its job must end within it")
        parser.add_argument("--break_lease", action="store_true", default=False,
                            help="take over the store's lease from a run that holds it (only "
                                 "when that run is dead: its job failed or was cancelled)")


class EmbedWorkerOptions(PipelineOptions):
    """Worker settings of `remap embed` (kept apart from EmbedOptions, whose flags are the Flex
    Template's parameters; pass these like any Beam pipeline option)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--torch_threads", type=int, default=None,
                            help="torch intra-op threads per worker process (default: leave "
                                 "torch's default, i.e. OMP_NUM_THREADS or the core count); "
                                 "e.g. the core count for one SDK process per VM")


# Numeric options of EmbedOptions: the values each accepts, and how to say so.
OPTION_RANGES = {
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "num_shards": (lambda v: v >= 0, "at least 0 (0: one shard per --shard_rows rows)"),
    "shard_rows": (lambda v: v >= 1, "at least 1"),
    "progress_seconds": (lambda v: v >= 0, "at least 0 (0: no progress lines)"),
    "lease_minutes": (lambda v: v > 0, "positive"),
    "unattended_lease_hours": (lambda v: v > 0, "positive"),
    "min_listed": (lambda v: v >= 0, "at least 0"),
    "max_tombstone_fraction": (lambda v: 0 <= v <= 1, "between 0 and 1"),
}


def check_option_ranges(opts: EmbedOptions) -> None:
    """Refuse a numeric option out of its range (e.g. --batch_size 0), naming it."""
    for name, (ok, want) in OPTION_RANGES.items():
        value = getattr(opts, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ValueError(f"--{name} must be {want} (got {value})")


# --------------------------------------------------------------------------- small helpers

class _StorageDoFn(beam.DoFn):
    """A DoFn that applies --fsspec_config in its worker before touching storage."""

    def __init__(self, fsspec_config: dict | None):
        self.fsspec_config = fsspec_config

    def setup(self):
        U.apply_fsspec_config(self.fsspec_config)


def _inc(name: str, n: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(n)


class _Progress:
    """Per-worker progress line: at most every `every` seconds."""

    def __init__(self, what: str, every: float):
        self.what, self.every = what, every
        self.n, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last = now
            log.info("%s %d images (%.1f img/s) in this worker", self.what, self.n,
                     self.n / max(now - self.t0, 1e-9))


# --------------------------------------------------------------------------- listing

class _SplitPartitionFn(_StorageDoFn):
    def process(self, part):
        yield from U.split_partition(*part)


NOT_IMAGES = "not_images"


class _ExpandPartitionFn(_StorageDoFn):
    def process(self, part):
        for item in U.expand_partition(*part, with_others=True):
            if isinstance(item, U.NotAnImage):
                yield beam.pvalue.TaggedOutput(NOT_IMAGES, item.uri)
            else:
                yield item


class _StatFn(_StorageDoFn):
    """Fill in size and version of manifest entries (one metadata request per URI). A failing
    stat leaves them unknown: the URI is then fetched, and its failure dead-lettered there."""

    def process(self, source):
        try:
            yield U.stat(source)
        except Exception:
            _inc("stat_failed")
            yield source


class ListSources(beam.PTransform):
    """--input -> {"sources": PCollection[Source] (may repeat a URI), "not_images": URIs of
    listed files without an image extension (counted, not read)}, listing spread across
    workers: one task per manifest (per row group of a Parquet manifest) / top-level
    sub-folder, then a Reshuffle before the per-URI stat. `partitions`: the listing tasks when
    the launcher already has them (uris.list_partitions)."""

    def __init__(self, spec: str, fsspec_config: dict | None = None,
                 partitions: list[tuple] | None = None):
        super().__init__()
        self.spec, self.fsspec_config, self.partitions = spec, fsspec_config, partitions

    def expand(self, pbegin):
        U.apply_fsspec_config(self.fsspec_config)
        parts = U.list_partitions(self.spec) if self.partitions is None else self.partitions
        listed = (pbegin
                  | "Partitions" >> beam.Create(parts)
                  | "SpreadPartitions" >> beam.Reshuffle()
                  | "Split" >> beam.ParDo(_SplitPartitionFn(self.fsspec_config))
                  | "SpreadSplits" >> beam.Reshuffle()
                  | "Expand" >> beam.ParDo(_ExpandPartitionFn(self.fsspec_config)).with_outputs(
                      NOT_IMAGES, main="sources"))
        sources = (listed.sources
                   | "SpreadSources" >> beam.Reshuffle()
                   | "Stat" >> beam.ParDo(_StatFn(self.fsspec_config)))
        return {"sources": sources, NOT_IMAGES: listed[NOT_IMAGES]}


class _ReadStateFn(_StorageDoFn):
    def process(self, item):
        yield from R.read_state_file(*item)


class ReadStoreState(beam.PTransform):
    """State files of earlier runs -> (uri, PreviousState), read in parallel."""

    def __init__(self, files: list[tuple[int, str, str]], fsspec_config: dict | None = None):
        super().__init__()
        self.files, self.fsspec_config = files, fsspec_config

    def expand(self, pbegin):
        return (pbegin
                | "StateFiles" >> beam.Create(self.files)
                | "SpreadStateFiles" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(_ReadStateFn(self.fsspec_config)))


# --------------------------------------------------------------------------- reconcile

SKIPPED, TOMBSTONES, LIVE_IDS, OUTCOMES = "skipped", "tombstones", "live_ids", "outcomes"
RETRY_OUTCOMES = ("dead_letter:fetch", "dead_letter:list", "dead_letter:embed")


def reconcile(uri: str, now: list, before: list,
              scope: R.InputScope | None = None) -> tuple[str, object]:
    """What to do with one URI given its listings now and the earlier runs' states of it.

    Returns ("embed", reason) | ("skip", reason) | ("tombstone", PreviousState) |
    ("keep", PreviousState) | ("none", ""). A URI not listed now is tombstoned only when this
    run's input covers it (`scope`; None: every URI), else kept (another input's URI).
    An unchanged URI is skipped when its size and version match the newest earlier state and
    that state is an embedding or a decode failure (fetch failures are retried)."""
    prev = max(before, key=lambda s: s.run_index) if before else None
    if not now:
        if prev is None or prev.outcome == "deleted":
            return "none", ""
        if scope is not None and not scope.covers(uri, prev.run_index):
            return "keep", prev
        return "tombstone", prev
    if prev is None or prev.outcome == "deleted":
        return "embed", "new"
    sig = now[0].signature()
    if sig is None:
        return "embed", "unknown_version"
    if sig != prev.signature():
        return "embed", "changed"
    if prev.outcome in RETRY_OUTCOMES:
        return "embed", "retry"
    return "skip", "unchanged" if prev.outcome == "embedded" else "unchanged_failed"


class _ReconcileFn(beam.DoFn):
    def __init__(self, run_id: str, scope: R.InputScope | None):
        self.run_id, self.scope = run_id, scope

    def process(self, keyed):
        uri, groups = keyed
        now, before = list(groups["now"]), list(groups["before"])
        action, why = reconcile(uri, now, before, self.scope)
        if action == "none":
            return
        if action == "keep":
            _inc("kept_other_sources")
            yield beam.pvalue.TaggedOutput(OUTCOMES, "kept_other_sources")
            return
        prev = max(before, key=lambda s: s.run_index) if before else None
        if prev is not None and prev.outcome != "deleted":
            # an earlier run left it live and this run's input covers it: the tombstone bound's
            # denominator (runs.check_store_guards)
            yield beam.pvalue.TaggedOutput(OUTCOMES, "covered_before")
        if action == "tombstone":
            _inc("tombstoned")
            yield beam.pvalue.TaggedOutput(OUTCOMES, "tombstoned")
            yield beam.pvalue.TaggedOutput(TOMBSTONES, {"uri": uri, "id": why.id,
                                                        "run_id": self.run_id})
            return
        _inc("read")
        yield beam.pvalue.TaggedOutput(OUTCOMES, "read")
        if len(now) > 1:
            _inc("duplicates", len(now) - 1)
            yield beam.pvalue.TaggedOutput(OUTCOMES, ("duplicates", len(now) - 1))
        if action == "skip":
            _inc(f"skipped.{why}")
            yield beam.pvalue.TaggedOutput(OUTCOMES, "skipped")
            yield beam.pvalue.TaggedOutput(OUTCOMES, f"skipped.{why}")
            if why == "unchanged":
                yield beam.pvalue.TaggedOutput(LIVE_IDS, (prev.id, uri))
            return
        _inc(f"to_embed.{why}")
        yield beam.pvalue.TaggedOutput(OUTCOMES, f"to_embed.{why}")
        yield beam.pvalue.TaggedOutput(LIVE_IDS, (stable_id(uri), uri))
        yield now[0]._replace(replaces=prev is not None and prev.outcome == "embedded")


class Reconcile(beam.PTransform):
    """(Sources now, earlier states) -> Sources to embed, plus `skipped`, `tombstones`,
    `live_ids` (id, uri) and `outcomes` outputs. One shuffle keyed by URI does the dedupe and
    the incremental filter at once. `scope`: which unlisted URIs this run may tombstone
    (runs.InputScope; None: all of them)."""

    def __init__(self, run_id: str, scope: R.InputScope | None = None):
        super().__init__()
        self.run_id, self.scope = run_id, scope

    def expand(self, inputs):
        sources, before = inputs
        now = sources | "KeyByUri" >> beam.Map(lambda s: (s.uri, s))
        return ({"now": now, "before": before}
                | "GroupByUri" >> beam.CoGroupByKey()
                | "Decide" >> beam.ParDo(_ReconcileFn(self.run_id, self.scope)).with_outputs(
                    SKIPPED, TOMBSTONES, LIVE_IDS, OUTCOMES, main="to_embed"))


def _check_ids(keyed):
    id_, uris = keyed
    distinct = sorted(set(uris))
    if len(distinct) > 1:
        raise ValueError(f"id collision: {distinct[0]!r} and {distinct[1]!r} both hash to id "
                         f"{id_}; rename one of the objects (ids are the first 8 bytes of "
                         f"sha1(uri)) and run again")
    return id_


class CheckIdCollisions(beam.PTransform):
    """(id, uri) of every URI live after this run -> fails the run on two URIs with one id."""

    def expand(self, live_ids):
        return (live_ids
                | "GroupById" >> beam.GroupByKey()
                | "Check" >> beam.Map(_check_ids))


# --------------------------------------------------------------------------- fetch + embed

class _FetchAndDecodeFn(_StorageDoFn):
    def __init__(self, max_side: int, multiple: int, fsspec_config: dict | None):
        super().__init__(fsspec_config)
        self.max_side, self.multiple = max_side, multiple

    def process(self, source):
        out = prepare_source(source, self.max_side, self.multiple)
        if isinstance(out, Failure):
            _inc("dead_lettered")
            _inc(f"dead_letter.{out.reason}")
            yield beam.pvalue.TaggedOutput(DEAD, out)
        else:
            yield out


class FetchAndDecode(beam.PTransform):
    """Sources -> PreparedImage, with failures on the `dead_letter` output."""

    def __init__(self, max_side: int, multiple: int, fsspec_config: dict | None = None):
        super().__init__()
        self.max_side, self.multiple, self.fsspec_config = max_side, multiple, fsspec_config

    def expand(self, sources):
        return sources | beam.ParDo(_FetchAndDecodeFn(
            self.max_side, self.multiple, self.fsspec_config)).with_outputs(DEAD, main="images")


def shard_row(p: PreparedImage, vector, fingerprint: str) -> dict:
    return {"id": p.id, "uri": p.uri, "embedding": vector, "content_sha1": p.content_sha1,
            "size_bytes": p.size_bytes, "width": p.width, "height": p.height,
            "model": fingerprint,
            # not shard columns: carried to the sources table
            "_listed_size": p.listed_size, "_version": p.version}


class _EmbedByShapeFn(_StorageDoFn):
    """Buckets images by input shape within a bundle and runs one forward per full bucket (and
    per partial bucket at the end of the bundle): equal shapes batch without cropping.
    The model is loaded once per worker process and shared by its threads."""

    def __init__(self, model_uri, device, fingerprint, batch_size, progress_seconds,
                 fsspec_config, torch_threads=None):
        super().__init__(fsspec_config)
        self.model_uri, self.device, self.fingerprint = model_uri, device, fingerprint
        self.batch_size, self.progress_seconds = batch_size, progress_seconds
        self.torch_threads = torch_threads

    def setup(self):
        super().setup()
        self.model = shared_model(self.model_uri, self.device, self.torch_threads)
        if self.model.fingerprint != self.fingerprint:
            raise RuntimeError(f"worker loaded model {self.model.fingerprint} but the job was "
                               f"launched for {self.fingerprint}; the checkpoint changed mid-run: "
                               f"relaunch the job")
        self.progress = _Progress("embedded", self.progress_seconds)
        self.batch_sizes = Metrics.distribution(NAMESPACE, "batch_size")

    def start_bundle(self):
        self.buckets = defaultdict(list)

    def process(self, image: PreparedImage):
        bucket = self.buckets[image.pixels.shape]
        bucket.append(image)
        if len(bucket) >= self.batch_size:
            del self.buckets[image.pixels.shape]
            yield from self._forward(bucket)

    def finish_bundle(self):
        buckets, self.buckets = self.buckets, defaultdict(list)
        for bucket in buckets.values():
            for out in self._forward(bucket):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag,
                                                   GlobalWindows.windowed_value(out.value))
                else:
                    yield GlobalWindows.windowed_value(out)

    def _forward(self, batch: list[PreparedImage]):
        try:
            vecs = self.model.embed_arrays([p.pixels for p in batch], batch_size=len(batch))
        except Exception as e:  # retry one by one: one bad image must not lose the batch
            if len(batch) == 1:
                _inc("dead_lettered")
                _inc(f"dead_letter.embed.{type(e).__name__}")
                p = batch[0]
                yield beam.pvalue.TaggedOutput(DEAD, Failure(p.uri, "embed", type(e).__name__,
                                                             str(e), p.listed_size, p.version))
                return
            for p in batch:
                yield from self._forward([p])
            return
        self.batch_sizes.update(len(batch))
        _inc("embedded", len(batch))
        self.progress.add(len(batch))
        for p, v in zip(batch, vecs):
            yield shard_row(p, v, self.fingerprint)


class EmbedImages(beam.PTransform):
    """PreparedImage -> shard rows (dicts, `embedding` a float32 array) + `dead_letter`."""

    def __init__(self, model_uri, fingerprint, batch_size=32, device=None, progress_seconds=15.0,
                 fsspec_config=None, torch_threads=None):
        super().__init__()
        self.args = (model_uri, device, fingerprint, batch_size, progress_seconds, fsspec_config,
                     torch_threads)

    def expand(self, images):
        return images | beam.ParDo(_EmbedByShapeFn(*self.args)).with_outputs(DEAD, main="rows")


# --------------------------------------------------------------------------- tables

def _source_row(item, run_id: str) -> dict:
    if isinstance(item, Failure):
        return {"uri": item.uri, "id": stable_id(item.uri), "size_bytes": item.size,
                "version": item.version, "outcome": f"dead_letter:{item.stage}",
                "run_id": run_id}
    return {"uri": item["uri"], "id": item["id"], "size_bytes": item["_listed_size"],
            "version": item["_version"], "outcome": "embedded", "run_id": run_id}


def _outcome_items(item):
    """An outcome (name, or (name, n)) -> ("count", name, n) for RunTotals."""
    if isinstance(item, tuple):
        yield ("count", *item)
    else:
        yield "count", item, 1


TABLES = ("shards", "dead_letter", "tombstones", "sources")   # run.json keys of file lists


class RunTotals(beam.CombineFn):
    """("count", outcome, n) and ("file", table, name) items -> one dict:
    {"counts": {outcome: n}, "shards": [names], "dead_letter": [...], ...}. Gives the empty
    totals when nothing came in (a run with nothing to do still gets its run.json)."""

    def create_accumulator(self):
        return {"counts": {}, **{t: [] for t in TABLES}}

    def add_input(self, acc, item):
        kind, key, value = item
        if kind == "count":
            acc["counts"][key] = acc["counts"].get(key, 0) + value
        else:
            acc[key].append(value)
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            for k, v in acc["counts"].items():
                out["counts"][k] = out["counts"].get(k, 0) + v
            for t in TABLES:
                out[t] += acc[t]
        return out

    def extract_output(self, acc):
        return {"counts": dict(sorted(acc["counts"].items())),
                **{t: sorted(acc[t]) for t in TABLES}}


class WriteRunTables(beam.PTransform):
    """Writes one run's tables under its folder: embedding shards, dead letter, tombstones,
    sources (incremental state). Outputs one dict (RunTotals): the outcome counts and the names
    of the files written, available only once every table is written."""

    def __init__(self, run_dir, run_id, schema, num_shards, shard_rows, fsspec_config=None):
        super().__init__()
        self.run_dir, self.run_id, self.schema = run_dir, run_id, schema
        self.num_shards, self.shard_rows = num_shards, shard_rows
        self.fsspec_config = fsspec_config

    def expand(self, pcolls):
        rows, dead, tombstones, outcomes = (pcolls["rows"], pcolls["dead"],
                                            pcolls["tombstones"], pcolls["outcomes"])
        run_id, d = self.run_id, self.run_dir
        U.apply_fsspec_config(self.fsspec_config)
        written = {}
        written["shards"] = rows | "Shards" >> WriteParquetShards(
            d, "embeddings", self.schema, lambda r: r["id"], self.num_shards, self.shard_rows,
            to_table=embedding_table)
        written["dead_letter"] = (
            dead | "DeadRows" >> beam.Map(lambda f: f.row(run_id))
            | "DeadLetter" >> WriteParquetShards(d, "dead_letter", DEAD_LETTER_SCHEMA,
                                                 lambda r: stable_id(r["uri"]),
                                                 shard_rows=4 * self.shard_rows))
        # a URI embedded earlier that now fails (replaced by a broken object, gone since the
        # listing) must not keep its stale vector: tombstoned with the deleted ones
        stale = (dead | "Stale" >> beam.Filter(lambda f: f.replaces)
                 | "StaleRows" >> beam.Map(lambda f: {"uri": f.uri, "id": stable_id(f.uri),
                                                      "run_id": run_id}))
        written["tombstones"] = (
            (tombstones, stale) | "AllTombstones" >> beam.Flatten()
            | "Tombstones" >> WriteParquetShards(d, "tombstones", TOMBSTONE_SCHEMA,
                                                 lambda r: r["id"],
                                                 shard_rows=4 * self.shard_rows))
        written["sources"] = (
            (rows, dead) | "SourceItems" >> beam.Flatten()
            | "SourceRows" >> beam.Map(_source_row, run_id)
            | "Sources" >> WriteParquetShards(d, "sources", SOURCE_SCHEMA, lambda r: r["id"],
                                              shard_rows=4 * self.shard_rows))
        dead_outcomes = dead | "DeadOutcomes" >> beam.FlatMap(
            lambda f: ["dead_lettered", f"dead_letter.{f.reason}"]
            + (["tombstoned_stale"] if f.replaces else []))
        embedded = rows | "EmbeddedOutcomes" >> beam.Map(lambda r: "embedded")
        counts = ((outcomes, dead_outcomes, embedded) | "AllOutcomes" >> beam.Flatten()
                  | "CountItems" >> beam.FlatMap(_outcome_items))
        files = [written[t] | f"{label}Names" >> beam.Map(lambda named, t=t: ("file", t, named[0]))
                 for t, label in zip(TABLES, ("Shard", "DeadLetter", "Tombstone", "Source"))]
        return ((counts, *files) | "AllTotals" >> beam.Flatten()
                | "RunTotals" >> beam.CombineGlobally(RunTotals()))


def build_summary(info: dict, totals: dict, now: float | None = None) -> dict:
    """run.json: the launch-time facts (`info`) + the accounting and file lists (`totals`)."""
    now = time.time() if now is None else now
    return {
        "run_id": info["run_id"],
        "runner": info["runner"],
        "model": info["model"],
        "model_uri": info["model_uri"],
        "dimension": info["dimension"],
        "input": info["input"],
        "input_key": info["input_key"],
        "incremental": info["incremental"],
        "previous_runs": list(info["previous_runs"]),
        "min_listed": info["min_listed"],
        "max_tombstone_fraction": info["max_tombstone_fraction"],
        **summarize(totals["counts"]),
        **{t: list(totals[t]) for t in TABLES},
        "seconds": round(now - info["started"], 3),
        "pipeline_version": PIPELINE_VERSION,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }


class _WriteRunSummaryFn(_StorageDoFn):
    def __init__(self, run_dir: str, info: dict, fsspec_config: dict | None):
        super().__init__(fsspec_config)
        self.run_dir, self.info = run_dir, info

    def process(self, totals, ids_checked):
        import fsspec

        summary = build_summary(self.info, totals)
        if not summary["accounted"]:
            _inc("unaccounted_runs")
            raise RuntimeError(
                f"run {summary['run_id']} lost track of URIs: read {summary['read']} but "
                f"embedded + dead-lettered + skipped = {summary['embedded']} + "
                f"{summary['dead_lettered']} + {summary['skipped']}; run.json not written, "
                f"rerun to redo it")
        store, run_id = self.run_dir.rsplit("/", 1)[0], summary["run_id"]
        leased = self.info.get("lease", False)
        try:
            R.check_store_guards(summary, self.info["min_listed"],
                                 self.info["max_tombstone_fraction"])
        except R.RunRefused:
            _inc("refused_runs")
            if leased:      # a refusal is final (a retry refuses again): free the store now
                L.release(store, run_id)
            raise
        if leased:
            L.check_held(store, run_id)
        fs, root = fsspec.core.url_to_fs(self.run_dir)
        fs.invalidate_cache(root)   # listings cached in this process predate the tables' writes
        if fs.exists(f"{root}/{TMP_FOLDER}"):
            fs.rm(f"{root}/{TMP_FOLDER}", recursive=True)
        check_tables_present(fs, root, summary)
        R.write_json_atomic(f"{self.run_dir}/{R.RUN_SUMMARY}", summary)
        if leased:
            try:        # taken over between the check and the write: the run is not complete
                L.check_held(store, run_id)
            except L.LeaseLost:
                fs.rm(f"{root}/{R.RUN_SUMMARY}")
                raise
            L.release(store, run_id)
        log.info("run %s complete: %d read, %d embedded, %d dead-lettered, %d skipped (%d live "
                 "ids checked)", summary["run_id"], summary["read"], summary["embedded"],
                 summary["dead_lettered"], summary["skipped"], ids_checked)
        yield summary


def check_tables_present(fs, root: str, summary: dict) -> None:
    """Every file run.json is about to list exists (nothing removed the run's files under it)."""
    present = {p[len(root):].lstrip("/") for p in fs.find(root)}
    missing = [f for t in TABLES for f in summary.get(t, []) if f not in present]
    if missing:
        raise RuntimeError(f"run {summary['run_id']}: {len(missing)} of its files are gone from "
                           f"{root} (e.g. {missing[0]}); run.json not written, the next run "
                           f"redoes this work")


class WriteRunSummary(beam.PTransform):
    """(RunTotals, ids checked by CheckIdCollisions) -> writes `<run>/run.json` (temporary name,
    then rename) on a worker, as the job's last step: the accounting check (embedded +
    dead-lettered + skipped == read) fails the job otherwise and no run.json is written. Waits
    for the collision check through a side input. Outputs the summary."""

    def __init__(self, run_dir: str, info: dict, fsspec_config: dict | None = None):
        super().__init__()
        self.run_dir, self.info, self.fsspec_config = run_dir, info, fsspec_config

    def expand(self, inputs):
        totals, checked = inputs
        n_checked = checked | "CountChecked" >> beam.combiners.Count.Globally()
        return totals | "Write" >> beam.ParDo(
            _WriteRunSummaryFn(self.run_dir, self.info, self.fsspec_config),
            beam.pvalue.AsSingleton(n_checked))


# --------------------------------------------------------------------------- launcher

def default_run_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return (now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-"
            + secrets.token_hex(3))


def local_defaults(argv: list[str]) -> list[str]:
    """The local runners, kept off the network: the in-process FnApiRunner unless the user
    named a runner; with `--runner=DirectRunner`, `--allow_unsafe_triggers` (no effect on this
    batch pipeline) is what Beam 2.77's DirectRunner checks before trying Prism, whose binary it
    would otherwise download."""
    runner = None
    for i, a in enumerate(argv):
        if a == "--runner" and i + 1 < len(argv):
            runner = argv[i + 1]
        elif a.startswith("--runner="):
            runner = a.split("=", 1)[1]
    if runner is None:
        return [*argv, f"--runner={LOCAL_RUNNER}"]
    if runner.split(".")[-1] in ("DirectRunner", "direct") and \
            "--allow_unsafe_triggers" not in argv:
        return [*argv, "--allow_unsafe_triggers"]
    return argv


def build_pipeline(pipeline: beam.Pipeline, opts: EmbedOptions, run_dir: str, run_id: str,
                   fingerprint: str, dim: int, max_side: int, multiple: int,
                   state_files: list[tuple[int, str, str]], run_info: dict | None = None,
                   scope: R.InputScope | None = None, partitions: list[tuple] | None = None):
    """The whole job, run.json included. `run_info`: the launch-time facts run.json records
    (make_run_info() builds them; default: a first run of `opts`). `scope`: which earlier URIs
    this run's listing speaks for (None: all). `partitions`: --input's listing tasks, when
    already listed."""
    fsconf = json.loads(opts.fsspec_config) if opts.fsspec_config else None
    if run_info is None:
        run_info = make_run_info(pipeline.options, run_id, fingerprint, dim, [])
    torch_threads = pipeline.options.view_as(EmbedWorkerOptions).torch_threads
    schema = embedding_schema(dim, fingerprint, PIPELINE_VERSION)
    listed = pipeline | "ListSources" >> ListSources(opts.input, fsconf, partitions)
    before = pipeline | "ReadStoreState" >> ReadStoreState(state_files, fsconf)
    decided = (listed["sources"], before) | "Reconcile" >> Reconcile(run_id, scope)
    checked = decided[LIVE_IDS] | "CheckIdCollisions" >> CheckIdCollisions()
    prepared = (decided.to_embed
                | "SpreadWork" >> beam.Reshuffle()
                | "FetchAndDecode" >> FetchAndDecode(max_side, multiple, fsconf))
    embedded = prepared.images | "EmbedImages" >> EmbedImages(
        opts.model, fingerprint, opts.batch_size, opts.device, opts.progress_seconds, fsconf,
        torch_threads)
    dead = (prepared[DEAD], embedded[DEAD]) | "AllDead" >> beam.Flatten()
    not_images = listed[NOT_IMAGES] | "NotImageOutcomes" >> beam.Map(
        lambda _: "listed_not_images")
    outcomes = (decided[OUTCOMES], not_images) | "ListedOutcomes" >> beam.Flatten()
    totals = {"rows": embedded.rows, "dead": dead, "tombstones": decided[TOMBSTONES],
              "outcomes": outcomes} | "WriteRunTables" >> WriteRunTables(
        run_dir, run_id, schema, opts.num_shards, opts.shard_rows, fsconf)
    return (totals, checked) | "WriteRunSummary" >> WriteRunSummary(run_dir, run_info, fsconf)


def make_run_info(options: PipelineOptions, run_id: str, fingerprint: str, dim: int,
                  previous_runs: list[str], started: float | None = None) -> dict:
    """What run.json records from the launch: fixed when the graph is built."""
    opts = options.view_as(EmbedOptions)
    return {"run_id": run_id, "runner": options.view_as(StandardOptions).runner,
            "model": fingerprint, "model_uri": opts.model, "dimension": dim,
            "input": opts.input, "input_key": U.input_key(opts.input),
            "incremental": not opts.full,
            "previous_runs": list(previous_runs),
            "min_listed": opts.min_listed,
            "max_tombstone_fraction": opts.max_tombstone_fraction,
            "started": time.time() if started is None else started}


def summarize(counts: dict) -> dict:
    """run.json's accounting from the outcome counts; `accounted` says every URI read ended
    embedded, dead-lettered or skipped. Not in `read` (and not in the identity):
    `listed_not_images` (files of a folder/glob without an image extension, never read),
    `kept_other_sources` (URIs of other inputs, not listed and kept) and `covered_before`
    (URIs an earlier run left live that this run's input covers: what tombstones are a share
    of)."""
    read = counts.get("read", 0)
    embedded, dead, skipped = (counts.get("embedded", 0), counts.get("dead_lettered", 0),
                               counts.get("skipped", 0))
    return {
        "read": read,
        "embedded": embedded,
        "dead_lettered": dead,
        "skipped": skipped,
        "tombstoned": counts.get("tombstoned", 0),
        "tombstoned_stale": counts.get("tombstoned_stale", 0),
        "kept_other_sources": counts.get("kept_other_sources", 0),
        "covered_before": counts.get("covered_before", 0),
        "listed_not_images": counts.get("listed_not_images", 0),
        "duplicates": counts.get("duplicates", 0),
        "accounted": embedded + dead + skipped == read,
        "to_embed_by_reason": {k.split(".", 1)[1]: v for k, v in sorted(counts.items())
                               if k.startswith("to_embed.")},
        "skipped_by_reason": {k.split(".", 1)[1]: v for k, v in sorted(counts.items())
                              if k.startswith("skipped.")},
        "dead_letter_by_reason": {k.split(".", 1)[1]: v for k, v in sorted(counts.items())
                                  if k.startswith("dead_letter.")},
    }


def is_dry_run(options: PipelineOptions) -> bool:
    """Beam's --dry_run is a string option (`--dry_run=False` is truthy to Beam): read it as a
    boolean."""
    value = options.view_as(TestOptions).dry_run
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "none")
    return bool(value)


class PreparedRun(NamedTuple):
    pipeline: beam.Pipeline
    options: PipelineOptions
    run_id: str
    run_dir: str
    info: dict           # run.json's launch-time facts (make_run_info)
    dry_run: bool
    wait: bool           # False: a job is submitted and nothing waits for it
    store: str
    lease: dict | None   # the store lease this run holds (None: dry run)
    in_process: bool     # the job runs in this process (a local runner)


def prepare_run(argv: list[str]) -> PreparedRun:
    """Check the options, the input and the store, take the store's lease, and build the
    pipeline (run.json is its last step) without running it; the caller runs it or gives the
    lease back (`lease.release`). Nothing is written before the lease, and a refusal (a bad
    option or run id, an --output that is a file, an --input without images) leaves the store
    as it was. With --dry_run the store is not read, leased or cleaned (nothing over the
    network but what listing --input and loading --model need): built as for a first run."""
    from remap_core.descriptor.checkpoint import load_model

    argv = local_defaults(list(argv))
    options = PipelineOptions(argv)
    opts = options.view_as(EmbedOptions)
    for name in ("input", "output"):
        if not getattr(opts, name):
            raise ValueError(f"--{name} is required: remap embed --input <folder|glob|manifest> "
                             f"--output <store>")
    threads = options.view_as(EmbedWorkerOptions).torch_threads
    if threads is not None and threads < 1:
        raise ValueError(f"--torch_threads must be at least 1 (got {threads}); omit it to keep "
                         f"torch's default")
    check_option_ranges(opts)
    run_id = opts.run_id or default_run_id()
    R.check_run_id(run_id)
    dry_run = is_dry_run(options)
    options.view_as(TestOptions).dry_run = dry_run   # Beam then agrees with us on "False"
    std = options.view_as(StandardOptions)
    wait = not (dry_run or std.no_wait_until_finish
                or options.view_as(GoogleCloudOptions).template_location)
    in_process = std.runner.split(".")[-1] in IN_PROCESS_RUNNERS
    fsconf = json.loads(opts.fsspec_config) if opts.fsspec_config else None
    U.apply_fsspec_config(fsconf)
    store = opts.output.rstrip("/")
    if not dry_run:
        R.check_store_path(store)
    partitions = U.list_partitions(opts.input)
    if opts.min_listed > 0 and U.lists_no_image(partitions):
        others = f" (only {len(partitions)} other files)" if partitions else ""
        raise ValueError(f"--input {opts.input!r} holds no images{others}; nothing was run. "
                         f"Check --input (an unmounted folder, a mistyped prefix); pass "
                         f"--min_listed=0 to run on an empty listing")
    model = load_model(opts.model, device="cpu")
    cfg = model.config
    lease = None
    if not dry_run:
        seconds = opts.lease_minutes * 60 if wait else opts.unattended_lease_hours * 3600
        lease = L.acquire(store, L.new_lease(run_id, seconds, local=in_process, renewed=wait),
                          break_lease=opts.break_lease)
    try:
        if dry_run:
            previous, state = [], []
            log.info("dry run %s: the store %s is not read; graph built as for a first run",
                     run_id, store)
        else:
            previous, incomplete = R.scan_store(store)
            R.check_new_run([] if opts.full else previous, run_id, model.fingerprint, store)
            R.remove_incomplete(incomplete)
            state = [] if opts.full else R.state_files(previous)
            log.info("run %s: %d earlier runs in %s (%d state files)", run_id, len(previous),
                     store, len(state))
        scope = R.input_scope(opts.input, previous)
        run_dir = R.run_folder(store, run_id)
        info = make_run_info(options, run_id, model.fingerprint, model.dim,
                             [r.run_id for r in previous])
        info["lease"] = lease is not None
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, opts, run_dir, run_id, model.fingerprint, model.dim,
                       cfg["max_side"], cfg["multiple"], state, info, scope, partitions)
    except BaseException:
        if lease is not None:
            L.release(store, run_id)
        raise
    return PreparedRun(pipeline, options, run_id, run_dir, info, dry_run, wait, store, lease,
                       in_process)


def top_level_transforms(pipeline: beam.Pipeline) -> list[str]:
    return [t.full_label for t in pipeline.transforms_stack[0].parts]


def _job_ended(result) -> bool:
    try:
        return PipelineState.is_terminal(result.state)
    except Exception:       # the runner could not be asked: assume the job may still run
        return False


def run(argv: list[str]) -> dict:
    """Run the embed pipeline. Waits for the job and returns its run summary (run.json, which
    the job's last step wrote); with --dry_run builds the graph (DataflowRunner: translates it,
    offline), runs nothing and returns {"run_id", "submitted": True, "dry_run": True,
    "transforms": [...]}.

    When nothing waits for the job it returns {"run_id", "submitted": True} and the run keeps
    the store's lease for --unattended_lease_hours; the job's last step gives it back after
    run.json (else it lapses). That is:
    - --no_wait_until_finish: the job was submitted and runs on;
    - --template_location: Beam 2.77 writes the job's description there and returns a result
      without a job (`has_job` False, state DONE). The Flex Template launcher runs this with
      --template_location and submits the job from that file once this process exits, so the
      job, which the lease protects, is still to come. (A classic template built by hand this
      way describes this one run, its id and its listing: launch it once, within the lease.)
    A waited-for run whose runner returns a result without a job (no Beam 2.77 runner does
    that without --template_location) has no job that could complete it: that is an error,
    and the lease is given back."""
    import fsspec

    p = prepare_run(argv)
    if p.dry_run:
        if p.options.view_as(StandardOptions).runner.split(".")[-1] == "DataflowRunner":
            p.pipeline.run()            # Beam translates the job and submits nothing
        else:
            p.pipeline.to_runner_api()  # other runners would run it: only translate
        log.info("dry run: job graph of run %s built, nothing submitted or written", p.run_id)
        return {"run_id": p.run_id, "submitted": True, "dry_run": True, "graph_built": True,
                "run_dir": p.run_dir, "transforms": top_level_transforms(p.pipeline)}
    result = None
    # a launcher that waits renews the lease; a job nobody waits for holds it for its own time
    with L.Renewer(p.store, p.lease) if p.wait else contextlib.nullcontext():
        try:
            result = p.pipeline.run()
            if not p.wait:
                log.info("run %s submitted; its job writes %s/%s and gives the store's lease "
                         "back when it completes (else the lease lapses)", p.run_id, p.run_dir,
                         R.RUN_SUMMARY)
                return {"run_id": p.run_id, "submitted": True}
            if getattr(result, "has_job", True) is False:
                raise RuntimeError(f"the runner submitted no job for run {p.run_id} (a result "
                                   f"without a job, and no --template_location); nothing ran")
            state = result.wait_until_finish()
        except BaseException:
            # The job is over if it ran in this process, was never submitted, or reached a
            # terminal state; otherwise (Ctrl-C while waiting on a remote runner) it may still
            # run, and its lease lapses --lease_minutes after the last renewal.
            if p.in_process or result is None or _job_ended(result):
                L.release(p.store, p.run_id)
            raise
    if state not in (None, PipelineState.DONE):
        L.release(p.store, p.run_id)
        raise RuntimeError(f"pipeline ended in state {state}; run {p.run_id} is incomplete and "
                           f"will be redone by the next run")
    fs, root = fsspec.core.url_to_fs(p.run_dir)
    fs.invalidate_cache(root)   # written by a worker: this process's listings may predate it
    try:
        with fs.open(f"{root}/{R.RUN_SUMMARY}", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RuntimeError(f"the job of run {p.run_id} finished but wrote no "
                           f"{p.run_dir}/{R.RUN_SUMMARY}; the run is incomplete and will be redone "
                           f"by the next run") from None
