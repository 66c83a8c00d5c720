"""Listing --input, spread across workers: folder / glob / URI list -> Sources (the plain
listing functions are in pipelines/uris.py)."""

from __future__ import annotations

import apache_beam as beam

from pipelines import uris
from pipelines.workers import StorageDoFn, count


class _SplitPartitionFn(StorageDoFn):
    def process(self, part):
        yield from uris.split_partition(*part)


NOT_IMAGES = "not_images"


class _ExpandPartitionFn(StorageDoFn):
    def process(self, part):
        for item in uris.expand_partition(*part, with_others=True):
            if isinstance(item, uris.NotAnImage):
                yield beam.pvalue.TaggedOutput(NOT_IMAGES, item.uri)
            else:
                yield item


class _StatFn(StorageDoFn):
    """Fill in size and version of URI-list entries (one metadata request per URI). A failing
    stat leaves them unknown: the URI is then fetched, and its failure dead-lettered there."""

    def process(self, source):
        try:
            yield uris.stat(source)
        except Exception:
            count("stat_failed")
            yield source


class ListSources(beam.PTransform):
    """--input -> {"sources": PCollection[Source] (may repeat a URI), "not_images": URIs of
    listed files without an image extension (counted, not read)}, listing spread across
    workers: one task per URI list (per row group of a Parquet URI list) / top-level
    sub-folder, then a Reshuffle before the per-URI stat. `partitions`: the listing tasks when
    the launcher already has them (uris.list_partitions)."""

    def __init__(self, spec: str, fsspec_config: dict | None = None,
                 partitions: list[tuple] | None = None):
        super().__init__()
        self.spec, self.fsspec_config, self.partitions = spec, fsspec_config, partitions

    def expand(self, pbegin):
        uris.apply_fsspec_config(self.fsspec_config)
        parts = uris.list_partitions(self.spec) if self.partitions is None else self.partitions
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
