"""`remap embed`: image URIs -> fetch + decode -> batched embedding -> Parquet shards.

    ReadImageUris | FetchAndDecode (dead letter on failure) | Embed | WriteShards

Runs on any Beam runner; the local default is the in-process FnApiRunner, which never reaches
for the network (Beam 2.77's DirectRunner tries to download Prism first).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import secrets
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from remap_core.shard_schema import (DEAD_LETTER_SCHEMA, PARQUET_CODEC, ROW_GROUP_ROWS,
                                     embedding_schema)

from . import uris as U
from .model_cache import shared_model
from .prepare import Failure, PreparedImage, fetch_and_prepare

PIPELINE_VERSION = "0.1.0"
NAMESPACE = "remap.embed"
DEAD = "dead_letter"
LOCAL_RUNNER = "FnApiRunner"
log = logging.getLogger(__name__)


class EmbedOptions(PipelineOptions):
    """Options of `remap embed` (see `remap embed --help`)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", required=True,
                            help="folder, glob, or manifest file(s) (.txt/.csv/.parquet) of image "
                                 "URIs; local, gs:// or s3://")
        parser.add_argument("--output", required=True,
                            help="embedding store (local, gs://, s3://): each run writes "
                                 "run-<id>/ with shards, dead letter and run.json")
        parser.add_argument("--model", default=None,
                            help="checkpoint path or fsspec URL (default: bundled EfficientNet-"
                                 "Lite0 + GeM)")
        parser.add_argument("--run_id", default=None, help="run id (default: UTC timestamp)")
        parser.add_argument("--batch_size", type=int, default=16, help="max images per forward")
        parser.add_argument("--num_shards", type=int, default=1,
                            help="embedding shards per run (fixed count: deterministic names)")
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


# --------------------------------------------------------------------------- transforms

def _read_manifest(path):
    yield from U.read_manifest(path)


class ReadImageUris(beam.PTransform):
    """--input -> PCollection[str] of unique URIs, spread across workers."""

    def __init__(self, spec: str):
        super().__init__()
        self.spec = spec

    def expand(self, pbegin):
        kind, items = U.expand_input(self.spec)
        pcoll = pbegin | "Seed" >> beam.Create(items)
        if kind == "manifests":
            pcoll = (pcoll | "SpreadManifests" >> beam.Reshuffle()
                     | "ReadManifests" >> beam.FlatMap(_read_manifest))
        return (pcoll
                | "Dedupe" >> beam.Distinct()
                | "CountRead" >> beam.Map(_count, Metrics.counter(NAMESPACE, "read"))
                | "Spread" >> beam.Reshuffle())


def _count(x, counter):
    counter.inc()
    return x


class _FetchAndDecodeFn(beam.DoFn):
    def __init__(self, max_side: int, multiple: int):
        self.max_side, self.multiple = max_side, multiple
        self.failed = Metrics.counter(NAMESPACE, "dead_lettered")

    def process(self, uri):
        out = fetch_and_prepare(uri, self.max_side, self.multiple)
        if isinstance(out, Failure):
            self.failed.inc()
            Metrics.counter(NAMESPACE, f"failed.{out.stage}.{out.error_type}").inc()
            yield beam.pvalue.TaggedOutput(DEAD, out)
        else:
            yield out


class FetchAndDecode(beam.PTransform):
    """URIs -> PreparedImage, with failures on the `dead_letter` output."""

    def __init__(self, max_side: int, multiple: int):
        super().__init__()
        self.max_side, self.multiple = max_side, multiple

    def expand(self, uris):
        return uris | beam.ParDo(_FetchAndDecodeFn(self.max_side, self.multiple)).with_outputs(
            DEAD, main="images")


class _EmbedBatchFn(beam.DoFn):
    def __init__(self, model_uri, device, fingerprint):
        self.model_uri, self.device, self.fingerprint = model_uri, device, fingerprint
        self.embedded = Metrics.counter(NAMESPACE, "embedded")
        self.batches = Metrics.distribution(NAMESPACE, "batch_size")

    def setup(self):
        self.model = shared_model(self.model_uri, self.device)
        if self.model.fingerprint != self.fingerprint:
            raise RuntimeError(f"worker loaded model {self.model.fingerprint} but the job was "
                               f"launched for {self.fingerprint}; the checkpoint changed mid-run")

    def process(self, batch: list[PreparedImage]):
        vecs = self.model.embed_arrays([p.pixels for p in batch], batch_size=len(batch))
        self.batches.update(len(batch))
        for p, v in zip(batch, vecs):
            self.embedded.inc()
            yield {"id": p.id, "uri": p.uri, "embedding": v.tolist(),
                   "content_sha1": p.content_sha1, "size_bytes": p.size_bytes,
                   "width": p.width, "height": p.height, "model": self.fingerprint}


class Embed(beam.PTransform):
    """PreparedImage -> shard rows (dicts), batched; one model per worker process."""

    def __init__(self, model_uri, fingerprint, batch_size=16, device=None):
        super().__init__()
        self.model_uri, self.fingerprint = model_uri, fingerprint
        self.batch_size, self.device = batch_size, device

    def expand(self, images):
        return (images
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
                | "Forward" >> beam.ParDo(_EmbedBatchFn(self.model_uri, self.device,
                                                        self.fingerprint)))


class WriteShards(beam.PTransform):
    """Shard rows -> `<run_dir>/embeddings-SSSSS-of-NNNNN.parquet` (zstd, temp-then-rename)."""

    def __init__(self, run_dir: str, schema, num_shards: int):
        super().__init__()
        self.run_dir, self.schema, self.num_shards = run_dir, schema, num_shards

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(
            f"{self.run_dir}/embeddings", self.schema, codec=PARQUET_CODEC,
            file_name_suffix=".parquet", num_shards=self.num_shards,
            shard_name_template="-SSSSS-of-NNNNN", record_batch_size=1024,
            row_group_buffer_size=ROW_GROUP_ROWS * 4 * 2048)


class WriteDeadLetter(beam.PTransform):
    def __init__(self, run_dir: str, run_id: str):
        super().__init__()
        self.run_dir, self.run_id = run_dir, run_id

    def expand(self, failures):
        return (failures
                | "ToRow" >> beam.Map(lambda f, rid: f.row(rid), self.run_id)
                | beam.io.WriteToParquet(f"{self.run_dir}/dead_letter", DEAD_LETTER_SCHEMA,
                                         codec=PARQUET_CODEC, file_name_suffix=".parquet",
                                         num_shards=1, shard_name_template="-SSSSS-of-NNNNN"))


# --------------------------------------------------------------------------- launcher

def default_run_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def local_defaults(argv: list[str]) -> list[str]:
    """Pick the in-process runner unless the user named one (never the Prism download)."""
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        argv = [*argv, f"--runner={LOCAL_RUNNER}"]
    return argv


def build_pipeline(pipeline: beam.Pipeline, opts: EmbedOptions, run_dir: str, run_id: str,
                   fingerprint: str, dim: int, max_side: int, multiple: int):
    schema = embedding_schema(dim, fingerprint, PIPELINE_VERSION)
    prepared = (pipeline
                | "ReadImageUris" >> ReadImageUris(opts.input)
                | "FetchAndDecode" >> FetchAndDecode(max_side, multiple))
    (prepared.images
     | "Embed" >> Embed(opts.model, fingerprint, opts.batch_size, opts.device)
     | "WriteShards" >> WriteShards(run_dir, schema, opts.num_shards))
    prepared[DEAD] | "WriteDeadLetter" >> WriteDeadLetter(run_dir, run_id)


def _counters(result) -> dict:
    out = {}
    for c in result.metrics().query()["counters"]:
        if c.key.metric.namespace == NAMESPACE:
            name = c.key.metric.name
            out[name] = out.get(name, 0) + (c.committed if c.committed is not None else c.attempted)
    return out


def run(argv: list[str]) -> dict:
    """Run the embed pipeline; returns (and writes as run.json, last) the run summary."""
    import fsspec

    from remap_core.checkpoint import load_model

    argv = local_defaults(list(argv))
    options = PipelineOptions(argv)
    opts = options.view_as(EmbedOptions)
    model = load_model(opts.model, device="cpu")
    cfg = model.config
    run_id = opts.run_id or default_run_id()
    run_dir = opts.output.rstrip("/") + f"/run-{run_id}"
    started = time.time()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, opts, run_dir, run_id, model.fingerprint, model.dim,
                   cfg["max_side"], cfg["multiple"])
    result = pipeline.run()
    result.wait_until_finish()
    counters = _counters(result)
    fs, root = fsspec.core.url_to_fs(run_dir)
    shards = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(root + "/embeddings-*.parquet"))
    summary = {
        "run_id": run_id,
        "runner": options.view_as(StandardOptions).runner,
        "model": model.fingerprint,
        "model_uri": opts.model,
        "dimension": model.dim,
        "input": opts.input,
        "read": counters.get("read", 0),
        "embedded": counters.get("embedded", 0),
        "dead_lettered": counters.get("dead_lettered", 0),
        "dead_letter_by_reason": {k[len("failed."):]: v for k, v in counters.items()
                                  if k.startswith("failed.")},
        "shards": shards,
        "seconds": round(time.time() - started, 3),
        "pipeline_version": PIPELINE_VERSION,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    with fs.open(root + "/run.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
    fs.mv(root + "/run.json.tmp", root + "/run.json")
    return summary
