"""Fetch and decode, spread across workers: Source -> PreparedImage (the model's input size),
every failure a dead-letter row (the per-image work is plain functions in pipelines/prepare.py)."""

from __future__ import annotations

import apache_beam as beam

from pipelines.prepare import Failure, prepare_source
from pipelines.workers import DEAD, StorageDoFn, count


class _FetchAndDecodeFn(StorageDoFn):
    def __init__(self, max_side: int, multiple: int, fsspec_config: dict | None):
        super().__init__(fsspec_config)
        self.max_side, self.multiple = max_side, multiple

    def process(self, source):
        out = prepare_source(source, self.max_side, self.multiple)
        if isinstance(out, Failure):
            count("dead_lettered")
            count(f"dead_letter.{out.reason}")
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
