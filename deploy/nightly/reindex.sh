#!/usr/bin/env bash
# Nightly re-index: embed what is new or changed, build a dated index, publish it by moving
# CURRENT only if it built completely and passes the recall gate, keep the last N indexes.
#
#   deploy/nightly/reindex.sh --input gs://photos/ --store gs://remap/store \
#       --index-root gs://remap/indexes [--model gs://remap/models/remap-v3.pt] \
#       [--date 2026-11-23] [--keep 7] [--min-recall 0.9] [--recall-k 10] [--max-shrink 0.5] \
#       [--index-args "--factory IVF4096,PQ64 --max-index-memory 4GB"] [--work-dir /scratch] \
#       [--skip-embed] [--index-builder local|beam] \
#       [-- <Beam flags for remap embed: --runner=DataflowRunner --project=... ...>]
#
# Every flag also reads an environment variable (INPUT, STORE, INDEX_ROOT, MODEL, RUN_DATE,
# KEEP, MIN_RECALL, RECALL_K, MAX_SHRINK, INDEX_ARGS and EMBED_ARGS (both word-split),
# WORK_DIR, SKIP_EMBED=1, INDEX_BUILDER), so a CronJob or an Airflow task can configure it
# without quoting trouble.
# --index-builder local (default): `remap index` builds in a local folder: with a gs:// or s3://
# --index-root the index is built under --work-dir (default $TMPDIR) and uploaded, manifest.json
# last. --index-builder beam: `remap index-beam`, the build as its own Beam job (the Airflow
# DAG's build_index task), writing the index folder itself (local, gs://, s3://); --index-args
# are then index-beam's options and Beam flags ("--max_index_memory 8GB --refine 10
# --runner=DataflowRunner ..."); a killed night run again resumes from the folder's _build/.
# --skip-embed: index + gate + publish only, for when the embed is scheduled on its own (e.g.
# Cloud Scheduler -> Flex Template); only runs complete by then (run.json) are indexed.
#
# Exit status: 0 published or nothing to do; 1 bad usage; 10 embed failed; 11 index build
# failed; 12 index refused by the gate (CURRENT unchanged); 13 publish/prune failed; 14 store
# busy (another embed run holds the store's lease: retry later).
# Safe to rerun: the embed step redoes only what is missing (an unfinished run folder is
# removed and redone, URIs already embedded are skipped), the index is rebuilt from the store,
# and CURRENT moves only at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INPUT="${INPUT:-}"
STORE="${STORE:-}"
INDEX_ROOT="${INDEX_ROOT:-}"
MODEL="${MODEL:-}"
RUN_DATE="${RUN_DATE:-$(date -u +%F)}"
KEEP="${KEEP:-7}"
MIN_RECALL="${MIN_RECALL:-0.9}"
RECALL_K="${RECALL_K:-10}"
MAX_SHRINK="${MAX_SHRINK:-0.5}"
WORK_DIR="${WORK_DIR:-${TMPDIR:-/tmp}/remap-reindex}"
REMAP="${REMAP:-remap}"
SKIP_EMBED="${SKIP_EMBED:-0}"
INDEX_BUILDER="${INDEX_BUILDER:-local}"
read -r -a embed_args <<< "${EMBED_ARGS:-}"
read -r -a index_args <<< "${INDEX_ARGS:-}"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --input) INPUT="$2"; shift 2 ;;
    --store) STORE="$2"; shift 2 ;;
    --index-root) INDEX_ROOT="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --date) RUN_DATE="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    --min-recall) MIN_RECALL="$2"; shift 2 ;;
    --recall-k) RECALL_K="$2"; shift 2 ;;
    --max-shrink) MAX_SHRINK="$2"; shift 2 ;;
    --index-args) read -r -a index_args <<< "$2"; shift 2 ;;
    --work-dir) WORK_DIR="$2"; shift 2 ;;
    --skip-embed) SKIP_EMBED=1; shift ;;
    --index-builder) INDEX_BUILDER="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; embed_args+=("$@"); break ;;
    *) echo "reindex.sh: unknown argument $1 (Beam flags go after --)" >&2; usage >&2; exit 1 ;;
  esac
done
required=(STORE INDEX_ROOT)
[ "$SKIP_EMBED" = 1 ] || required+=(INPUT)
for v in "${required[@]}"; do
  flag="${v,,}"
  if [ -z "${!v}" ]; then echo "reindex.sh: --${flag//_/-} is required" >&2; exit 1; fi
done
case "$INDEX_BUILDER" in
  local|beam) ;;
  *) echo "reindex.sh: --index-builder must be local or beam, not '$INDEX_BUILDER'" >&2; exit 1 ;;
esac
INDEX_ROOT="${INDEX_ROOT%/}"
case "$INDEX_ROOT" in *://*) ;; /*) ;; *) INDEX_ROOT="$PWD/$INDEX_ROOT" ;; esac

# The python that has remap installed (next to the remap command), for index_pointer.py.
remap_path="$(command -v "$REMAP" || true)"
if [ -z "$remap_path" ]; then echo "reindex.sh: '$REMAP' not found on PATH" >&2; exit 1; fi
PYTHON="${PYTHON:-$(dirname "$remap_path")/python}"
[ -x "$PYTHON" ] || PYTHON=python3
pointer() { "$PYTHON" "$here/index_pointer.py" "$@"; }
log() { echo "[reindex $(date -u +%FT%TZ)] $*" >&2; }
field() { "$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2]) or "")' "$1" "$2"; }

log "date=$RUN_DATE input=$INPUT store=$STORE index_root=$INDEX_ROOT"
log "CURRENT before: $(pointer current --index-root "$INDEX_ROOT")"

# 1. embed only new/changed URIs (incremental by default) into the store
model_args=()
[ -n "$MODEL" ] && model_args=(--model "$MODEL")
if [ "$SKIP_EMBED" = 1 ]; then
  log "embed skipped (--skip-embed): indexing the store's completed runs"
else
  rc=0
  embed_out="$("$REMAP" embed --input "$INPUT" --output "$STORE" "${model_args[@]}" \
               "${embed_args[@]}")" || rc=$?
  if [ "$rc" = 75 ]; then   # another run holds the store's lease (remap embed said which)
    log "store busy: another embed run is writing $STORE; CURRENT unchanged, retry later"
    exit 14
  elif [ "$rc" != 0 ]; then
    log "embed failed: CURRENT unchanged; rerun to complete (already embedded URIs are skipped)"
    exit 10
  fi
  log "embed: $(printf '%s\n' "$embed_out" | tail -n 1)"
fi

# 2. is a new index needed, and where
if ! plan="$(pointer plan --index-root "$INDEX_ROOT" --store "$STORE" --date "$RUN_DATE")"; then
  log "plan failed: CURRENT unchanged"
  exit 11
fi
log "plan: $plan"
if [ "$(field "$plan" action)" = "keep" ]; then
  log "nothing new since the published index; CURRENT stays"
else
  target="$(field "$plan" target)"
  # 3. build the dated index (its manifest is written last: no manifest = not built);
  #    remote roots: build in a local scratch folder, then upload it, manifest.json last
  build="$target"
  case "$target" in
    file://*) build="${target#file://}" ;;
    *://*) [ "$INDEX_BUILDER" = beam ] || {
             build="$WORK_DIR/$(basename "$target")"; rm -rf "$build"; mkdir -p "$WORK_DIR"; } ;;
  esac
  built=0
  if [ "$INDEX_BUILDER" = beam ]; then
    "$REMAP" index-beam --embeddings "$STORE" --index "$build" "${index_args[@]}" >&2 || built=$?
  else
    "$REMAP" index --embeddings "$STORE" --output "$build" --no-progress \
      "${index_args[@]}" >&2 || built=$?
  fi
  if [ "$built" != 0 ]; then
    log "index build ($INDEX_BUILDER) failed: CURRENT unchanged; rerun to retry"
    exit 11
  fi
  if [ "$build" != "$target" ] && [ "$build" != "${target#file://}" ]; then
    pointer upload --from "$build" --to "$target" >&2 || { log "upload failed"; exit 13; }
    rm -rf "$build"
  fi
  # 4. gate: complete, checksums match, recall, no collapse in size
  if ! gate="$(pointer check --index-root "$INDEX_ROOT" --index "$target" \
                --min-recall "$MIN_RECALL" --recall-k "$RECALL_K" --max-shrink "$MAX_SHRINK")"; then
    log "index $target refused: CURRENT unchanged"
    exit 12
  fi
  log "check: $gate"
  # 5. publish
  pointer publish --index-root "$INDEX_ROOT" --index "$target" >&2 || exit 13
  log "CURRENT -> $target"
fi

# 6. keep the last $KEEP indexes (never the published one)
pointer prune --index-root "$INDEX_ROOT" --keep "$KEEP" >&2 || exit 13
pointer current --index-root "$INDEX_ROOT"
