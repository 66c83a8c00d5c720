"""The options of `remap embed`: one PipelineOptions subclass for the job's own flags (the Flex
Template's parameters) and one for worker settings, plus the ranges the numeric flags accept.
Every other layer (the console, deploy's template metadata) reads the flags from here."""

from __future__ import annotations

import math

from apache_beam.options.pipeline_options import PipelineOptions


class EmbedOptions(PipelineOptions):
    """Options of `remap embed` (see `remap embed --help`)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Not argparse-required: Beam parses every registered options class for every pipeline
        # in the process; `run` checks them instead.
        parser.add_argument("--input", default=None,
                            help="folder, glob, or URI list file(s) (.txt, .csv or .parquet "
                                 "with a 'uri' column; a glob of them allowed) of image URIs; "
                                 "local, gs:// or s3://. A path that exists is never a glob")
        parser.add_argument("--output", default=None,
                            help="embedding store (local, gs://, s3://): each run writes "
                                 "run-<id>/ with shards, dead letter, tombstones and run.json")
        parser.add_argument("--model", default=None,
                            help="checkpoint path or fsspec URL, or a model name (default: "
                                 "the shipped trained REMAP model, remap-lite0-v4, see MODEL.md; "
                                 "'remap-lite0-v3', 'remap-lite0-v2', 'remap-lite0-v1': the former "
                                 "defaults, for stores built with them; "
                                 "'gem-lite0-v1': a GeM head trained the same way; 'gem': the "
                                 "untrained Lite0 GeM baseline, the default before them)")
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
        parser.add_argument("--device", default=None,
                            help="cpu or cuda (default: each worker's GPU when it has one, else "
                                 "its CPU); cuda where no GPU is visible is an error")
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


class IndexBuildOptions(PipelineOptions):
    """Options of `remap index-beam`, the index build as a Beam job (see its --help). Storage
    settings come from --fsspec_config (EmbedOptions), as for `remap embed`."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--embeddings", default=None,
                            help="embedding store written by remap embed (local, gs://, s3://)")
        parser.add_argument("--index", default=None,
                            help="index folder to write (local, gs://, s3://): the job works in "
                                 "its _build/ folder (kept until the index is complete, so a "
                                 "killed job rerun resumes there), manifest.json written last")
        parser.add_argument("--factory", default=None,
                            help="FAISS factory string (default: chosen from the collection "
                                 "size and --max_index_memory, as `remap index`)")
        parser.add_argument("--max_index_memory", default="4GB",
                            help="memory the searchable index may take (e.g. 100MB, 4GB)")
        parser.add_argument("--train_sample", type=int, default=None,
                            help="training vectors, drawn uniformly across all shards in "
                                 "parallel (default: 50 per IVF centroid, within 39-256)")
        parser.add_argument("--code_bytes", type=int, default=None,
                            help="largest PQ code, bytes per vector, when PQ is chosen (default "
                                 "64, as `remap index --code-bytes`)")
        parser.add_argument("--opq", action="store_true", default=False,
                            help="when PQ is chosen, learn an OPQ rotation in front")
        parser.add_argument("--layout", choices=("single", "ondisk", "shards"), default="single",
                            help="single: one index file; ondisk: IVF lists in a memory-mapped "
                                 ".ivfdata; shards: one index per embedding shard")
        parser.add_argument("--target_recall", type=float, default=0.95,
                            help="tune nprobe/efSearch to the cheapest setting reaching this "
                                 "recall@10")
        parser.add_argument("--recall_queries", type=int, default=1000,
                            help="held-out queries for the recall measured into the manifest")
        parser.add_argument("--seed", type=int, default=0,
                            help="seed of the training sample and the recall queries")
        parser.add_argument("--qe", type=int, default=None,
                            help="alpha query expansion over the top N results that searches "
                                 "of this index apply by default, as `remap index --qe` (0: "
                                 "off; default 2)")
        parser.add_argument("--dba", type=int, default=None,
                            help="database-side augmentation before indexing, as `remap index "
                                 "--dba K`: each stored vector becomes the score**3-weighted "
                                 "sum of itself and its K nearest others. Default: 2 when the "
                                 "collection's float32 vectors take at most 2 GiB, none above; "
                                 "0: off. One worker holds the vectors (about three times) and "
                                 "finds the neighbours; the others index their shards' "
                                 "augmented vectors")
        parser.add_argument("--refine", type=int, default=0,
                            help="re-rank K x k candidates on stored float16 vectors, as "
                                 "`remap index --refine` (refine.f16.npy, written by the merge "
                                 "worker from the shards: 2 x dimension bytes per vector; 0: "
                                 "off)")


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



def unknown_options(argv: list[str]) -> list[str]:
    """The flags of `argv` that no registered PipelineOptions class defines, as Beam's own
    parser sees them (Beam drops such flags with only a log line, so a misspelt
    `--break_leas` would silently do nothing). -> the flags as written, without values."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    classes = {}
    for cls in PipelineOptions.__subclasses__():     # as PipelineOptions.get_all_options
        classes.setdefault(str(cls), cls)
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in classes.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(argv))
    return [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
