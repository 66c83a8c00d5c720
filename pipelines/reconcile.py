"""Reconcile this run's listing with the store's earlier runs: which URIs to embed, skip
(unchanged) or tombstone (gone from this run's input), and the check that no two live URIs share
an id. `reconcile()` is the decision for one URI, as a plain function."""

from __future__ import annotations

import apache_beam as beam

from remap_store import runs
from remap_store.schema import stable_id
from pipelines.workers import StorageDoFn, count


class _ReadStateFn(StorageDoFn):
    def process(self, item):
        yield from runs.read_state_file(*item)


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



SKIPPED, TOMBSTONES, LIVE_IDS, OUTCOMES = "skipped", "tombstones", "live_ids", "outcomes"
RETRY_OUTCOMES = ("dead_letter:fetch", "dead_letter:list", "dead_letter:embed")


def reconcile(uri: str, now: list, before: list,
              scope: runs.InputScope | None = None) -> tuple[str, object]:
    """What to do with one URI given its listings now and the earlier runs' states of it.

    Returns ("embed", reason) | ("skip", reason) | ("tombstone", PreviousState) |
    ("keep", PreviousState) | ("none", ""). A URI not listed now is tombstoned only when this
    run's input covers it (`scope`; None: every URI), else kept (another input's URI).
    An unchanged URI is skipped when its size and version match the newest earlier state and
    that state is an embedding or a decode failure (fetch failures are retried), and, for an
    embedding, its URI manifest row's extra columns are the same (else it is embedded again, so
    that its shard row carries the new values)."""
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
    if prev.outcome == "embedded" and now[0].metadata_sha1() != prev.metadata_sha1:
        return "embed", "metadata_changed"   # its URI manifest row changed: a new shard row
    return "skip", "unchanged" if prev.outcome == "embedded" else "unchanged_failed"


class _ReconcileFn(beam.DoFn):
    def __init__(self, run_id: str, scope: runs.InputScope | None):
        self.run_id, self.scope = run_id, scope

    def process(self, keyed):
        uri, groups = keyed
        now, before = list(groups["now"]), list(groups["before"])
        action, why = reconcile(uri, now, before, self.scope)
        if action == "none":
            return
        if action == "keep":
            count("kept_other_sources")
            yield beam.pvalue.TaggedOutput(OUTCOMES, "kept_other_sources")
            return
        prev = max(before, key=lambda s: s.run_index) if before else None
        if prev is not None and prev.outcome != "deleted":
            # an earlier run left it live and this run's input covers it: the tombstone bound's
            # denominator (runs.check_store_guards)
            yield beam.pvalue.TaggedOutput(OUTCOMES, "covered_before")
        if action == "tombstone":
            count("tombstoned")
            yield beam.pvalue.TaggedOutput(OUTCOMES, "tombstoned")
            yield beam.pvalue.TaggedOutput(TOMBSTONES, {"uri": uri, "id": why.id,
                                                        "run_id": self.run_id})
            return
        count("read")
        yield beam.pvalue.TaggedOutput(OUTCOMES, "read")
        if len(now) > 1:
            count("duplicates", len(now) - 1)
            yield beam.pvalue.TaggedOutput(OUTCOMES, ("duplicates", len(now) - 1))
        if action == "skip":
            count(f"skipped.{why}")
            yield beam.pvalue.TaggedOutput(OUTCOMES, "skipped")
            yield beam.pvalue.TaggedOutput(OUTCOMES, f"skipped.{why}")
            if why == "unchanged":
                yield beam.pvalue.TaggedOutput(LIVE_IDS, (prev.id, uri))
            return
        count(f"to_embed.{why}")
        yield beam.pvalue.TaggedOutput(OUTCOMES, f"to_embed.{why}")
        yield beam.pvalue.TaggedOutput(LIVE_IDS, (stable_id(uri), uri))
        yield now[0]._replace(replaces=prev is not None and prev.outcome == "embedded")


class Reconcile(beam.PTransform):
    """(Sources now, earlier states) -> Sources to embed, plus `skipped`, `tombstones`,
    `live_ids` (id, uri) and `outcomes` outputs. One shuffle keyed by URI does the dedupe and
    the incremental filter at once. `scope`: which unlisted URIs this run may tombstone
    (runs.InputScope; None: all of them)."""

    def __init__(self, run_id: str, scope: runs.InputScope | None = None):
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

