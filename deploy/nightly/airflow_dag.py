"""Cloud Composer / Airflow: the nightly re-index as one task running deploy/nightly/reindex.sh
in the remap image on the Composer GKE cluster (KubernetesPodOperator), so Composer's own
workers need neither torch nor remap.

    embed new/changed URIs (Dataflow, direct launch: the pod waits for the job)
      -> remap index into INDEX_ROOT/{{ ds }} -> gate (complete, checksums, recall, size)
      -> CURRENT -> keep the last KEEP indexes

`RUN_DATE={{ ds }}` names the index after the DAG run's logical date, so a retry or a manual
re-run of the same date rebuilds (or keeps) the same folder. max_active_runs=1: nights never
overlap. A failed task leaves CURRENT on the previous index; its retry completes the work
without duplicates (deploy/nightly/README.md). Exit status 12 means the gate refused the index:
a retry is refused again, look at the recall before clearing the task. Copy this file to the
Composer DAGs bucket and set the Airflow Variables below (or edit the defaults); they are read
when the task runs (Jinja), not each time the scheduler parses the file.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

IMAGE = ("{{ var.value.get('remap_image', "
         "'europe-west1-docker.pkg.dev/my-project/remap/embed-worker:0.2.0') }}")
PROJECT = "{{ var.value.get('remap_project', 'my-project') }}"
REGION = "{{ var.value.get('remap_region', 'europe-west1') }}"
BUCKET = "{{ var.value.get('remap_bucket', 'gs://my-project-remap') }}"

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
    reindex = KubernetesPodOperator(
        task_id="reindex",
        name="remap-reindex",
        namespace="composer-user-workloads",
        service_account_name="remap-nightly",
        image=IMAGE,
        cmds=["/opt/remap/src/deploy/nightly/reindex.sh"],
        env_vars={
            "INPUT": f"{BUCKET}/images/",
            "STORE": f"{BUCKET}/store",
            "INDEX_ROOT": f"{BUCKET}/indexes",
            "MODEL": f"{BUCKET}/models/remap.pt",
            "RUN_DATE": "{{ ds }}",
            "KEEP": "7",
            "MIN_RECALL": "0.9",
            "INDEX_ARGS": "--max-index-memory 8GB --target-recall 0.95",
            "WORK_DIR": "/tmp/remap-reindex",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "OMP_NUM_THREADS": "4",   # the image's 1 is for Dataflow workers; FAISS runs here
            "EMBED_ARGS": EMBED_ARGS,
        },
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": "4", "memory": "16Gi"}, limits={"memory": "16Gi"}),
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
        execution_timeout=dt.timedelta(hours=18),
    )
