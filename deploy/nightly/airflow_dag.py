"""Cloud Composer / Airflow: the nightly re-index as separate tasks, each a pod of the remap image
on the Composer GKE cluster (KubernetesPodOperator), so Composer's own workers need neither torch
nor remap. The steps and exit statuses are reindex.sh's (deploy/nightly/README.md):

    embed        remap embed on Dataflow (Beam's DataflowRunner; the pod waits for the job)
    plan         index_pointer.py plan: keep the published index, or build INDEX_ROOT/{{ ds }}
    needs_index  stops here (build, gate and publish skipped) when plan says keep
    build_index  remap index-beam: the index build as its Beam job (in the pod by default; on
                 Dataflow with the Beam flags of the Variable remap_index_beam_args)
    gate         index_pointer.py check: complete, checksums, recall, no collapse in size
    publish      index_pointer.py publish: CURRENT -> the new index
    prune        index_pointer.py prune: keep the last 7 (after publish, or after a skip)

Each task's last stdout line is its JSON summary; it becomes the task's XCom
(/airflow/xcom/return.json) and the next tasks read what they need from it (the plan's `target`).

Exit statuses mapped: `remap embed` exits 75 when another run holds the store's lease -> the
embed task is skipped, and the night with it (store busy: nothing is wrong, tomorrow catches
up). The gate exits 3 when it refuses the index -> the task fails and is not retried
(`retries=0`: the same index is refused again; CURRENT stays; look at its recall). Every other
task retries once: a rerun completes the work without duplicates (the embed redoes only what is
missing, index-beam resumes from its _build/ folder, CURRENT moves only at publish).

`{{ ds }}` names the index after the DAG run's logical date, so a retry or a manual re-run of the
same date rebuilds (or keeps) the same folder. max_active_runs=1: nights never overlap. Copy
this file to the Composer DAGs bucket and set the Airflow Variables below (or edit the
defaults); they are read when a task runs (Jinja), not each time the scheduler parses the file.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

try:                                    # Airflow 3
    from airflow.providers.standard.operators.python import ShortCircuitOperator
except ImportError:                     # Airflow 2
    from airflow.operators.python import ShortCircuitOperator

IMAGE = ("{{ var.value.get('remap_image', "
         "'europe-west1-docker.pkg.dev/my-project/remap/embed-worker:0.2.0') }}")
PROJECT = "{{ var.value.get('remap_project', 'my-project') }}"
REGION = "{{ var.value.get('remap_region', 'europe-west1') }}"
BUCKET = "{{ var.value.get('remap_bucket', 'gs://my-project-remap') }}"
STORE = f"{BUCKET}/store"
INDEX_ROOT = f"{BUCKET}/indexes"
POINTER = "python /opt/remap/src/deploy/nightly/index_pointer.py"
TARGET = "{{ ti.xcom_pull(task_ids='plan')['target'] }}"

EMBED_ARGS = " ".join([
    "--runner=DataflowRunner", f"--project={PROJECT}", f"--region={REGION}",
    f"--temp_location={BUCKET}/tmp", f"--staging_location={BUCKET}/staging",
    f"--service_account_email=remap-dataflow@{PROJECT}.iam.gserviceaccount.com",
    f"--sdk_container_image={IMAGE}", "--sdk_location=container",
    "--experiments=use_runner_v2", "--machine_type=n2-standard-8",
    "--number_of_worker_harness_threads=3", "--max_num_workers=20",
    "--autoscaling_algorithm=THROUGHPUT_BASED",
    "--job_name=remap-embed-{{ ds_nodash }}-{{ ti.try_number }}",
])
# the index build's options (IndexBuildOptions) and, to run it on Dataflow, Beam's flags
INDEX_BEAM_ARGS = ("{{ var.value.get('remap_index_beam_args', "
                   "'--max_index_memory=8GB --target_recall=0.95') }}")

STORE_BUSY = 75         # remap embed: another run holds the store's lease
GATE_REFUSED = 3        # index_pointer.py check: the index must not be published


def remap_task(task_id: str, command: str, **kwargs) -> KubernetesPodOperator:
    """A pod of the remap image running `command` (bash); its last stdout line, a JSON summary,
    is the task's XCom. The command's exit status is the pod's (pipefail)."""
    script = (f"set -euo pipefail; mkdir -p /airflow/xcom; {command} | tee /dev/stderr "
              f"| tail -n 1 > /airflow/xcom/return.json")
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"remap-{task_id.replace('_', '-')}",
        namespace="composer-user-workloads",
        service_account_name="remap-nightly",
        image=IMAGE,
        cmds=["bash", "-c"],
        arguments=[script],
        env_vars={"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                  "OMP_NUM_THREADS": "4"},   # the image's 1 is for Dataflow workers
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": "4", "memory": "16Gi"}, limits={"memory": "16Gi"}),
        do_xcom_push=True,
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        **kwargs,
    )


def index_needed(ti) -> bool:
    """False (skip build, gate, publish) when the plan keeps the published index."""
    return (ti.xcom_pull(task_ids="plan") or {}).get("action") != "keep"


with DAG(
    dag_id="remap_nightly_reindex",
    schedule="30 2 * * *",
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=dt.timedelta(hours=18),
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=30), "owner": "remap"},
    tags=["remap"],
) as dag:
    embed = remap_task(
        "embed",
        f"remap embed --input {BUCKET}/images/ --output {STORE} "
        f"--model {BUCKET}/models/remap.pt {EMBED_ARGS}",
        skip_on_exit_code=[STORE_BUSY],
        execution_timeout=dt.timedelta(hours=12))
    plan = remap_task(
        "plan", f"{POINTER} plan --index-root {INDEX_ROOT} --store {STORE} --date {{{{ ds }}}}")
    needs_index = ShortCircuitOperator(
        task_id="needs_index", python_callable=index_needed,
        ignore_downstream_trigger_rules=False)       # prune still runs
    build_index = remap_task(
        "build_index",
        f"remap index-beam --embeddings {STORE} --index {TARGET} {INDEX_BEAM_ARGS}",
        execution_timeout=dt.timedelta(hours=6))
    gate = remap_task(
        "gate",
        f"{POINTER} check --index-root {INDEX_ROOT} --index {TARGET} --min-recall 0.9 "
        f"--recall-k 10 --max-shrink 0.5",
        retries=0)                                    # refused (exit 3): refused again
    publish = remap_task(
        "publish", f"{POINTER} publish --index-root {INDEX_ROOT} --index {TARGET}")
    prune = remap_task(
        "prune", f"{POINTER} prune --index-root {INDEX_ROOT} --keep 7",
        trigger_rule="none_failed")

    embed >> plan >> needs_index >> build_index >> gate >> publish >> prune
    needs_index >> prune
