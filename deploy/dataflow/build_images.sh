#!/usr/bin/env bash
# Build and push the Flex Template launcher image and the workers' SDK container image.
#
#   deploy/dataflow/build_images.sh [launcher|worker|all]     (default: all)
#
#   BUILDER=cloudbuild (default) | docker      where to build (docker: local daemon, then push)
#   TORCH_VARIANT=cpu (default) | cuda         worker image with CPU torch, or CUDA torch for
#                                              GPU workers (tagged $REPO/embed-worker-gpu:$TAG)
#   ENV_FILE=deploy/dataflow/env.sh            PROJECT, REPO, TAG, ... (see env.example.sh)
#
# The build context is a clean staging copy of the package (pyproject.toml, README.md,
# remap_core/, pipelines/, index_builder/, deploy/), never the working tree with its .venv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=/dev/null
. "${ENV_FILE:-$here/env.sh}"
what="${1:-all}"
BUILDER="${BUILDER:-cloudbuild}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"

# shellcheck disable=SC2153  # WORKER_IMAGE, REPO and TAG come from the env file
case "$TORCH_VARIANT" in
  cpu) torch_index=https://download.pytorch.org/whl/cpu; worker_image="$WORKER_IMAGE" ;;
  cuda) torch_index=https://pypi.org/simple; worker_image="$REPO/embed-worker-gpu:$TAG" ;;
  *) echo "TORCH_VARIANT must be cpu or cuda" >&2; exit 1 ;;
esac

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/remap_core" "$repo/pipelines" \
      "$repo/index_builder" "$repo/deploy" "$stage/"
find "$stage" \( -name __pycache__ -o -name '*.egg-info' -o -name env.sh \) -prune \
     -exec rm -rf {} +

build() {  # build <dockerfile relative to the context> <image> <torch index>
  local dockerfile="$1" image="$2" index="$3"
  echo "building $image from $dockerfile (torch from $index) with $BUILDER" >&2
  if [ "$BUILDER" = docker ]; then
    docker build -f "$stage/$dockerfile" --build-arg "TORCH_INDEX_URL=$index" -t "$image" "$stage"
    docker push "$image"
  else
    cat > "$stage/cloudbuild.yaml" <<YAML
steps:
- name: gcr.io/cloud-builders/docker
  args: [build, -f, $dockerfile, --build-arg, TORCH_INDEX_URL=$index, -t, $image, .]
images: [$image]
options: {machineType: E2_HIGHCPU_8, diskSizeGb: 100}
timeout: 3600s
YAML
    gcloud builds submit "$stage" --config "$stage/cloudbuild.yaml" --project "$PROJECT" \
      --region "$REGION"
  fi
}

case "$what" in
  launcher) build deploy/dataflow/Dockerfile "$LAUNCHER_IMAGE" https://download.pytorch.org/whl/cpu ;;
  worker) build deploy/dataflow/Dockerfile.worker "$worker_image" "$torch_index" ;;
  all)
    build deploy/dataflow/Dockerfile "$LAUNCHER_IMAGE" https://download.pytorch.org/whl/cpu
    build deploy/dataflow/Dockerfile.worker "$worker_image" "$torch_index" ;;
  *) echo "usage: build_images.sh [launcher|worker|all]" >&2; exit 1 ;;
esac
