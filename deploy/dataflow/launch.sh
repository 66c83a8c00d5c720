#!/usr/bin/env bash
# Run `remap embed` on Dataflow: build/run the Flex Template, or launch directly.
#
#   launch.sh template-build                       store the template spec at $TEMPLATE
#   launch.sh template-run  INPUT STORE [MODEL]    launch a job from the template (returns at once)
#   launch.sh direct        INPUT STORE [MODEL]    `remap embed --runner=DataflowRunner ...` from
#                                                  here; blocks until the job ends, then writes
#                                                  the run's run.json
#   launch.sh dry-run       INPUT STORE [MODEL]    build the job graph offline (nothing submitted)
#
#   GPU=1             T4 GPU workers: worker_accelerator service option, the -gpu worker image,
#                     one SDK process per VM (no_use_multiple_sdk_containers)
#   MACHINE_TYPE, MAX_WORKERS, HARNESS_THREADS, BATCH_SIZE, DISK_GB: sizing (see README)
#   ENV_FILE=deploy/dataflow/env.sh: PROJECT, REGION, BUCKET, REPO, TAG, SERVICE_ACCOUNT, ...
#   Extra arguments after the positional ones go to gcloud (template-run) or Beam (direct).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=/dev/null
. "${ENV_FILE:-$here/env.sh}"
cmd="${1:-}"; shift || true

GPU="${GPU:-0}"
if [ "$GPU" = 1 ]; then
  MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-8}"      # T4s attach to N1 machines
  HARNESS_THREADS="${HARNESS_THREADS:-12}"           # one process feeds the GPU from many bundles
  BATCH_SIZE="${BATCH_SIZE:-96}"
  DISK_GB="${DISK_GB:-80}"                           # the CUDA image is ~10 GB
  IMAGE="${WORKER_GPU_IMAGE:-$REPO/embed-worker-gpu:$TAG}"
  ACCEL="worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
else
  MACHINE_TYPE="${MACHINE_TYPE:-n2-standard-8}"      # one SDK process (one model) per vCPU
  HARNESS_THREADS="${HARNESS_THREADS:-3}"            # per process: overlap fetch with compute
  BATCH_SIZE="${BATCH_SIZE:-32}"
  DISK_GB="${DISK_GB:-40}"
  IMAGE="$WORKER_IMAGE"
fi
MAX_WORKERS="${MAX_WORKERS:-20}"

positional() {  # INPUT STORE [MODEL] -> sets input, store, model, rest
  [ $# -ge 2 ] || { sed -n '2,18p' "${BASH_SOURCE[0]}" >&2; exit 1; }
  input="$1"; store="$2"; shift 2
  model=""
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then model="$1"; shift; fi
  rest=("$@")
}

# Beam flags of a direct launch (also what the template's job gets, via gcloud flags below)
beam_flags() {
  local flags=(
    --runner=DataflowRunner --project="$PROJECT" --region="$REGION"
    --temp_location="$BUCKET/tmp" --staging_location="$BUCKET/staging"
    --service_account_email="$SERVICE_ACCOUNT"
    --sdk_container_image="$IMAGE" --sdk_location=container
    --experiments=use_runner_v2
    --machine_type="$MACHINE_TYPE" --max_num_workers="$MAX_WORKERS"
    --autoscaling_algorithm=THROUGHPUT_BASED --disk_size_gb="$DISK_GB"
    --number_of_worker_harness_threads="$HARNESS_THREADS"
    --batch_size="$BATCH_SIZE"
    --job_name="remap-embed-$(date -u +%Y%m%d-%H%M%S)"
  )
  if [ "$GPU" = 1 ]; then
    flags+=(--dataflow_service_options="$ACCEL" --experiments=no_use_multiple_sdk_containers
            --device=cuda)
  fi
  printf '%s\n' "${flags[@]}"
}

case "$cmd" in
  template-build)
    gcloud dataflow flex-template build "$TEMPLATE" \
      --image="$LAUNCHER_IMAGE" --sdk-language=PYTHON \
      --metadata-file="$here/metadata.json" \
      --project="$PROJECT" \
      --temp-location="$BUCKET/tmp" --staging-location="$BUCKET/staging" \
      --service-account-email="$SERVICE_ACCOUNT" \
      --additional-experiments=use_runner_v2 \
      --worker-machine-type="$MACHINE_TYPE" --max-workers="$MAX_WORKERS" "$@"
    ;;
  template-run)
    positional "$@"
    params="input=$input,output=$store,batch_size=$BATCH_SIZE"
    [ -n "$model" ] && params="$params,model=$model"
    options="sdk_container_image=$IMAGE,sdk_location=container"
    options="$options,number_of_worker_harness_threads=$HARNESS_THREADS,disk_size_gb=$DISK_GB"
    experiments=use_runner_v2
    if [ "$GPU" = 1 ]; then
      params="$params,device=cuda"
      experiments="$experiments,no_use_multiple_sdk_containers,$ACCEL"
    fi
    gcloud dataflow flex-template run "remap-embed-$(date -u +%Y%m%d-%H%M%S)" \
      --template-file-gcs-location="$TEMPLATE" \
      --project="$PROJECT" --region="$REGION" \
      --parameters="$params" \
      --additional-pipeline-options="$options" \
      --additional-experiments="$experiments" \
      --worker-machine-type="$MACHINE_TYPE" --max-workers="$MAX_WORKERS" \
      --launcher-machine-type=n2-standard-4 "${rest[@]}"
    ;;
  direct)
    positional "$@"
    mapfile -t flags < <(beam_flags)
    exec remap embed --input "$input" --output "$store" ${model:+--model "$model"} \
      "${flags[@]}" "${rest[@]}"
    ;;
  dry-run)
    positional "$@"
    mapfile -t flags < <(beam_flags)
    exec python "$here/dry_run.py" --input="$input" --output="$store" ${model:+--model="$model"} \
      "${flags[@]}" --no_auth "${rest[@]}"
    ;;
  *) sed -n '2,18p' "${BASH_SOURCE[0]}" >&2; exit 1 ;;
esac
