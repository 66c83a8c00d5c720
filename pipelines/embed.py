"""`remap embed`: image URIs -> fetch + decode -> batched embedding -> Parquet shards.

    ListSources | Reconcile (with the store's earlier runs) | FetchAndDecode | EmbedImages
      | WriteRunTables | WriteRunSummary     (+ dead letter, tombstones, sources, counts)

One module per stage: options.py (EmbedOptions), listing.py (ListSources), reconcile.py
(ReadStoreState, Reconcile, CheckIdCollisions), decode.py (FetchAndDecode), inference.py
(EmbedImages: Beam's RunInference with EmbedModelHandler), tables.py (WriteRunTables,
WriteRunSummary, run.json), launch.py (prepare_run, run: the store's lease around the job). This
module composes them (`build_pipeline`) and names the public entry points.

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

import json

import apache_beam as beam

from remap_store import runs
from remap_store.schema import embedding_schema, with_manifest_columns
from pipelines import uris
from pipelines.decode import FetchAndDecode
from pipelines.inference import EmbedImages, EmbedModelHandler
from pipelines.launch import (IN_PROCESS_RUNNERS, LOCAL_RUNNER, PreparedRun, default_run_id,
                              is_dry_run, local_defaults, prepare_run, run,
                              top_level_transforms)
from pipelines.listing import NOT_IMAGES, ListSources
from pipelines.options import (OPTION_RANGES, EmbedOptions, EmbedWorkerOptions,
                               check_option_ranges)
from pipelines.reconcile import (LIVE_IDS, OUTCOMES, SKIPPED, TOMBSTONES, CheckIdCollisions,
                                 ReadStoreState, Reconcile, reconcile)
from pipelines.tables import (PIPELINE_VERSION, WriteRunSummary, WriteRunTables, build_summary,
                              make_run_info, summarize)
from pipelines.workers import DEAD, NAMESPACE

__all__ = ["build_pipeline", "run", "prepare_run", "PreparedRun", "local_defaults",
           "default_run_id", "is_dry_run", "top_level_transforms", "LOCAL_RUNNER",
           "IN_PROCESS_RUNNERS", "EmbedOptions", "EmbedWorkerOptions", "OPTION_RANGES",
           "check_option_ranges", "ListSources", "NOT_IMAGES", "ReadStoreState", "Reconcile",
           "reconcile", "CheckIdCollisions", "SKIPPED", "TOMBSTONES", "LIVE_IDS", "OUTCOMES",
           "FetchAndDecode", "EmbedImages", "EmbedModelHandler", "WriteRunTables",
           "WriteRunSummary", "build_summary", "make_run_info", "summarize", "PIPELINE_VERSION",
           "DEAD", "NAMESPACE"]


def build_pipeline(pipeline: beam.Pipeline, opts: EmbedOptions, run_dir: str, run_id: str,
                   fingerprint: str, dim: int, max_side: int, multiple: int,
                   state_files: list[tuple[int, str, str]], run_info: dict | None = None,
                   scope: runs.InputScope | None = None, partitions: list[tuple] | None = None):
    """The whole job, run.json included. `run_info`: the launch-time facts run.json records
    (make_run_info() builds them; default: a first run of `opts`). `scope`: which earlier URIs
    this run's listing speaks for (None: all). `partitions`: --input's listing tasks, when
    already listed."""
    fsconf = json.loads(opts.fsspec_config) if opts.fsspec_config else None
    if run_info is None:
        run_info = make_run_info(pipeline.options, run_id, fingerprint, dim, [])
    torch_threads = pipeline.options.view_as(EmbedWorkerOptions).torch_threads
    uris.apply_fsspec_config(fsconf)
    if partitions is None:
        partitions = uris.list_partitions(opts.input)
    # a URI manifest's extra columns (title, product_id, ...) become nullable shard columns
    schema = with_manifest_columns(embedding_schema(dim, fingerprint, PIPELINE_VERSION),
                                   uris.partition_manifest_fields(partitions))
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
    totals = {"rows": embedded["rows"], "dead": dead, "tombstones": decided[TOMBSTONES],
              "outcomes": outcomes} | "WriteRunTables" >> WriteRunTables(
        run_dir, run_id, schema, opts.num_shards, opts.shard_rows, fsconf)
    return (totals, checked) | "WriteRunSummary" >> WriteRunSummary(run_dir, run_info, fsconf)

