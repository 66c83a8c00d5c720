#!/usr/bin/env bash
# Schedule the nightly work with Cloud Scheduler (no cluster to run): two options.
#
#   cloud_scheduler.sh cloud-run      RECOMMENDED, works today: a Cloud Run job runs reindex.sh
#                                     in the worker image (embed on Dataflow, direct launch ->
#                                     index -> gate -> CURRENT), started nightly by Scheduler.
#   cloud_scheduler.sh flex-template  Scheduler calls flexTemplates:launch (the embed only; body
#                                     in flex_template_launch.json), and a second Scheduler
#                                     trigger runs reindex.sh --skip-embed 4 h later.
#                                     Needs the pipelines change in deploy/README.md
#                                     ("Open requests", R1) before it can complete a run.
#
# ENV_FILE (default deploy/dataflow/env.sh): PROJECT, REGION, BUCKET, WORKER_IMAGE, TEMPLATE.
# SCHEDULER_SA: service account Scheduler calls with (roles/run.invoker for cloud-run;
# roles/dataflow.developer + iam.serviceAccountUser on the worker account for flex-template).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=/dev/null
. "${ENV_FILE:-$here/../dataflow/env.sh}"
SCHEDULER_SA="${SCHEDULER_SA:-remap-scheduler@$PROJECT.iam.gserviceaccount.com}"
RUNNER_SA="${RUNNER_SA:-remap-nightly@$PROJECT.iam.gserviceaccount.com}"
SCHEDULE="${SCHEDULE:-30 2 * * *}"

embed_args="--runner=DataflowRunner --project=$PROJECT --region=$REGION"
embed_args+=" --temp_location=$BUCKET/tmp --staging_location=$BUCKET/staging"
embed_args+=" --service_account_email=$SERVICE_ACCOUNT --sdk_container_image=$WORKER_IMAGE"
embed_args+=" --sdk_location=container --experiments=use_runner_v2 --machine_type=n2-standard-8"
embed_args+=" --number_of_worker_harness_threads=3 --max_num_workers=20"

run_job() {  # run_job NAME EXTRA_ENV...: a Cloud Run job running reindex.sh
  local name="$1"; shift
  local env="INPUT=$BUCKET/images/,STORE=$BUCKET/store,INDEX_ROOT=$BUCKET/indexes"
  env+=",MODEL=$BUCKET/models/remap.pt,KEEP=7,MIN_RECALL=0.9,WORK_DIR=/tmp/remap-reindex"
  env+=",GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false,OMP_NUM_THREADS=4"
  # the index build as the Airflow DAG's build_index runs it: remap index-beam, same options
  env+=",INDEX_BUILDER=beam,INDEX_ARGS=--max_index_memory=8GB --target_recall=0.95"
  for e in "$@"; do env+=",$e"; done
  # ^@^ makes '@' the list separator, so EMBED_ARGS may contain commas and spaces
  gcloud run jobs deploy "$name" --project="$PROJECT" --region="$REGION" \
    --image="$WORKER_IMAGE" --command=/opt/remap/src/deploy/nightly/reindex.sh \
    --service-account="$RUNNER_SA" --cpu=4 --memory=16Gi --max-retries=1 \
    --task-timeout=86400s --set-env-vars="^@^${env//,/@}"
  gcloud scheduler jobs create http "$name" --project="$PROJECT" --location="$REGION" \
    --schedule="$SCHEDULE" --time-zone=Etc/UTC --http-method=POST \
    --uri="https://run.googleapis.com/v2/projects/$PROJECT/locations/$REGION/jobs/$name:run" \
    --oauth-service-account-email="$SCHEDULER_SA" \
    --oauth-token-scope=https://www.googleapis.com/auth/cloud-platform
}

case "${1:-}" in
  cloud-run)
    run_job remap-nightly-reindex "EMBED_ARGS=$embed_args"
    ;;
  flex-template)
    body="$(mktemp)"; trap 'rm -f "$body"' EXIT
    sed -e "s|gs://MY_BUCKET|$BUCKET|g" -e "s|MY_PROJECT|$PROJECT|g" \
        -e "s|gs://[^\"]*/templates/remap-embed-[^\"]*.json|$TEMPLATE|" \
        -e "s|europe-west1-docker.pkg.dev/[^\"]*/embed-worker:[^\"]*|$WORKER_IMAGE|" \
        "$here/flex_template_launch.json" > "$body"
    gcloud scheduler jobs create http remap-nightly-embed --project="$PROJECT" \
      --location="$REGION" --schedule="$SCHEDULE" --time-zone=Etc/UTC --http-method=POST \
      --uri="https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
      --headers=Content-Type=application/json --message-body-from-file="$body" \
      --oauth-service-account-email="$SCHEDULER_SA" \
      --oauth-token-scope=https://www.googleapis.com/auth/cloud-platform
    SCHEDULE="${INDEX_SCHEDULE:-30 6 * * *}" run_job remap-nightly-index SKIP_EMBED=1
    ;;
  *) sed -n '2,18p' "${BASH_SOURCE[0]}" >&2; exit 1 ;;
esac
