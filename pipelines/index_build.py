"""The index build as a Beam job: the steps of `remap index` (index_builder.build) spread over
workers, on any runner `remap embed` runs on (the in-process FnApiRunner by default, the
PortableRunner with a worker pool, Dataflow).

    Shards ─┬─► SampleShard (per shard) ─► MergeSamples ─┐    (without DBA)
            │   Augment (one worker, with DBA) ──────────┴─► Train (one worker)
            │      │ dba/: the table, one part per shard      │ trained.faiss (side input)
            └─► AddShard (per shard) ◄────────────────────────┘
                     │ shards/<run>-<shard>-g1.faiss + .ids.parquet
                     ▼
                 Collect ─► Merge (one worker: merge_step, recall, manifest; upload)

Database-side augmentation (`--dba K`, on by default as in `remap index`: K = 2 up to 2 GiB of
float32 vectors) is the local build's augmentation (index_builder.build.augment_live, which
augment_collection runs) on one worker: the collection's N x D vectors are held in memory there
(about three times), so that worker needs the memory the local build would. It writes the whole
table (for the Merge worker: the manifest's record, the recall, --refine's vectors; like `remap
index --output gs://...`, the index published does not hold the table) and one part per shard (that
shard's rows, all an AddShard worker downloads), and draws the training sample from the augmented
vectors it holds, in place of SampleShard.

The launcher plans the build (index_builder.build.plan_training: runs, live shards, factory,
sample size; every refusal happens there, before a job starts). Workers write into the index
folder's `_build/` work folder, each file under a deterministic name through a temporary one,
so a retried or killed worker leaves no duplicates; a rerun of a killed job finds the trained
index and the index shards already written there (same plan) and does only what is missing.
The Merge step publishes the index with index_builder.publish (manifest.json last) and then
removes `_build/`. The sample is the same bottom-k sample the local build draws (keys hashed
from ids), so both builds train, add and merge the same index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from pipelines.launch import (IN_PROCESS_RUNNERS, is_dry_run, job_failed, local_defaults,
                              quiet_runner_errors, runner_reason, top_level_transforms)
from pipelines.options import EmbedOptions, IndexBuildOptions
from pipelines.uris import apply_fsspec_config
from pipelines.workers import StorageDoFn
from remap_store.files import join_url

NAMESPACE = "remap.index"
WORK = "_build"          # the job's work folder inside --index
PLAN_JSON = "plan.json"  # the plan the work folder's files belong to
DBA_WORK = "dba"         # the work folder's DBA table (DBA_JSON last) and its per-shard parts
log = logging.getLogger(__name__)


def _count(name: str, n: int = 1) -> None:
    beam.metrics.Metrics.counter(NAMESPACE, name).inc(n)


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return fs.exists(path)


def _download(url: str, local: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    fs.get_file(path, local)
    return local


def _dba_files() -> tuple[str, ...]:
    from index_builder.build import DBA_IDS, DBA_JSON, DBA_VECTORS

    return DBA_IDS, DBA_VECTORS, DBA_JSON      # DBA_JSON last: its presence says it is whole


def _dba_part(position: int) -> str:
    return f"{DBA_WORK}/{position:06d}"


def _download_dba(url: str, local: str) -> str:
    """Fetch a DBA table (the work folder's whole one or a shard's part) into `local`."""
    for name in _dba_files():
        _download(join_url(url, name), os.path.join(local, name))
    return local


def _upload_dba(local: str, url: str) -> None:
    """Upload the DBA table in the folder `local` to `url`, DBA_JSON last."""
    from index_builder.publish import upload_file

    for name in _dba_files():
        upload_file(os.path.join(local, name), join_url(url, name))


# --------------------------------------------------------------------------- worker steps

class SampleShardFn(StorageDoFn):
    """(position, LiveShard) -> the shard's bottom-k SamplePart (index_builder.train) of its own
    vectors (without DBA; with it, AugmentFn samples the augmented collection)."""

    def __init__(self, size: int, seed: int, dim: int, fsspec_config):
        super().__init__(fsspec_config)
        self.size, self.seed, self.dim = size, seed, dim

    def process(self, item):
        from index_builder.build import _live_batches
        from index_builder.train import sample_part

        _, shard = item
        yield sample_part(_live_batches([shard]), self.size, self.seed, self.dim)
        _count("shards_sampled")


class AugmentFn(StorageDoFn):
    """Database-side augmentation on one worker (index_builder.build.augment_live over the
    plan's live shards): the whole table and one part per shard into the work folder's dba/,
    the table's DBA_JSON last (a rerun finding it skips the step). -> the work folder; with
    `sample_size`, also the collection's training sample of the augmented vectors (the
    SAMPLE output, the bottom-k sample SampleShard + MergeSamples draw without DBA), so that no
    worker downloads a shard's part of the table to sample it."""

    SAMPLE = "sample"

    def __init__(self, plan, k: int, work: str, fsspec_config, sample_size: int | None = None):
        super().__init__(fsspec_config)
        self.plan, self.k, self.work, self.sample_size = plan, k, work, sample_size

    def process(self, _):
        import numpy as np

        from index_builder.build import augment_live, dba_table, write_dba_table

        dba = join_url(self.work, DBA_WORK)
        with tempfile.TemporaryDirectory(prefix="remap-dba-") as tmp:
            if _exists(join_url(dba, _dba_files()[-1])):
                _count("dba_already_done")
                if self.sample_size is not None:   # a rerun not trained yet: sample the table
                    _, ids, Xa = dba_table(_download_dba(dba, tmp))
                    yield beam.pvalue.TaggedOutput(self.SAMPLE, self._sample(ids, Xa))
                yield self.work
                return
            info, ids, Xa, where = augment_live(self.plan.shards, self.k, seed=self.plan.seed)
            for position in np.unique(where):     # the table is sorted by id: a mask per shard
                part = os.path.join(tmp, _dba_part(int(position)))
                os.makedirs(part)
                mine = where == position
                write_dba_table(part, info, ids[mine], Xa[mine])
                _upload_dba(part, join_url(dba, _dba_part(int(position))))
                shutil.rmtree(part)
            write_dba_table(tmp, info, ids, Xa)
            _upload_dba(tmp, dba)
        _count("dba_vectors", info["vectors"])
        if self.sample_size is not None:     # 0 (a Flat index) too: Train waits for it
            yield beam.pvalue.TaggedOutput(self.SAMPLE, self._sample(ids, Xa))
        yield self.work

    def _sample(self, ids, X, batch_rows: int = 65_536):
        from index_builder.train import sample_part

        return sample_part(((ids[i:i + batch_rows], X[i:i + batch_rows])
                            for i in range(0, len(ids), batch_rows)),
                           self.sample_size, self.plan.seed, self.plan.dim)


class MergeSamplesFn(beam.CombineFn):
    """SampleParts of disjoint shards -> the sample of the whole collection."""

    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return None

    def add_input(self, acc, part):
        return self.merge_accumulators([acc, part])

    def merge_accumulators(self, accs):
        from index_builder.train import merge_sample_parts

        from index_builder.train import SamplePart

        parts = [SamplePart(*a) for a in accs if a is not None]
        return merge_sample_parts(parts, self.size) if parts else None

    def extract_output(self, acc):
        return acc


class TrainFn(StorageDoFn):
    """The collection's sample -> trained.faiss + train.json in the work folder (one worker).
    -> the work folder's URL."""

    def __init__(self, plan, work: str, fsspec_config):
        super().__init__(fsspec_config)
        self.plan, self.work = plan, work

    def process(self, sample):
        from index_builder.build import TRAIN_JSON, TRAINED_FILE, train_on_sample
        from index_builder.publish import upload_file

        with tempfile.TemporaryDirectory(prefix="remap-train-") as tmp:
            train_on_sample(self.plan, sample[2], tmp)   # SamplePart.X
            upload_file(os.path.join(tmp, TRAINED_FILE), join_url(self.work, TRAINED_FILE))
            upload_file(os.path.join(tmp, TRAIN_JSON), join_url(self.work, TRAIN_JSON))
        _count("trained")
        yield self.work


class AddShardFn(StorageDoFn):
    """(position, LiveShard) -> its index shard + id table in the work folder (skipped when an
    earlier attempt wrote both: the id table goes last) -> the state.json entry."""

    def __init__(self, fsspec_config):
        super().__init__(fsspec_config)
        self._trained = None

    def setup(self):
        super().setup()
        self._tmp = tempfile.mkdtemp(prefix="remap-add-")

    def teardown(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def process(self, item, work: str, dba: str | None = None):
        import faiss

        from index_builder.add import AddJob, add_shard, ids_path
        from index_builder.build import TRAINED_FILE, index_shard_name
        from index_builder.embeddings import shard_num_rows
        from index_builder.publish import upload_file

        position, shard = item
        name = index_shard_name(shard.run_id, shard.path, 1)
        entry = {"position": position, "source": shard.path, "source_run": shard.run_id,
                 "index": name, "ids": ids_path(name)}
        ids_url = join_url(work, entry["ids"])
        if _exists(ids_url):
            _count("shards_already_added")
            yield {**entry, "vectors": shard_num_rows(ids_url)}
            return
        if self._trained is None:
            self._trained = faiss.read_index(
                _download(join_url(work, TRAINED_FILE), os.path.join(self._tmp, TRAINED_FILE)))
        out = os.path.join(self._tmp, os.path.basename(name))
        part = None
        if dba:     # this shard's rows of the DBA table replace its vectors
            part = _download_dba(join_url(dba, _dba_part(position)),
                                 os.path.join(self._tmp, _dba_part(position)))
        result = add_shard(self._trained, AddJob(shard.path, out, shard.drop, part))
        upload_file(out, join_url(work, name))
        upload_file(result.ids_file, ids_url)      # last: its presence says the shard is done
        os.remove(out)
        os.remove(result.ids_file)
        if part:
            shutil.rmtree(part, ignore_errors=True)
        _count("shards_added")
        _count("vectors_added", result.vectors)
        yield {**entry, "vectors": result.vectors}


class MergeFn(StorageDoFn):
    """Every index shard's entry -> the published index (one worker): the work folder's files
    are fetched into a local folder, merged and measured by index_builder.build.merge_step,
    uploaded to --index manifest last; then the work folder is removed. -> the manifest."""

    def __init__(self, index: str, work: str, store: str, layout: str, target_recall: float,
                 recall_queries: int, seed: int, started: float, fsspec_config,
                 qe: int | None = None, refine: int = 0, dba: bool = False):
        super().__init__(fsspec_config)
        self.index, self.work, self.store, self.layout = index, work, store, layout
        self.target_recall, self.recall_queries, self.seed = target_recall, recall_queries, seed
        self.started, self.qe, self.refine, self.dba = started, qe, refine, dba

    def process(self, entries):
        from index_builder.build import TRAIN_JSON, TRAINED_FILE, adopt_shards, merge_step
        from index_builder.publish import upload_index

        entries = sorted(entries, key=lambda e: e["position"])
        with tempfile.TemporaryDirectory(prefix="remap-merge-") as local:
            for rel in [TRAINED_FILE, TRAIN_JSON] + [e[k] for e in entries
                                                     for k in ("index", "ids")]:
                _download(join_url(self.work, rel), os.path.join(local, rel))
            if self.dba:   # for merge_step: the manifest's record, the recall, --refine
                _download_dba(join_url(self.work, DBA_WORK), local)
            with open(os.path.join(local, TRAIN_JSON)) as f:
                runs = json.load(f)["source_runs"]
            adopt_shards(local, runs, [{k: e[k] for k in e if k != "position"}
                                       for e in entries])
            manifest = merge_step(local, self.layout, self.target_recall,
                                  recall_queries=self.recall_queries, seed=self.seed,
                                  source_store=self.store, started=self.started,
                                  qe=self.qe, refine=self.refine)
            upload_index(local, self.index, keep=(WORK + "/",))
        fs, path = fsspec.core.url_to_fs(self.work)
        fs.rm(path, recursive=True)
        _count("indexes_published")
        yield manifest


# --------------------------------------------------------------------------- the job

def build_pipeline(pipeline: beam.Pipeline, plan, opts: IndexBuildOptions, work: str,
                   trained: bool, fsconf: dict | None, started: float, dba: int = 0) -> None:
    """The build's steps on `pipeline`. `trained`: the work folder already holds this plan's
    trained index (a rerun), so sampling and training are left out. `dba` K > 0: augment the
    collection first (AugmentFn, which also draws the training sample); AddShard then reads each
    shard's part of the table."""
    shards = (pipeline
              | "Shards" >> beam.Create([(i, s) for i, s in enumerate(plan.shards)
                                         if s.live_rows > 0])
              | "Spread" >> beam.Reshuffle())
    table, size = {}, plan.size + plan.held
    if dba:
        augmented = (pipeline
                     | "AugmentOnce" >> beam.Create([None])
                     | "Augment" >> beam.ParDo(AugmentFn(plan, dba, work, fsconf,
                                                         None if trained else size)
                                               ).with_outputs(AugmentFn.SAMPLE, main="work"))
        table = {"dba": beam.pvalue.AsSingleton(
            augmented.work | "DbaTable" >> beam.Map(lambda w: join_url(w, DBA_WORK)))}
    if trained:
        ready = pipeline | "TrainedEarlier" >> beam.Create([work])
    else:
        sample = (augmented[AugmentFn.SAMPLE] if dba else
                  (shards
                   | "SampleShard" >> beam.ParDo(SampleShardFn(size, plan.seed, plan.dim, fsconf))
                   | "MergeSamples" >> beam.CombineGlobally(MergeSamplesFn(size))))
        ready = sample | "Train" >> beam.ParDo(TrainFn(plan, work, fsconf))
    (shards
     | "AddShard" >> beam.ParDo(AddShardFn(fsconf), work=beam.pvalue.AsSingleton(ready),
                                **table)
     | "Collect" >> beam.combiners.ToList()
     | "Merge" >> beam.ParDo(MergeFn(opts.index.rstrip("/"), work, opts.embeddings,
                                     opts.layout, opts.target_recall, opts.recall_queries,
                                     opts.seed, started, fsconf, opts.qe, opts.refine,
                                     dba=bool(dba))))


def _check(opts: IndexBuildOptions) -> None:
    from index_builder.rerank import check_rerank_counts

    for name in ("embeddings", "index"):
        if not getattr(opts, name):
            raise ValueError(f"--{name} is required: remap index-beam --embeddings <store> "
                             f"--index <index folder>")
    for name in ("recall_queries", "train_sample"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1 (got {value})")
    check_rerank_counts(refine=opts.refine, qe=opts.qe)
    if opts.dba is not None and opts.dba < 0:
        raise ValueError(f"--dba must be at least 0 (0: no database-side augmentation; got "
                         f"{opts.dba})")
    if not 0 < opts.target_recall <= 1:
        raise ValueError(f"--target_recall must be in (0, 1] (got {opts.target_recall})")


def prepare_work_folder(work: str, key: str) -> bool:
    """Make `work` belong to the plan `key`: files an earlier job left for another plan (other
    runs, factory, sample or seed) are removed. -> True when it holds this plan's trained index
    (train.json last of the two)."""
    from index_builder.build import TRAIN_JSON
    from remap_store.files import write_json_atomic

    fs, path = fsspec.core.url_to_fs(work)
    plan_url = join_url(work, PLAN_JSON)
    if _exists(plan_url):
        with fs.open(join_url(path, PLAN_JSON), "r") as f:
            same = json.load(f).get("key") == key
        if same:
            log.info("index-beam: resuming in %s (same plan %s)", work, key)
            return _exists(join_url(work, TRAIN_JSON))
        log.info("index-beam: %s holds another plan's files; starting afresh", work)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    write_json_atomic(plan_url, {"key": key})
    return False


def run(argv: list[str]) -> dict:
    """Build an index as a Beam job and wait for it -> the manifest (as `remap index` returns
    it). With --dry_run the job graph is built (for Dataflow translated) and nothing runs or is
    written -> {"dry_run": True, "transforms": [...]}."""
    from index_builder.build import default_dba, plan_training
    from index_builder.manifest import read_manifest

    started = time.time()
    options = PipelineOptions(local_defaults(list(argv)))
    opts = options.view_as(IndexBuildOptions)
    _check(opts)
    fsconf = options.view_as(EmbedOptions).fsspec_config
    fsconf = json.loads(fsconf) if fsconf else None
    apply_fsspec_config(fsconf)
    dry_run = is_dry_run(options)
    options.view_as(TestOptions).dry_run = dry_run
    plan = plan_training(opts.embeddings, opts.factory, opts.max_index_memory, opts.train_sample,
                         seed=opts.seed, opq=opts.opq, layout=opts.layout,
                         **({} if opts.code_bytes is None else {"code_bytes": opts.code_bytes}))
    index = opts.index.rstrip("/")
    work = join_url(index, WORK)
    log.info("index-beam: %d vectors of dim %d in %d shards -> %s (%s); sample %d (+%d held "
             "out)", plan.n, plan.dim, len(plan.shards), plan.factory, opts.layout, plan.size,
             plan.held)
    dba = default_dba(plan.n, plan.dim) if opts.dba is None else opts.dba
    if dba:
        log.info("index-beam: database-side augmentation over the %d nearest others, on one "
                 "worker", dba)
    key = plan.key() + (f"-dba{dba}" if dba else "")
    trained = False if dry_run else prepare_work_folder(work, key)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, plan, opts, work, trained, fsconf, started, dba)
    if dry_run:
        if options.view_as(StandardOptions).runner.split(".")[-1] == "DataflowRunner":
            pipeline.run()
        else:
            pipeline.to_runner_api()
        return {"index": index, "dry_run": True, "factory": plan.factory,
                "transforms": top_level_transforms(pipeline)}
    in_process = options.view_as(StandardOptions).runner.split(".")[-1] in IN_PROCESS_RUNNERS
    cleanup = f"nothing was published (the index folder's manifest is unchanged); {work} keeps " \
              f"what was built, and the next run resumes from it"
    result = pipeline.run()
    try:
        with quiet_runner_errors() if not in_process else contextlib.nullcontext():
            state = result.wait_until_finish()
    except Exception as e:
        if in_process:   # the job ran in this process: its error is the code's own
            raise
        raise job_failed("the index job", runner_reason(e), cleanup) from e
    if state not in (None, "DONE"):
        raise job_failed("the index job", f"it ended in state {state}", cleanup)
    return read_manifest(index)
