#!/usr/bin/env bash
# Rehearse the Flink deployment's moving parts on one machine, with no Flink, no Docker and no
# network: Beam's local job service stands in for the Flink job server, and an EXTERNAL worker
# pool (the same `worker_pool_main` the taskmanager sidecar runs) executes the Python stages.
# The pipeline travels the same portable path as on Flink: PortableRunner -> job service ->
# EXTERNAL environment -> SDK workers started by the pool.
#
#   deploy/flink/rehearse_local.sh                 bundled samples, a tiny 64-px model
#   INPUT=/data/images MODEL=model.pt deploy/flink/rehearse_local.sh
#
#   VENV=.venv          the environment with remap installed; its bin/ goes FIRST on PATH: the
#                       job service and the pool start workers as `python`, and a python
#                       without apache_beam makes them die ("No module named 'apache_beam'")
#                       while the job hangs silently
#   WORK=/tmp/x         where samples, store and index go (default: a new temporary folder)
#   ISOLATE=auto|1|0    run inside a private network namespace with only loopback (needs root
#                       and `unshare`; auto: when available). Beam's gRPC servers listen on all
#                       interfaces; isolated, nothing can reach them or leave the machine.
#   EMBED_TIMEOUT=600   seconds before a hung embed is killed
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
VENV="${VENV:-$repo/.venv}"
ISOLATE="${ISOLATE:-auto}"
EMBED_TIMEOUT="${EMBED_TIMEOUT:-600}"

if [ "$ISOLATE" != 0 ] && [ -z "${REHEARSE_ISOLATED:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
    echo "rehearse: re-running inside a loopback-only network namespace" >&2
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's, expanded there
    exec unshare -n env REHEARSE_ISOLATED=1 bash -c 'ip link set lo up 2>/dev/null || true; exec "$0" "$@"' "${BASH_SOURCE[0]}" "$@"
  elif [ "$ISOLATE" = 1 ]; then
    echo "rehearse: ISOLATE=1 needs root and unshare" >&2; exit 1
  fi
fi

export PATH="$VENV/bin:$PATH"
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
if ! python -c "import apache_beam, pipelines.embed" 2>/dev/null; then
  echo "rehearse: 'python' on PATH ($(command -v python)) cannot import apache_beam and remap;" \
       "set VENV to the environment where remap is installed" >&2
  exit 1
fi
WORK="${WORK:-$(mktemp -d -t remap-rehearse.XXXXXX)}"
mkdir -p "$WORK/logs"
log() { echo "[rehearse $(date -u +%T)] $*" >&2; }
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {  # wait_port PORT PID NAME
  for _ in $(seq 1 300); do
    if ! kill -0 "$2" 2>/dev/null; then
      log "$3 exited; its log:"; cat "$WORK/logs/$3.log" >&2; return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  log "$3 did not listen on port $1"; return 1
}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# 1. input and model
if [ -z "${INPUT:-}" ]; then
  remap samples --output "$WORK/samples" >&2
  INPUT="$WORK/samples/images"
fi
if [ -z "${MODEL:-}" ]; then
  MODEL="$WORK/tiny-64px.pt"
  python -c "import sys
from remap_core.descriptor.checkpoint import save_checkpoint
from remap_core.descriptor.model import build_model
print(save_checkpoint(build_model({'max_side': 64}), sys.argv[1]))" "$MODEL" >&2
fi

# 2. the job service (stands in for Beam's Flink job server) and the worker pool (the sidecar)
JOB_PORT="$(free_port)"
POOL_PORT="$(free_port)"
python -m apache_beam.runners.portability.local_job_service_main --port="$JOB_PORT" \
  --staging_dir="$WORK/staging" > "$WORK/logs/job-service.log" 2>&1 &
pids+=($!); wait_port "$JOB_PORT" "$!" job-service
python -m apache_beam.runners.worker.worker_pool_main --service_port="$POOL_PORT" \
  > "$WORK/logs/worker-pool.log" 2>&1 &
pids+=($!); wait_port "$POOL_PORT" "$!" worker-pool
log "job service on 127.0.0.1:$JOB_PORT, worker pool on 127.0.0.1:$POOL_PORT, work in $WORK"

portable=(--runner=PortableRunner --job_endpoint="localhost:$JOB_PORT"
          --environment_type=EXTERNAL --environment_config="localhost:$POOL_PORT")

# 3. embed twice: the second run must find nothing new (incremental)
for attempt in first second; do
  log "embed ($attempt run) through the job service and the EXTERNAL worker pool"
  if ! timeout "$EMBED_TIMEOUT" remap embed --input "$INPUT" --output "$WORK/store" \
        --model "$MODEL" --progress_seconds=0 "${portable[@]}" > "$WORK/embed-$attempt.json"; then
    log "embed failed or hung; logs in $WORK/logs"; tail -n 20 "$WORK/logs/"*.log >&2; exit 1
  fi
  cat "$WORK/embed-$attempt.json"
done
python - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
first, second = (json.loads(open(f"{work}/embed-{a}.json").read().strip().splitlines()[-1])
                 for a in ("first", "second"))
assert first["embedded"] == first["read"] > 0, first
assert second["embedded"] == 0 and second["skipped"] == first["read"], second
print(f"rehearse: ok - {first['embedded']} embedded, then {second['skipped']} skipped as unchanged",
      file=sys.stderr)
PY

# 4. index and one query: an altered copy must find its original first
remap index --embeddings "$WORK/store" --output "$WORK/index" --no-progress >&2
query=""
for f in "$WORK"/samples/queries/*__crop.jpg; do [ -e "$f" ] && query="$f"; break; done
if [ -n "$query" ]; then
  remap search --index "$WORK/index" --k 3 "$query"
fi
log "done: store $WORK/store, index $WORK/index"
