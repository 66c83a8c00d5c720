"""The embed step on Beam's RunInference. `EmbedModelHandler` owns the model's life: loaded once
per worker process (RunInference shares it across the process's threads), torch's threads set
there, the checkpoint's fingerprint checked against the job's. `EmbedImages` keeps images of one
shape together, so every forward pass is a full batch without cropping:

    PreparedImage | BatchByShape | RunInference(EmbedModelHandler).with_exception_handling()
      | ShardRows                 -> shard rows + dead letter

One bad image never loses its batch: a batch whose forward fails is embedded again one image at
a time, and only the image that fails alone is dead-lettered (stage "embed").

An image's pixels never leave the step that embeds it: ShardRows (PredictionResult -> shard row,
pixels dropped) reads RunInference's output directly, so the runner fuses the two, and only
shard rows and Failures come out of EmbedImages. Anything between them that the runner cannot
fuse (a Flatten, a GroupByKey, a side input) would make it hold every image's pixels until the
whole input is embedded: the in-process FnApiRunner materialises every multi-input Flatten
(issue 15: 20 GB at 10k images of 512 px).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.transforms.window import GlobalWindows

from remap_core.descriptor.batching import shape_batches
from remap_store.files import redact_logs
from pipelines.prepare import Failure, PreparedImage
from pipelines.uris import apply_fsspec_config, metadata_sha1
from pipelines.workers import DEAD, NAMESPACE, Progress, count

log = logging.getLogger(__name__)


def set_torch_threads(torch_threads: int | None) -> None:
    """torch's intra-op threads for this process; None leaves torch's default (OMP_NUM_THREADS,
    else the core count) alone."""
    if torch_threads is None:
        return
    if torch_threads < 1:
        raise ValueError(f"torch_threads must be at least 1, got {torch_threads}")
    import torch

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def embed_failure(p: PreparedImage, error_type: str, message: str) -> Failure:
    """The dead-letter row of an image the model could not embed."""
    return Failure(p.uri, "embed", error_type, message, p.listed_size, p.version)


def embed_group(model, group: list[PreparedImage], max_batch: int | None = None) -> list:
    """One forward pass over images of one shape (several of at most `max_batch` when given)
    -> a float32 (D,) vector per image; when a pass fails, each image again alone, a Failure for
    each image that fails alone."""
    try:
        vectors = model.embed_arrays([p.pixels for p in group],
                                     batch_size=min(len(group), max_batch or len(group)))
    except Exception as e:  # retry one by one: one bad image must not lose the batch
        if len(group) == 1:
            return [embed_failure(group[0], type(e).__name__, str(e))]
        return [out for p in group for out in embed_group(model, [p])]
    Metrics.distribution(NAMESPACE, "batch_size").update(len(group))
    return list(vectors)


class EmbedModelHandler(ModelHandler[PreparedImage, PredictionResult, Any]):
    """RunInference's handler for remap's descriptor: PreparedImage -> PredictionResult whose
    `inference` is the (D,) float32 embedding, or the image's `Failure`; `model_id` is the
    model's fingerprint.

    `batch_size`: images per forward pass, also RunInference's own max batch size when it
    batches (EmbedImages batches by shape itself and hands RunInference whole batches)."""

    def __init__(self, model_uri: str | None, fingerprint: str, batch_size: int = 32,
                 device: str | None = None, torch_threads: int | None = None,
                 fsspec_config: dict | None = None):
        super().__init__(max_batch_size=batch_size)
        self.model_uri, self.fingerprint, self.batch_size = model_uri, fingerprint, batch_size
        self.device, self.torch_threads = device, torch_threads
        self.fsspec_config = fsspec_config

    def load_model(self):
        """The checkpoint at `model_uri` in eval mode on `device` (None: this worker's GPU when
        it has one, else its CPU; "cuda" on a worker without one fails the step, saying so);
        refuses one whose fingerprint is not the job's (the checkpoint changed after the
        launch). On a GPU the forward batch is capped to what half its free memory holds at the
        model's largest input (`model.max_forward_batch`)."""
        from remap_core.descriptor.checkpoint import load_model
        from remap_core.descriptor.devices import device_name, memory_batch_size, resolve_device

        redact_logs()
        apply_fsspec_config(self.fsspec_config)
        set_torch_threads(self.torch_threads)
        device = resolve_device(self.device)
        model = load_model(self.model_uri, device=device)
        if model.fingerprint != self.fingerprint:
            raise RuntimeError(f"worker loaded model {model.fingerprint} but the job was "
                               f"launched for {self.fingerprint}; the checkpoint changed mid-run: "
                               f"relaunch the job")
        side = int(model.config["max_side"])
        model.max_forward_batch = memory_batch_size(model, side, side, self.batch_size)
        log.info("embedding with model %s on %s, %d images per forward pass", model.fingerprint,
                 device_name(device), model.max_forward_batch)
        return model

    def run_inference(self, batch: Sequence[PreparedImage], model,
                      inference_args: dict | None = None) -> list[PredictionResult]:
        """One forward pass per shape among `batch` (at most `batch_size` images each)."""
        out: list = [None] * len(batch)
        for positions in shape_batches([p.pixels for p in batch], self.batch_size):
            for i, result in zip(positions, embed_group(model, [batch[i] for i in positions],
                                                        getattr(model, "max_forward_batch",
                                                                None))):
                out[i] = result
        return [PredictionResult(p, r, self.fingerprint) for p, r in zip(batch, out)]

    def get_num_bytes(self, batch: Sequence[PreparedImage]) -> int:
        return sum(p.pixels.nbytes for p in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def share_model_across_processes(self) -> bool:
        return False    # one model per worker process, shared by its threads


class BatchByShape(beam.DoFn):
    """PreparedImage -> lists of up to `batch_size` images of one input shape: buckets by shape
    within a bundle, a full bucket as soon as it fills, the partial ones at the bundle's end."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def start_bundle(self):
        self.buckets = defaultdict(list)

    def process(self, image: PreparedImage):
        bucket = self.buckets[image.pixels.shape]
        bucket.append(image)
        if len(bucket) >= self.batch_size:
            del self.buckets[image.pixels.shape]
            yield bucket

    def finish_bundle(self):
        buckets, self.buckets = self.buckets, defaultdict(list)
        for bucket in buckets.values():
            yield GlobalWindows.windowed_value(bucket)


def failed_batch_failures(failed) -> list[Failure]:
    """A batch RunInference dead-lettered whole ((batch, (type, repr, traceback)) from
    with_exception_handling) -> the Failure of each of its images."""
    batch, (exc_type, exc_repr, _) = failed
    return [embed_failure(p, exc_type.__name__, exc_repr) for p in batch]


def shard_row(p: PreparedImage, vector, fingerprint: str) -> dict:
    """The shard row of an embedded image: the shard's own columns, then its URI manifest row's
    extra columns (remap_store.schema.with_manifest_columns refused clashing names)."""
    return {"id": p.id, "uri": p.uri, "embedding": vector, "content_sha1": p.content_sha1,
            "size_bytes": p.size_bytes, "width": p.width, "height": p.height,
            "model": fingerprint, **dict(p.metadata),
            # not shard columns: carried to the sources table (schema.ROW_INTERNAL_KEYS)
            "_listed_size": p.listed_size, "_version": p.version,
            "_metadata_sha1": metadata_sha1(p.metadata)}


def count_failure(failure: Failure) -> None:
    count("dead_lettered")
    count(f"dead_letter.{failure.reason}")


class _ShardRowsFn(beam.DoFn):
    """PredictionResult -> shard row (the image's pixels dropped), or its Failure on the
    dead-letter output; counts both."""

    def __init__(self, fingerprint: str, progress_seconds: float):
        self.fingerprint, self.progress_seconds = fingerprint, progress_seconds

    def setup(self):
        redact_logs()
        self.progress = Progress("embedded", self.progress_seconds)

    def process(self, result: PredictionResult):
        if isinstance(result.inference, Failure):
            count_failure(result.inference)
            yield beam.pvalue.TaggedOutput(DEAD, result.inference)
            return
        count("embedded")
        self.progress.add(1)
        yield shard_row(result.example, result.inference, self.fingerprint)


def _failed_batch_fn(failed):
    failures = failed_batch_failures(failed)
    for f in failures:
        count_failure(f)
    return failures


class EmbedImages(beam.PTransform):
    """PreparedImage -> {"rows": shard rows (dicts, `embedding` a float32 array),
    "dead_letter": Failures}. Both are made in the step that embeds (one fused stage): no image's
    pixels leave it."""

    def __init__(self, model_uri, fingerprint, batch_size=32, device=None, progress_seconds=15.0,
                 fsspec_config=None, torch_threads=None):
        super().__init__()
        self.handler = EmbedModelHandler(model_uri, fingerprint, batch_size, device,
                                         torch_threads, fsspec_config)
        self.progress_seconds = progress_seconds

    def expand(self, images):
        handler = self.handler
        predictions, failed = (
            images
            | "BatchByShape" >> beam.ParDo(BatchByShape(handler.batch_size))
            | "RunInference" >> RunInference(handler.with_no_batching()
                                             ).with_exception_handling())
        # each read straight from RunInference's outputs (fused with it): no Flatten before
        # the pixels are dropped
        rows = predictions | "ShardRows" >> beam.ParDo(_ShardRowsFn(
            handler.fingerprint, self.progress_seconds)).with_outputs(DEAD, main="rows")
        failed_batches = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            _failed_batch_fn)
        dead = (rows[DEAD], failed_batches) | "AllFailures" >> beam.Flatten()
        return {"rows": rows.rows, DEAD: dead}
