"""A run's tables and its summary: embedding shards, dead letter, tombstones and sources
written under the run folder (WriteRunTables), the outcome counts checked and run.json written
last (WriteRunSummary): what run.json records, from the launch (`make_run_info`) and from the
job (`summarize`, `build_summary`)."""

from __future__ import annotations

import datetime as _dt
import logging
import time

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from remap_core.descriptor.checkpoint import model_name
from remap_store import lease, runs
from remap_store.files import input_key
from remap_store.schema import (DEAD_LETTER_SCHEMA, SOURCE_SCHEMA, TOMBSTONE_SCHEMA,
                                embedding_table, stable_id)
from pipelines import uris
from pipelines.options import EmbedOptions
from pipelines.prepare import Failure
from pipelines.shards import TMP_FOLDER, WriteParquetShards
from pipelines.workers import StorageDoFn, count

PIPELINE_VERSION = "0.2.0"     # written in every shard's metadata and in run.json
log = logging.getLogger(__name__)


def make_run_info(options: PipelineOptions, run_id: str, fingerprint: str, dim: int,
                  previous_runs: list[str], started: float | None = None) -> dict:
    """What run.json records from the launch: fixed when the graph is built."""
    opts = options.view_as(EmbedOptions)
    return {"run_id": run_id, "runner": options.view_as(StandardOptions).runner,
            "model": fingerprint, "model_uri": model_name(opts.model), "dimension": dim,
            "input": opts.input, "input_key": input_key(opts.input),
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




def _source_row(item, run_id: str) -> dict:
    if isinstance(item, Failure):
        return {"uri": item.uri, "id": stable_id(item.uri), "size_bytes": item.size,
                "version": item.version, "outcome": f"dead_letter:{item.stage}",
                "run_id": run_id, "metadata_sha1": None}
    return {"uri": item["uri"], "id": item["id"], "size_bytes": item["_listed_size"],
            "version": item["_version"], "outcome": "embedded", "run_id": run_id,
            "metadata_sha1": item["_metadata_sha1"]}


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
        uris.apply_fsspec_config(self.fsspec_config)
        written = {}
        prefix = runs.TABLE_PREFIXES      # run.json key -> file name prefix
        written["shards"] = rows | "Shards" >> WriteParquetShards(
            d, prefix["shards"], self.schema, lambda r: r["id"], self.num_shards,
            self.shard_rows, to_table=embedding_table)
        written["dead_letter"] = (
            dead | "DeadRows" >> beam.Map(lambda f: f.row(run_id))
            | "DeadLetter" >> WriteParquetShards(d, prefix["dead_letter"], DEAD_LETTER_SCHEMA,
                                                 lambda r: stable_id(r["uri"]),
                                                 shard_rows=4 * self.shard_rows))
        # a URI embedded earlier that now fails (replaced by a broken object, gone since the
        # listing) must not keep its stale vector: tombstoned with the deleted ones
        stale = (dead | "Stale" >> beam.Filter(lambda f: f.replaces)
                 | "StaleRows" >> beam.Map(lambda f: {"uri": f.uri, "id": stable_id(f.uri),
                                                      "run_id": run_id}))
        written["tombstones"] = (
            (tombstones, stale) | "AllTombstones" >> beam.Flatten()
            | "Tombstones" >> WriteParquetShards(d, prefix["tombstones"], TOMBSTONE_SCHEMA,
                                                 lambda r: r["id"],
                                                 shard_rows=4 * self.shard_rows))
        written["sources"] = (
            (rows, dead) | "SourceItems" >> beam.Flatten()
            | "SourceRows" >> beam.Map(_source_row, run_id)
            | "Sources" >> WriteParquetShards(d, prefix["sources"], SOURCE_SCHEMA,
                                              lambda r: r["id"],
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


class _WriteRunSummaryFn(StorageDoFn):
    def __init__(self, run_dir: str, info: dict, fsspec_config: dict | None):
        super().__init__(fsspec_config)
        self.run_dir, self.info = run_dir, info

    def process(self, totals, ids_checked):
        summary = build_summary(self.info, totals)
        if not summary["accounted"]:
            count("unaccounted_runs")
            raise RuntimeError(
                f"run {summary['run_id']} lost track of URIs: read {summary['read']} but "
                f"embedded + dead-lettered + skipped = {summary['embedded']} + "
                f"{summary['dead_lettered']} + {summary['skipped']}; run.json not written, "
                f"rerun to redo it")
        store, run_id = self.run_dir.rsplit("/", 1)[0], summary["run_id"]
        leased = self.info.get("lease", False)
        try:
            runs.check_store_guards(summary, self.info["min_listed"],
                                 self.info["max_tombstone_fraction"])
        except runs.RunRefused:
            count("refused_runs")
            if leased:      # a refusal is final (a retry refuses again): free the store now
                lease.release(store, run_id)
            raise
        if leased:
            lease.check_held(store, run_id)
        fs, root = fsspec.core.url_to_fs(self.run_dir)
        fs.invalidate_cache(root)   # listings cached in this process predate the tables' writes
        if fs.exists(f"{root}/{TMP_FOLDER}"):
            fs.rm(f"{root}/{TMP_FOLDER}", recursive=True)
        check_tables_present(fs, root, summary)
        written = runs.write_run_summary(self.run_dir, summary)
        if leased:
            try:        # taken over between the check and the write: the run is not complete
                lease.check_held(store, run_id)
            except lease.LeaseLost:
                fs.rm(fsspec.core.url_to_fs(written)[1])
                raise
            lease.release(store, run_id)
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

