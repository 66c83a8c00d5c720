#!/usr/bin/env bash
# Install, then run the main job end to end on the bundled sample images: embed, index, search.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
OUT="${REMAP_DEMO_OUT:-out}"
set -x
remap samples --output samples
remap embed --input samples/images --output "$OUT/embeddings"
remap index --embeddings "$OUT/embeddings" --output "$OUT/index"
remap search --index "$OUT/index" --k 3 \
  samples/queries/chelsea__crop.jpg samples/queries/coffee__occlude.jpg \
  samples/queries/rocket__rotate.jpg samples/queries/astronaut__bright.jpg
