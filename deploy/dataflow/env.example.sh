# shellcheck shell=bash
# Copy to env.sh (not committed) and edit; launch.sh and build_images.sh source it.
export PROJECT=my-project                      # GCP project id
export REGION=europe-west1                     # Dataflow region
export BUCKET=gs://my-project-remap            # temp/staging/templates (no soft delete on it)
export REPO=europe-west1-docker.pkg.dev/my-project/remap   # Artifact Registry Docker repo
export TAG=0.2.0                               # image tag: the remap version you deploy
export SERVICE_ACCOUNT=remap-dataflow@my-project.iam.gserviceaccount.com
export LAUNCHER_IMAGE=$REPO/embed-launcher:$TAG
export WORKER_IMAGE=$REPO/embed-worker:$TAG    # or embed-worker-gpu:$TAG
export TEMPLATE=$BUCKET/templates/remap-embed-$TAG.json
