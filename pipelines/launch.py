"""Launching `remap embed`: check the options, the input and the store, take the store's lease,
build the job (pipelines/embed.py) and run it, renewing the lease while waiting for it; or, with
--dry_run, only build (and for Dataflow translate) its graph."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import re
import secrets
from typing import NamedTuple

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions, TestOptions)
from apache_beam.runners.runner import PipelineState

from remap_store import lease, runs
from remap_store.files import redact, redact_logs
from remap_store.schema import embedding_schema, with_manifest_columns
from pipelines import uris
from pipelines.options import EmbedOptions, EmbedWorkerOptions, check_option_ranges
from pipelines.tables import make_run_info

LOCAL_RUNNER = "FnApiRunner"
# Runners whose job runs inside the launcher's process: a dead launcher is a dead job.
IN_PROCESS_RUNNERS = ("FnApiRunner", "DirectRunner", "direct", "BundleBasedDirectRunner",
                      "SwitchingDirectRunner")
log = logging.getLogger(__name__)

class JobFailed(RuntimeError):
    """The runner ran the job and reports it failed (a killed worker, a failing bundle that it
    does not retry): one line for the console, `remap <cmd>: error: ...`, exit 1 (what the nightly
    scripts already read as "embed failed"; `remap -v` still shows the runner's traceback)."""

    exit_status = 1


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?")


def runner_reason(error: BaseException | str, limit: int = 200) -> str:
    """The runner's short reason for a failed job: Beam's message is "Pipeline <job> failed in
    state FAILED: <the worker's traceback>"; the reason is the traceback's last exception line
    ("RuntimeError: Channel closed prematurely."), else its first line."""
    text = str(error)
    m = re.match(r"Pipeline \S+ failed in state \w+: ?(.*)", text, re.S)
    detail = m.group(1) if m else text
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    reason = lines[0]
    if "Traceback (most recent call last):" in detail:
        raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
        if raised:
            reason = raised[-1]
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


class _QuietRunnerErrors(logging.Filter):
    """Beam's PortableRunner logs the job's ERROR messages (a worker's traceback, "Error running
    pipeline.") on the root logger from its message thread while it waits; the failure then
    reaches the user once, as JobFailed's line. Those records pass only with debug logging on
    (`remap -v`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.name == "root" and record.levelno >= logging.ERROR
                and record.threadName == "wait_until_finish_read"):
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


@contextlib.contextmanager
def quiet_runner_errors():
    """While waiting for a job on a runner outside this process: its logged errors only at debug
    level (a failure raises JobFailed, one line)."""
    quiet = _QuietRunnerErrors()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def job_failed(what: str, reason: str, cleanup: str) -> JobFailed:
    return JobFailed(f"{what} failed on the runner ({reason}); {cleanup}; run the same command "
                     f"again to finish the work")


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
    from pipelines.embed import build_pipeline   # embed.py re-exports this module's names

    redact_logs()
    argv = local_defaults(list(argv))
    options = PipelineOptions(argv)
    opts = options.view_as(EmbedOptions)
    for name in ("input", "output"):
        if not getattr(opts, name):
            raise ValueError(f"--{name} is required: remap embed --input <folder|glob|URI list> "
                             f"--output <store>")
    threads = options.view_as(EmbedWorkerOptions).torch_threads
    if threads is not None and threads < 1:
        raise ValueError(f"--torch_threads must be at least 1 (got {threads}); omit it to keep "
                         f"torch's default")
    check_option_ranges(opts)
    run_id = opts.run_id or default_run_id()
    runs.check_run_id(run_id)
    dry_run = is_dry_run(options)
    options.view_as(TestOptions).dry_run = dry_run   # Beam then agrees with us on "False"
    std = options.view_as(StandardOptions)
    wait = not (dry_run or std.no_wait_until_finish
                or options.view_as(GoogleCloudOptions).template_location)
    in_process = std.runner.split(".")[-1] in IN_PROCESS_RUNNERS
    if in_process:   # the workers are this machine: a --device it lacks is refused now
        from remap_core.descriptor.devices import resolve_device

        resolve_device(opts.device)
    fsconf = json.loads(opts.fsspec_config) if opts.fsspec_config else None
    uris.apply_fsspec_config(fsconf)
    store = opts.output.rstrip("/")
    if not dry_run:
        runs.check_store_path(store)
    partitions = uris.list_partitions(opts.input)
    if opts.min_listed > 0 and uris.lists_no_image(partitions):
        others = f" (only {len(partitions)} other files)" if partitions else ""
        raise ValueError(f"--input {opts.input!r} holds no images{others}; nothing was run. "
                         f"Check --input (an unmounted folder, a mistyped prefix); pass "
                         f"--min_listed=0 to run on an empty listing")
    model = load_model(opts.model, device="cpu")
    cfg = model.config
    # a URI manifest column named like a shard column is refused before the store is touched
    with_manifest_columns(embedding_schema(model.dim, model.fingerprint),
                          uris.partition_manifest_fields(partitions))
    taken = None
    if not dry_run:
        seconds = opts.lease_minutes * 60 if wait else opts.unattended_lease_hours * 3600
        taken = lease.acquire(store, lease.new_lease(run_id, seconds, local=in_process,
                                                    renewed=wait),
                              break_lease=opts.break_lease)
    try:
        if dry_run:
            previous, state = [], []
            log.info("dry run %s: the store %s is not read; graph built as for a first run",
                     run_id, redact(store))
        else:
            previous, incomplete = runs.scan_store(store)
            runs.check_new_run([] if opts.full else previous, run_id, model.fingerprint, store)
            runs.remove_incomplete(incomplete)
            state = [] if opts.full else runs.state_files(previous)
            log.info("run %s: %d earlier runs in %s (%d state files)", run_id, len(previous),
                     redact(store), len(state))
        scope = runs.input_scope(opts.input, previous)
        run_dir = runs.run_folder(store, run_id)
        info = make_run_info(options, run_id, model.fingerprint, model.dim,
                             [r.run_id for r in previous])
        info["lease"] = taken is not None
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, opts, run_dir, run_id, model.fingerprint, model.dim,
                       cfg["max_side"], cfg["multiple"], state, info, scope, partitions)
    except BaseException:
        if taken is not None:
            lease.release(store, run_id)
        raise
    return PreparedRun(pipeline, options, run_id, run_dir, info, dry_run, wait, store, taken,
                       in_process)


def top_level_transforms(pipeline: beam.Pipeline) -> list[str]:
    return [t.full_label for t in pipeline.transforms_stack[0].parts]


def _job_ended(result) -> bool:
    try:
        return PipelineState.is_terminal(result.state)
    except Exception:       # the runner could not be asked: assume the job may still run
        return False


def _embed_failed(run_id: str, reason: str) -> JobFailed:
    return job_failed(f"the job of run {run_id}", reason, "nothing of it was published (no "
                      "run.json) and the store's lease was released")


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
    with lease.Renewer(p.store, p.lease) if p.wait else contextlib.nullcontext():
        try:
            result = p.pipeline.run()
            if not p.wait:
                log.info("run %s submitted; its job writes %s/%s and gives the store's lease "
                         "back when it completes (else the lease lapses)", p.run_id,
                         redact(p.run_dir),
                         runs.RUN_SUMMARY)
                return {"run_id": p.run_id, "submitted": True}
            if getattr(result, "has_job", True) is False:
                raise RuntimeError(f"the runner submitted no job for run {p.run_id} (a result "
                                   f"without a job, and no --template_location); nothing ran")
            with quiet_runner_errors() if not p.in_process else contextlib.nullcontext():
                state = result.wait_until_finish()
        except BaseException as e:
            # The job is over if it ran in this process, was never submitted, or reached a
            # terminal state; otherwise (Ctrl-C while waiting on a remote runner) it may still
            # run, and its lease lapses --lease_minutes after the last renewal.
            if p.in_process or result is None or _job_ended(result):
                lease.release(p.store, p.run_id)
                if (not p.in_process and result is not None and isinstance(e, Exception)
                        and not isinstance(e, lease.LeaseLost)):
                    # the runner's job failed (a killed worker): one line, not its traceback
                    raise _embed_failed(p.run_id, runner_reason(e)) from e
            raise
    if state not in (None, PipelineState.DONE):
        lease.release(p.store, p.run_id)
        raise _embed_failed(p.run_id, f"it ended in state {state}")
    summary_url = runs.run_summary_url(p.run_dir)
    fs, path = fsspec.core.url_to_fs(summary_url)
    fs.invalidate_cache(path.rsplit("/", 1)[0])   # written by a worker: listings may predate it
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RuntimeError(f"the job of run {p.run_id} finished but wrote no {summary_url}; "
                           f"the run is incomplete and will be redone by the next run") from None
